"""The ResNeXt trunk: aggregated residual transformations (Xie et al., CVPR 2017) exposing C2-C5.

One class, configured by ``depth``, ``cardinality`` and ``base_width``, and one table of named specs.
Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``) so that
state dicts move between the two without renaming. Model code only: building from a name with weights is
:mod:`resnext_backbones.builders`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from .fused import FusedBlock, FusedConv2d

__all__ = ["ResNeXt", "ResNeXtSpec", "Bottleneck", "BasicBlock", "MODELS", "FEATURES", "NORMS", "STAGE_BLOCKS",
           "IMAGENET_MEAN", "IMAGENET_STD", "list_models", "make_norm", "resolve_returned_features",
           "normalization_for_channels"]

FEATURES = ("c2", "c3", "c4", "c5")
NORMS = ("bn", "frozen_bn", "sync_bn", "gn")

# The input normalisation of ImageNet-pretrained trunks (RGB in [0, 1]), torchvision's and timm's default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def normalization_for_channels(normalization: Dict[str, Sequence[float]], channels: int) -> Dict[str, tuple]:
    """An RGB mean/std for ``channels`` input channels, following what :func:`~resnext_backbones.loading.
    adapt_input_conv` does to an RGB stem: 1 channel (its weights summed over RGB) the average of the three; more
    than 3 (RGB's weights repeated) RGB's values repeated, channel ``k`` taking RGB channel ``k % 3``'s. A mean/std
    that already has ``channels`` entries is kept."""
    mean, std = (tuple(float(v) for v in normalization[k]) for k in ("mean", "std"))
    if len(mean) == channels and len(std) == channels:
        return {"mean": mean, "std": std}
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"a normalisation of {len(mean)} channels (mean {list(mean)}) cannot be adapted to "
                         f"{channels} input channels; give one mean and std per channel")
    if channels == 1:
        return {"mean": (sum(mean) / 3,), "std": (sum(std) / 3,)}
    return {"mean": tuple(mean[k % 3] for k in range(channels)), "std": tuple(std[k % 3] for k in range(channels))}


# depth -> (bottleneck?, blocks per stage). Bottleneck depth = 3 * sum(blocks) + 2, two-layer: 2 * sum + 2.
STAGE_BLOCKS: Dict[int, tuple] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    26: (True, (2, 2, 2, 2)),
    38: (True, (3, 3, 3, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}


@dataclass(frozen=True)
class ResNeXtSpec:
    """What makes a trunk: depth, cardinality (groups of the 3x3 conv) and base width (channels per group
    in the first stage). ``ResNeXtSpec(50, 32, 4)`` is ResNeXt-50 (32x4d); ``cardinality=1, base_width=64`` is
    a plain ResNet."""

    depth: int
    cardinality: int = 1
    base_width: int = 64

    def __post_init__(self) -> None:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"depth={self.depth!r} is not supported; choose one of {sorted(STAGE_BLOCKS)}")
        if not isinstance(self.cardinality, int) or self.cardinality < 1:
            raise ValueError(f"cardinality={self.cardinality!r} must be a positive integer")
        if not isinstance(self.base_width, int) or self.base_width < 1:
            raise ValueError(f"base_width={self.base_width!r} must be a positive integer")
        if not self.bottleneck and (self.cardinality, self.base_width) != (1, 64):
            raise ValueError(
                f"depth={self.depth} uses two-layer basic blocks, which take cardinality=1 and base_width=64 "
                f"(got {self.cardinality}x{self.base_width}d): grouping a two-layer block only makes it wider, "
                f"it does not split a bottleneck. Use a bottleneck depth ({self.bottleneck_depths}) for ResNeXt.")

    @property
    def bottleneck(self) -> bool:
        return STAGE_BLOCKS[self.depth][0]

    @property
    def blocks(self) -> tuple:
        return STAGE_BLOCKS[self.depth][1]

    @property
    def bottleneck_depths(self) -> List[int]:
        return sorted(d for d, (b, _) in STAGE_BLOCKS.items() if b)

    def as_dict(self) -> dict:
        return asdict(self)


# The one table of named variants. Published parameter counts are checked in tests/test_paper.py.
MODELS: Dict[str, ResNeXtSpec] = {
    "resnet18": ResNeXtSpec(18),
    "resnet34": ResNeXtSpec(34),
    "resnet50": ResNeXtSpec(50),
    "resnet101": ResNeXtSpec(101),
    "resnet152": ResNeXtSpec(152),
    "resnext26_32x4d": ResNeXtSpec(26, 32, 4),
    "resnext38_32x4d": ResNeXtSpec(38, 32, 4),
    "resnext50_32x4d": ResNeXtSpec(50, 32, 4),
    "resnext101_32x4d": ResNeXtSpec(101, 32, 4),
    "resnext101_32x8d": ResNeXtSpec(101, 32, 8),
    "resnext101_64x4d": ResNeXtSpec(101, 64, 4),
    "resnext152_32x4d": ResNeXtSpec(152, 32, 4),
}


def list_models() -> List[str]:
    """Names accepted by :func:`resnext` and :func:`resnext_fpn`."""
    return list(MODELS)


def make_norm(norm: str) -> Callable[[int], nn.Module]:
    """Norm-layer factory for ``norm`` in ``NORMS``. GroupNorm uses 32 groups (Wu & He, 2018)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "sync_bn":
        return nn.SyncBatchNorm
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"norm={norm!r} is not supported; choose one of {list(NORMS)}")


def resolve_returned_features(returned: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The trunk features to return, in stride order (default: all of ``FEATURES``)."""
    features = FEATURES if returned is None else tuple(returned)
    if not features or any(f not in FEATURES for f in features) or len(set(features)) != len(features):
        raise ValueError(f"returned_features={features!r} must be a non-empty subset of {FEATURES}")
    return tuple(f for f in FEATURES if f in features)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), groups=groups, bias=False,
                     dilation=dilation)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 grouped (``cardinality`` paths of ``width / cardinality`` channels) -> 1x1 expand.

    The grouped 3x3 is form (c) of the paper's Fig. 3, equivalent to summing ``cardinality`` split-transform
    paths (form a). Stride sits on the 3x3, as in torchvision (not on the 1x1 as in the original Caffe2 models).
    """

    expansion = 4
    num_convs = 3  # conv1..conv3, each followed by bn1..bn3

    def __init__(self, cin: int, planes: int, stride: int, cardinality: int, base_width: int,
                 norm: Callable[[int], nn.Module], dilation: int = 1) -> None:
        super().__init__()
        width = int(planes * base_width / 64) * cardinality
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 1), norm(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride, cardinality, dilation), norm(width)
        self.conv3, self.bn3 = _conv(width, cout, 1), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: one activation-sized allocation less per block
        return self.relu(out)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1
    num_convs = 2

    def __init__(self, cin: int, planes: int, stride: int, cardinality: int, base_width: int,
                 norm: Callable[[int], nn.Module], dilation: int = 1) -> None:
        super().__init__()
        if dilation > 1:
            raise ValueError("replace_stride_with_dilation needs bottleneck blocks (depth 26 and up); the two-layer "
                             "blocks of ResNet-18/34 take no dilation (as in torchvision)")
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), norm(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _shortcut(cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> Optional[nn.Module]:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), norm(cout))


class ResNeXt(nn.Module):
    """ResNeXt trunk returning ``{"c2": .., "c3": .., "c4": .., "c5": ..}`` (strides 4, 8, 16, 32).

    ``returned_features`` picks the features returned; stages after
    the last one are not built (as torchvision's ``IntermediateLayerGetter``). ``trainable_stages`` (0..5)
    freezes exactly what torchvision's ``trainable_layers`` freezes: parameters get ``requires_grad=False`` and
    BatchNorm layers of frozen parts stay in eval mode under ``.train()``.

    ``replace_stride_with_dilation`` (three bools, for C3, C4, C5; torchvision's argument of that name): each stage
    set keeps the resolution of the one before and dilates its 3x3 convolutions instead, as torchvision does
    (``(False, True, True)``: output stride 8, the DeepLabV3 / FCN trunk). ``strides`` tells the result; the
    weights and the state dict are those of the undilated trunk.

    ``normalization`` (``{"mean", "std"}``, one entry per input channel, images in [0, 1]) is the input
    normalisation the trunk's weights expect: ImageNet's, until weights that record another are loaded (a registry
    entry, our safetensors). Data pipelines and the tasks read it; it is not part of the state dict.

    ``in_channels``: channels of the input images (1 gray, 4 RGB-D or RGB-NIR, 13 Sentinel-2, ...). RGB weights
    load into another count with the stem adapted (:func:`~resnext_backbones.loading.adapt_input_conv`), and the
    default normalisation follows (:func:`normalization_for_channels`).
    """

    def __init__(self, spec: ResNeXtSpec, *, norm: str = "bn", trainable_stages: int = 5,
                 returned_features: Optional[Sequence[str]] = None, zero_init_residual: bool = False,
                 in_channels: int = 3, replace_stride_with_dilation: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels={in_channels!r} must be a positive integer (3 for RGB)")
        features = resolve_returned_features(returned_features)
        dilate = (False, False, False) if replace_stride_with_dilation is None else \
            tuple(bool(d) for d in replace_stride_with_dilation)
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation={replace_stride_with_dilation!r} must be three bools, "
                             "for the stages of C3, C4 and C5 (e.g. [false, true, true]: output stride 8)")
        self.replace_stride_with_dilation = dilate
        if not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages={trainable_stages!r} must be an integer in 0..5 "
                             "(0 freezes everything, 5 trains the stem too)")
        self.spec, self.norm = spec, norm
        self.in_channels = in_channels
        self.normalization = normalization_for_channels({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, in_channels)
        self.returned_features = features
        self.trainable_stages = trainable_stages
        norm_layer = make_norm(norm)
        block = Bottleneck if spec.bottleneck else BasicBlock

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.num_stages = FEATURES.index(features[-1]) + 1
        self.out_channels: Dict[str, int] = {}
        self.strides: Dict[str, int] = {}
        cin, stride_so_far, dilation = 64, 4, 1
        for i, blocks in enumerate(spec.blocks[: self.num_stages]):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            first_dilation = dilation  # torchvision: a dilated stage's first block keeps the previous dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            stride_so_far *= stride
            layers: List[nn.Module] = []
            for j in range(blocks):
                layers.append(block(cin, planes, stride if j == 0 else 1, spec.cardinality, spec.base_width,
                                    norm_layer, first_dilation if j == 0 else dilation))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            if FEATURES[i] in features:
                self.out_channels[FEATURES[i]] = cin
                self.strides[FEATURES[i]] = stride_so_far

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each residual branch starts as identity (Goyal et al., 2017)
            for m in self.modules():
                if isinstance(m, (Bottleneck, BasicBlock)):
                    last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                    if getattr(last, "weight", None) is not None:
                        nn.init.zeros_(last.weight)
        self._freeze()


    def stages(self) -> List[nn.Sequential]:
        """The built stages ``layer1..layerN``, in order (stage ``i`` gives ``FEATURES[i]``)."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def _frozen_prefixes(self) -> List[str]:
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: self.trainable_stages]
        if self.trainable_stages == 5:
            trainable.append("bn1")
        return [name for name, _ in self.named_children() if name not in trainable and name != "relu"]

    def _freeze(self) -> None:
        for name in self._frozen_prefixes():
            for p in getattr(self, name).parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNeXt:
        super().train(mode)
        if mode:  # frozen parts keep their running statistics
            for name in self._frozen_prefixes():
                getattr(self, name).eval()
        return self

    @torch.no_grad()
    def fuse(self) -> ResNeXt:
        """Turn the trunk into its inference form (:mod:`resnext_backbones.fused`): every norm folded into the
        convolution before it, ReLU and the residual add fused in; on the CPU, one oneDNN kernel per convolution
        on weights reordered once. Same features to float tolerance.

        In place; returns ``self``. The fused trunk has conv biases instead of norm layers, so its state dict no
        longer matches torchvision's: fuse after loading weights, and do not train it. GroupNorm depends on the
        input and cannot be folded.
        """
        if self.training:
            raise RuntimeError("fuse() is for inference: call .eval() first")
        if self.norm == "gn":
            raise ValueError("norm='gn' cannot be fused: GroupNorm's statistics depend on the input")
        if not isinstance(self.conv1, FusedConv2d):  # a second call has nothing left to do
            self.conv1, self.bn1, self.relu = FusedConv2d(self.conv1, self.bn1, relu=True), nn.Identity(), nn.Identity()
        for layer in self.stages():
            for i, block in enumerate(layer):
                if isinstance(block, (Bottleneck, BasicBlock)):
                    layer[i] = FusedBlock(block, reuse_input=True)  # forward() never reads it again
        return self

    def fused(self, dtype: Optional[torch.dtype] = None) -> ResNeXt:
        """A copy of this trunk in inference form (:meth:`fuse`), channels_last, in ``dtype`` (default: this
        trunk's): e.g. ``trunk.fused(torch.bfloat16)`` runs oneDNN's bf16 kernels on CPUs with AMX. Feed it
        channels_last input of that dtype. This trunk is left as it is (training mode, weights and all): train on,
        and call ``fused()`` again for the current weights. ``norm="gn"`` cannot be fused (``ValueError``)."""
        if self.norm == "gn":
            raise ValueError("norm='gn' cannot be fused: GroupNorm's statistics depend on the input")
        with torch.device("meta"):  # no initialisation: every tensor comes from this trunk's state dict
            copy = ResNeXt(self.spec, norm="frozen_bn" if self.norm == "frozen_bn" else "bn",  # sync_bn: bn in eval
                           returned_features=self.returned_features, in_channels=self.in_channels,
                           replace_stride_with_dilation=self.replace_stride_with_dilation)
        copy.load_state_dict(self.state_dict(), assign=True)  # shares tensors until fuse() folds them into new ones
        copy.normalization = dict(self.normalization)
        return copy.eval().fuse().to(dtype=dtype, memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: Dict[str, Tensor] = {}
        for i, stage in enumerate(self.stages()):
            x = stage(x)
            if FEATURES[i] in self.returned_features:
                out[FEATURES[i]] = x
        return out
