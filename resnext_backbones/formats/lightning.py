"""Lightning checkpoints: ``{"state_dict": ..., "pytorch-lightning_version": ...}`` (``lightning_version`` in
newer releases), as written by either task of this project or any other LightningModule.

Reader only: Lightning's ``Trainer`` writes these files, and a trunk leaves a checkpoint through
``python -m resnext_backbones export`` into one of the other formats. Reading never imports Lightning.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

from torch import Tensor

from ..files import WeightsError

__all__ = ["NAME", "detect", "read", "WRITERS"]

NAME = "lightning"


def detect(content: Mapping) -> bool:
    return "pytorch-lightning_version" in content or "lightning_version" in content


def read(content: Mapping, source: str) -> Tuple[Dict[str, Tensor], List[str]]:
    state = content.get("state_dict")
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: a Lightning checkpoint without a 'state_dict' (keys: {list(content)[:8]}); "
                           "save it with the model's weights, or export the trunk from the run that has them")
    return dict(state), []


WRITERS: Dict = {}
