"""torchvision and timm: the layout every other format is converted to.

Reads flat state dicts ``conv1.weight``, ``layer1.0.conv1.weight``, ... (``fc.*`` optional), which is also timm's
ResNet naming (its hub files are flat safetensors), and any checkpoint that nests one (``{"model": ...}``,
detector and ``BackboneWithFPN`` state dicts under ``backbone.body.`` / ``body.``): the trunk is found whatever
its prefix. Writes a torchvision state dict (``torch.save``) or timm's hub layout (flat safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..files import WeightsError
from ..trunk import ResNeXtSpec

__all__ = ["NAME", "detect", "read", "WRITERS", "TRUNK_MODULES", "find_prefix", "split_trunk", "trunk_tensors"]

NAME = "torchvision"
TRUNK_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
SHOW = 5  # how many offending keys an error lists


def find_prefix(keys: Iterable[str], suffix: str, also: str = "") -> Optional[str]:
    """The shortest prefix P with ``P + suffix`` (and ``P + also``) among ``keys``."""
    keys = set(keys)
    found = [k[: -len(suffix)] for k in keys if k.endswith(suffix) and (not also or k[: -len(suffix)] + also in keys)]
    return min(found, key=len) if found else None


def split_trunk(state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], str]:
    """``(trunk tensors without their prefix, the other keys, the prefix)``: the trunk is found whatever its
    prefix (``backbone.``, ``model.backbone.body.``, ...), as the ``conv1.weight`` next to ``layer1.0.conv1.weight``."""
    prefix = find_prefix(state, "conv1.weight", also="layer1.0.conv1.weight")
    if prefix is None:
        raise WeightsError("no ResNet/ResNeXt trunk found in the source: no '*conv1.weight' next to "
                           f"'*layer1.0.conv1.weight'; first keys: {list(state)[:SHOW]}")
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return trunk, [k for k in state if not k.startswith(prefix)], prefix


def trunk_tensors(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The trunk alone (torchvision names, no ``fc`` or other heads), found in ``state`` whatever its prefix."""
    trunk, _, _ = split_trunk(state)
    return {k: v for k, v in trunk.items() if k.split(".")[0] in TRUNK_MODULES}


# -------------------------------------------------------------------------------------------------- reader

def detect() -> bool:
    """Anything else: the last entry of the detection table."""
    return True


def read(content: Mapping) -> Tuple[Dict[str, Tensor], List[str]]:
    model = content.get("model")
    return dict(model if isinstance(model, Mapping) else content), []


# ------------------------------------------------------------------------------------------------- writers

def write_torchvision(state: Mapping[str, Tensor], path: Path, spec: ResNeXtSpec,
          normalization: Optional[dict] = None) -> None:
    """A torchvision ``resnet*``/``resnext*`` state dict: loads strictly but for ``fc``."""
    torch.save(dict(state), path)


def write_timm(state: Mapping[str, Tensor], path: Path, spec: ResNeXtSpec,
          normalization: Optional[dict] = None) -> None:
    """timm's hub layout: flat safetensors with torchvision names."""
    from safetensors.torch import save_file

    save_file(dict(state), str(path), metadata={"format": "pt"})


WRITERS = {"torchvision": write_torchvision, "timm": write_timm}
