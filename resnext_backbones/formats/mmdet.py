"""mmdet / mmpretrain checkpoints: ``{"state_dict": {"backbone.conv1.weight", ...}, "meta": {...}}``.

mmdet's ``ResNet``/``ResNeXt`` backbones use torchvision's module names under ``backbone.``; the necks and heads
beside it are reported as ignored by the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..trunk import ResNeXtSpec

__all__ = ["NAME", "detect", "read", "WRITERS"]

NAME = "mmdet"


def detect(content: Mapping) -> bool:
    return isinstance(content.get("state_dict"), Mapping)


def read(content: Mapping) -> Tuple[Dict[str, Tensor], List[str]]:
    return dict(content["state_dict"]), []


def write(state: Mapping[str, Tensor], path: Path, spec: ResNeXtSpec,
          normalization: Optional[dict] = None) -> None:
    """An mmdet checkpoint: the trunk under ``backbone.``, the spec in ``meta``."""
    torch.save({"meta": {"exported_by": "resnext_backbones", "spec": spec.as_dict()},
                "state_dict": {"backbone." + k: v for k, v in state.items()}}, path)


WRITERS = {"mmdet": write}
