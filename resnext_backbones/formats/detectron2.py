"""detectron2: ``{"model": {"stem.conv1.weight", "res2.0.conv1.norm.weight", "res2.0.shortcut.weight", ...}}``.

Numpy arrays in its ``.pkl`` model-zoo files (read by :func:`resnext_backbones.files.read_file`'s numpy-only
unpickler), tensors in the ``.pth`` files of a training run (under ``backbone.bottom_up.``). Two traps are
handled explicitly rather than loaded wrong:

- detectron2's default input is BGR (``INPUT.FORMAT``): the stem's input channels are flipped to RGB on reading
  (and flipped back on writing with ``input_format="BGR"``); the report says so.
- MSRA/Caffe2-trained ResNets put the stride in the 1x1 conv (``RESNETS.STRIDE_IN_1X1=True``) where this trunk
  puts it in the 3x3: same shapes, different network, so such files are refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..files import WeightsError
from ..trunk import ResNeXtSpec
from .torchvision import find_prefix

__all__ = ["NAME", "detect", "read", "WRITERS", "to_detectron2", "from_detectron2"]

NAME = "detectron2"

# One table, used both ways: torchvision name <-> detectron2 name. {s} stage, {b} block, {k} conv, {t} tensor.
NAMES = [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.{t}", "stem.conv1.norm.{t}"),
    ("layer{s}.{b}.conv{k}.weight", "res{s}.{b}.conv{k}.weight"),
    ("layer{s}.{b}.bn{k}.{t}", "res{s}.{b}.conv{k}.norm.{t}"),
    ("layer{s}.{b}.downsample.0.weight", "res{s}.{b}.shortcut.weight"),
    ("layer{s}.{b}.downsample.1.{t}", "res{s}.{b}.shortcut.norm.{t}"),
]
STAGE_OFFSET = 1  # torchvision layer1 is detectron2 res2


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\w+)", re.escape(template)) + "$")


_TO_D2 = [(_template_regex(tv), d2) for tv, d2 in NAMES]
_FROM_D2 = [(_template_regex(d2), tv) for tv, d2 in NAMES]


def _rename(key: str, to_d2: bool) -> Optional[str]:
    for pattern, dst in _TO_D2 if to_d2 else _FROM_D2:
        m = pattern.match(key)
        if m:
            fields = m.groupdict()
            if "s" in fields:
                fields["s"] = str(int(fields["s"]) + (STAGE_OFFSET if to_d2 else -STAGE_OFFSET))
            return dst.format(**fields)
    return None


def to_detectron2(state: Mapping[str, Tensor], *, input_format: str = "RGB") -> Dict:
    """A trunk state dict in detectron2's layout (numpy arrays, as its ``.pkl`` model zoo files).

    The stride sits in the 3x3 conv, so the result declares ``RESNETS.STRIDE_IN_1X1=False``; ``input_format``
    is recorded for the matching ``INPUT.FORMAT`` (convert with ``input_format="BGR"`` to flip the stem)."""
    model = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = _rename(key, to_d2=True)
        if name is None:
            raise WeightsError(f"key {key!r} has no detectron2 name; is this a trunk state dict?")
        value = value.detach().cpu()
        if key == "conv1.weight" and input_format == "BGR":
            value = value.flip(1)
        model[name] = value.numpy()
    return {"model": model, "__author__": "resnext_backbones", "matching_heuristics": True,
            "stride_in_1x1": False, "input_format": input_format}


def from_detectron2(content: Mapping, source: str = "<memory>") -> Tuple[Dict[str, Tensor], List[str]]:
    """Torchvision-layout tensors from a detectron2 checkpoint, and notes on the conversions applied."""
    model = content.get("model", content)
    prefix = find_prefix(model, "stem.conv1.weight")
    if prefix is None:
        if any(re.match(r"res\d_\d+_branch", k) for k in model):
            raise WeightsError(f"{source}: this is a Caffe2-named detectron2 file (res2_0_branch2a_w, ...); convert "
                               "it with detectron2's own loader first and save its model state dict")
        raise WeightsError(f"{source}: no detectron2 trunk found (no '*stem.conv1.weight' key)")
    author = str(content.get("__author__", "unknown"))
    stride_in_1x1 = content.get("stride_in_1x1", author not in ("torchvision", "resnext_backbones"))
    if stride_in_1x1:
        raise WeightsError(
            f"{source}: weights by {author!r} put the stride in the 1x1 conv (detectron2 RESNETS.STRIDE_IN_1X1=True, "
            "the MSRA/Caffe2 convention); this trunk puts it in the 3x3 as torchvision does. The shapes match but "
            "the network would differ, so it is refused. If you know the file uses STRIDE_IN_1X1=False, add "
            "'stride_in_1x1': False to its top-level dict.")
    state, notes = {}, [f"detectron2 names -> torchvision names (author {author!r})"]
    for key, value in model.items():
        if not key.startswith(prefix):
            continue
        name = _rename(key[len(prefix):], to_d2=False)
        if name is not None:
            state[name] = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
    input_format = content.get("input_format", "RGB" if author == "torchvision" else "BGR")
    if input_format == "BGR":
        state["conv1.weight"] = state["conv1.weight"].flip(1)
        notes.append("stem conv1 input channels flipped BGR -> RGB (detectron2 INPUT.FORMAT=BGR)")
    return state, notes


# -------------------------------------------------------------------------------------------------- reader

def detect(content: Mapping) -> bool:
    model = content.get("model")
    return find_prefix(model if isinstance(model, Mapping) else content, "stem.conv1.weight") is not None


def read(content: Mapping, source: str) -> Tuple[Dict[str, Tensor], List[str]]:
    return from_detectron2(content if isinstance(content.get("model"), Mapping) else {"model": content}, source)


# -------------------------------------------------------------------------------------------------- writer

def write(state: Mapping[str, Tensor], path: Path, spec: ResNeXtSpec,
          normalization: Optional[dict] = None) -> None:
    """A detectron2 pickle of numpy arrays (``matching_heuristics``, ``stride_in_1x1=False``, RGB input)."""
    with open(path, "wb") as f:
        pickle.dump(to_detectron2(state), f)


WRITERS = {"detectron2": write}
