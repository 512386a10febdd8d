"""Semantic segmentation heads over a trunk's or an FPN's feature maps, and the model that joins them: pure PyTorch.

- :class:`SemanticFPNHead`: Panoptic FPN's semantic branch (Kirillov et al., CVPR 2019; detectron2's
  ``SemSegFPNHead``, mmsegmentation's ``FPNHead``) on P2-P5: each level brought to stride 4 by 3x3 conv-GN-ReLU
  blocks, each followed by 2x bilinear upsampling, the levels summed, a 1x1 convolution to the classes.
- :class:`UPerHead`: UPerNet's head (Xiao et al., ECCV 2018) as mmsegmentation's ``UPerHead``: a pyramid pooling
  module on C5 (pool scales 1, 2, 3, 6), an FPN over C2-C4 with its top-down sums, every level upsampled to C2's size,
  concatenated and fused by a 3x3 conv-BN-ReLU, dropout 0.1, a 1x1 convolution to the classes.
- torchvision's ``DeepLabHead`` and ``FCNHead`` (:mod:`torchvision.models.segmentation`) on C5 of a dilated trunk;
  ``FCNHead`` on C4 is also the auxiliary head (mmsegmentation's UPerNet auxiliary ``FCNHead``: one 3x3 conv of 256
  channels, dropout 0.1).

A head takes the list of its input maps, finest first, and returns logits at the finest map's resolution;
:class:`SegmentationModel` resizes them to the input's size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationModel", "SemanticFPNHead", "UPerHead", "conv_norm_relu", "resize"]


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize without corner alignment (mmsegmentation's ``align_corners=False`` and torchvision's)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_norm_relu(cin: int, cout: int, kernel: int, norm: str = "bn") -> nn.Sequential:
    """Convolution (no bias: the norm has one), ``bn`` (BatchNorm) or ``gn`` (GroupNorm of 32 groups), ReLU: mmcv's
    ``ConvModule`` and detectron2's ``Conv2d`` with a norm, with the same state dict layout as torchvision's
    ``Conv2dNormActivation`` (``0.weight``, ``1.*``)."""
    if norm not in ("bn", "gn"):
        raise ValueError(f"head norm={norm!r} is not supported; choose bn or gn")
    layer = nn.BatchNorm2d(cout) if norm == "bn" else nn.GroupNorm(32, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), layer, nn.ReLU(inplace=True))


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch over FPN levels of ``in_channels`` channels at ``strides`` (P2-P5: 4, 8, 16,
    32). A level at stride ``s`` goes through ``max(1, log2(s / 4))`` blocks of 3x3 conv-GN-ReLU (``channels``), each
    but a stride-4 level's followed by 2x bilinear upsampling; the sum of the levels (each resized to P2's size where
    an odd input size leaves it off by a pixel, as mmsegmentation does) goes through ``dropout`` (2-d, as
    mmsegmentation's decode heads) and a 1x1 convolution to ``num_classes``. Published: 128 channels, GroupNorm
    (Panoptic FPN); mmsegmentation's ``FPNHead`` (configs/_base_/models/fpn_r50.py): 128 channels, SyncBN, dropout
    0.1."""

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int] = (4, 8, 16, 32),
                 channels: int = 128, norm: str = "gn", dropout: float = 0.0) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        finest = strides[0]
        for stride in strides:
            steps = max(1, (stride // finest).bit_length() - 1)
            layers: List[nn.Module] = []
            for k in range(steps):
                layers.append(conv_norm_relu(in_channels if k == 0 else channels, channels, 3, norm))
                if stride != finest:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: List[Tensor]) -> Tensor:
        out = self.scale_heads[0](levels[0])
        for head, level in zip(self.scale_heads[1:], levels[1:], strict=True):
            out = out + resize(head(level), out.shape[-2:])
        return self.predictor(self.dropout(out))


class UPerHead(nn.Module):
    """UPerNet's head over trunk maps of ``in_channels`` (C2-C5), as mmsegmentation's ``UPerHead`` (its
    ``upernet_r50`` recipe, configs/_base_/models/upernet_r50.py: ``channels`` 512, pool scales 1/2/3/6, SyncBN,
    dropout 0.1)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, norm: str = "bn") -> None:
        super().__init__()
        *finer, coarsest = in_channels
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_relu(
            coarsest, channels, 1, norm)) for scale in pool_scales)
        self.bottleneck = conv_norm_relu(coarsest + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(conv_norm_relu(c, channels, 1, norm) for c in finer)
        self.fpn_convs = nn.ModuleList(conv_norm_relu(channels, channels, 3, norm) for _ in finer)
        self.fpn_bottleneck = conv_norm_relu(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def pyramid_pooling(self, x: Tensor) -> Tensor:
        pooled = [resize(module(x), x.shape[-2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], 1))

    def forward(self, features: List[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features[:-1], strict=True)]
        laterals.append(self.pyramid_pooling(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        outs = [outs[0]] + [resize(x, outs[0].shape[-2:]) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class SegmentationModel(nn.Module):
    """``backbone`` (a :class:`~resnext_backbones.ResNeXt` trunk or a :class:`~resnext_backbones.ResNeXtFPN`,
    returning a dict of maps) -> ``decode_head`` over the maps named ``decode_inputs`` (a list of them; a single map
    itself for torchvision's heads) -> logits ``(N, classes, H, W)`` at the input's size (bilinear). In training,
    :meth:`forward_train` also gives the ``aux_head``'s logits on the map ``aux_input`` (for an auxiliary loss)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, decode_inputs: Sequence[str],
                 aux_head: Optional[nn.Module] = None, aux_input: Optional[str] = None) -> None:
        super().__init__()
        self.backbone, self.decode_head, self.aux_head = backbone, decode_head, aux_head
        self.decode_inputs, self.aux_input = tuple(decode_inputs), aux_input
        if (aux_head is None) != (aux_input is None):
            raise ValueError("give aux_head and aux_input together, or neither")

    def _decode(self, features, size) -> Tensor:
        inputs = [features[name] for name in self.decode_inputs]
        return resize(self.decode_head(inputs if len(inputs) > 1 else inputs[0]), size)

    def forward(self, images: Tensor) -> Tensor:
        return self._decode(self.backbone(images), images.shape[-2:])

    def forward_train(self, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(logits, auxiliary logits or None)``, both at the input's size."""
        features = self.backbone(images)
        aux: Union[Tensor, None] = None
        if self.aux_head is not None:
            aux = resize(self.aux_head(features[self.aux_input]), images.shape[-2:])
        return self._decode(features, images.shape[-2:]), aux
