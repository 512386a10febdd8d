"""FPN adapter: a ResNeXt trunk plus torchvision's ``FeaturePyramidNetwork``, shaped for torchvision's detectors.

The module layout (``body.*``, ``fpn.*``) and output names (``"0".."3"``, ``"pool"`` or ``"p6"``, ``"p7"``) are
those of torchvision's ``BackboneWithFPN``, so its state dicts load strictly and its detectors take this as is.
Model code only: :func:`resnext_backbones.resnext_fpn` (in :mod:`resnext_backbones.builders`) builds one from a
name and weights.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from .trunk import ResNeXt

__all__ = ["ResNeXtFPN", "EXTRA_BLOCKS"]

EXTRA_BLOCKS = ("pool", "p6p7", None)


def _extra_block(kind: Optional[str], out_channels: int) -> Optional[ExtraFPNBlock]:
    if kind == "pool":
        return LastLevelMaxPool()
    if kind == "p6p7":  # from P5, as torchvision's RetinaNet and FCOS
        return LastLevelP6P7(out_channels, out_channels)
    if kind is None:
        return None
    raise ValueError(f"extra_blocks={kind!r} is not supported; choose one of {list(EXTRA_BLOCKS)}")


class ResNeXtFPN(nn.Module):
    """The trunk's ``returned_features`` -> FPN levels ``"0".."N-1"`` (+ extra blocks) of ``out_channels``
    channels each."""

    def __init__(self, body: ResNeXt, *, out_channels: int = 256, extra_blocks: Optional[str] = "pool") -> None:
        super().__init__()
        self.body = body
        self.returned_features: List[str] = list(body.returned_features)
        self.fpn = FeaturePyramidNetwork([body.out_channels[f] for f in self.returned_features], out_channels,
                                         extra_blocks=_extra_block(extra_blocks, out_channels))
        self.out_channels = out_channels
        self.extra_blocks = extra_blocks

    @property
    def strides(self) -> Dict[str, int]:
        """Each output level's stride in input pixels: ``"0".."N-1"`` those of the trunk's features, ``"pool"`` twice
        the last, ``"p6"``/``"p7"`` twice and four times the last (torchvision's extra blocks)."""
        strides = {str(i): self.body.strides[name] for i, name in enumerate(self.returned_features)}
        last = strides[str(len(self.returned_features) - 1)]
        extra = {"pool": {"pool": 2 * last}, "p6p7": {"p6": 2 * last, "p7": 4 * last}, None: {}}[self.extra_blocks]
        return {**strides, **extra}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats = self.body(x)
        levels: Dict[str, Tensor] = OrderedDict()
        for i, name in enumerate(self.returned_features):
            levels[str(i)] = feats[name]
        return self.fpn(levels)

