"""FPN adapter: a ResNeXt trunk plus torchvision's ``FeaturePyramidNetwork``, shaped for torchvision's detectors.

The module layout (``body.*``, ``fpn.*``) and output names (``"0".."3"``, ``"pool"`` or ``"p6"``, ``"p7"``) are
those of torchvision's ``BackboneWithFPN``, so its state dicts load strictly and its detectors take this as is.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from .trunk import FEATURES, ResNeXt, resolve_spec

__all__ = ["ResNeXtFPN", "resnext_fpn", "EXTRA_BLOCKS"]

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
    """Trunk features ``returned_features`` -> FPN levels of ``out_channels`` channels each."""

    def __init__(self, body: ResNeXt, *, out_channels: int = 256, extra_blocks: Optional[str] = "pool") -> None:
        super().__init__()
        self.body = body
        self.returned_features: List[str] = list(body.out_features)
        self.fpn = FeaturePyramidNetwork([body.out_channels[f] for f in self.returned_features], out_channels,
                                         extra_blocks=_extra_block(extra_blocks, out_channels))
        self.out_channels = out_channels
        self.extra_blocks = extra_blocks

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats = self.body(x)
        levels: Dict[str, Tensor] = OrderedDict()
        for i, name in enumerate(self.returned_features):
            levels[str(i)] = feats[name]
        return self.fpn(levels)


def resnext_fpn(name: Optional[str] = None, *, depth: Optional[int] = None, cardinality: Optional[int] = None,
                base_width: Optional[int] = None, out_channels: int = 256,
                returned_features: Sequence[str] = FEATURES, extra_blocks: Optional[str] = "pool",
                trainable_stages: int = 3, norm: str = "frozen_bn", weights: Optional[str] = None,
                strict: bool = True) -> ResNeXtFPN:
    """A ResNeXt-FPN backbone for torchvision detectors (``FasterRCNN(resnext_fpn(...), num_classes=91)``).

    ``returned_features=("c3", "c4", "c5")`` with ``extra_blocks="p6p7"`` gives RetinaNet's and FCOS's P3-P7.
    ``weights`` may hold a trunk (any format :func:`resnext_backbones.load_weights` reads) or a whole
    ``BackboneWithFPN``/detector state dict.
    """
    spec = resolve_spec(name, depth=depth, cardinality=cardinality, base_width=base_width)
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels={out_channels!r} must be a positive integer")
    body = ResNeXt(spec, norm=norm, trainable_stages=trainable_stages, out_features=returned_features)
    model = ResNeXtFPN(body, out_channels=out_channels, extra_blocks=extra_blocks)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights, strict=strict)
    return model
