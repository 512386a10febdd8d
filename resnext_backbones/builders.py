"""Builders: a spec (a name or depth/cardinality/base width) plus weights -> a trunk or an FPN backbone.

The top of the library: it imports the model code and the weight loading; nothing in the library imports it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from . import registry
from .files import PathLike, check_sha256
from .formats.safetensors import backbone_metadata
from .fpn import ResNeXtFPN
from .loading import load_weights
from .trunk import MODELS, ResNeXt, ResNeXtSpec, list_models

__all__ = ["resolve_spec", "resnext", "resnext_fpn", "load_backbone"]


def resolve_spec(name: Optional[str] = None, *, depth: Optional[int] = None, cardinality: Optional[int] = None,
                 base_width: Optional[int] = None) -> ResNeXtSpec:
    """A named spec, or one from explicit arguments. Arguments given with a name must agree with it."""
    if name is None:
        if depth is None:
            raise ValueError(f"give a model name (one of {list_models()}) or depth=...")
        return ResNeXtSpec(depth, 1 if cardinality is None else cardinality, 64 if base_width is None else base_width)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}")
    spec = MODELS[name]
    given = {"depth": depth, "cardinality": cardinality, "base_width": base_width}
    clash = {k: v for k, v in given.items() if v is not None and v != getattr(spec, k)}
    if clash:
        raise ValueError(f"{name!r} is {spec}; conflicting arguments {clash}. Drop the name or the arguments.")
    return spec


def _model_name(name: Optional[str], depth: Optional[int], weights: Optional[PathLike],
                expected_sha256: Optional[str]) -> Optional[str]:
    """``name``, or the model a registered weights name ``<model>.<tag>`` is for, when neither a name nor a
    depth is given."""
    if weights is None and expected_sha256 is not None:
        raise ValueError("expected_sha256 is the digest of a weights file; give weights=... too")
    if name is None and depth is None and weights is not None:
        model, dot, _ = str(weights).partition(".")
        if dot and model in MODELS and str(weights) in registry.list_weights(model):
            return model
    return name


def resnext(name: Optional[str] = None, *, depth: Optional[int] = None, cardinality: Optional[int] = None,
            base_width: Optional[int] = None, norm: str = "bn", trainable_stages: int = 5,
            returned_features: Optional[Sequence[str]] = None, zero_init_residual: bool = False,
            replace_stride_with_dilation: Optional[Sequence[bool]] = None,
            weights: Optional[PathLike] = None, strict: bool = True,
            expected_sha256: Optional[str] = None, in_channels: int = 3) -> ResNeXt:
    """Build a ResNeXt trunk from a name in :func:`list_models` or from ``depth``/``cardinality``/``base_width``.

    ``returned_features``: the features to return (default all of c2..c5).
    ``replace_stride_with_dilation``: three bools (C3, C4, C5), torchvision's: ``(False, True, True)`` keeps C4 and
    C5 at stride 8 with dilated convolutions (DeepLabV3, FCN); the weights are the undilated trunk's.
    ``weights`` is a local file in any format :func:`resnext_backbones.load_weights` reads, or a registered name
    (:func:`resnext_backbones.list_weights`: ``"resnext50_32x4d.tv2_in1k"``, which also names the model; the tag
    alone, ``"tv2_in1k"``, with a model name; ``"DEFAULT"``), downloaded once, verified and cached.
    ``expected_sha256`` pins the file's sha256 (full digest or a prefix of at least 8 hex characters).
    ``in_channels``: channels of the input (default RGB's 3); RGB weights are adapted to it as timm's
    ``adapt_input_conv`` does (:func:`resnext_backbones.loading.adapt_input_conv`), and the load report says so.
    """
    name = _model_name(name, depth, weights, expected_sha256)
    spec = resolve_spec(name, depth=depth, cardinality=cardinality, base_width=base_width)
    model = ResNeXt(spec, norm=norm, trainable_stages=trainable_stages, returned_features=returned_features,
                    zero_init_residual=zero_init_residual, in_channels=in_channels,
                    replace_stride_with_dilation=replace_stride_with_dilation)
    if weights is not None:
        load_weights(model, weights, strict=strict, expected_sha256=expected_sha256)
    return model


def resnext_fpn(name: Optional[str] = None, *, depth: Optional[int] = None, cardinality: Optional[int] = None,
                base_width: Optional[int] = None, out_channels: int = 256,
                returned_features: Optional[Sequence[str]] = None, extra_blocks: Optional[str] = "pool",
                trainable_stages: int = 3, norm: str = "frozen_bn",
                weights: Optional[PathLike] = None, strict: bool = True,
                expected_sha256: Optional[str] = None, in_channels: int = 3) -> ResNeXtFPN:
    """A ResNeXt-FPN backbone for torchvision detectors (``FasterRCNN(resnext_fpn(...), num_classes=91)``).

    ``returned_features=("c3", "c4", "c5")`` with ``extra_blocks="p6p7"`` gives RetinaNet's and FCOS's P3-P7.
    ``weights`` may hold a trunk (any format :func:`resnext_backbones.load_weights` reads, or a registered name as
    for :func:`resnext`) or a whole
    ``BackboneWithFPN``/detector state dict; ``expected_sha256`` pins the file's sha256. ``in_channels`` as for
    :func:`resnext`.
    """
    name = _model_name(name, depth, weights, expected_sha256)
    spec = resolve_spec(name, depth=depth, cardinality=cardinality, base_width=base_width)
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels={out_channels!r} must be a positive integer")
    body = ResNeXt(spec, norm=norm, trainable_stages=trainable_stages, returned_features=returned_features,
                   in_channels=in_channels)
    model = ResNeXtFPN(body, out_channels=out_channels, extra_blocks=extra_blocks)
    if weights is not None:
        load_weights(model, weights, strict=strict, expected_sha256=expected_sha256)
    return model


def load_backbone(path: PathLike, *, expected_sha256: Optional[str] = None, **kwargs) -> ResNeXt:
    """Rebuild the trunk saved by :func:`resnext_backbones.save_backbone`; ``kwargs`` (``norm``,
    ``trainable_stages``, ``returned_features``, ...) override what was saved. ``expected_sha256`` pins the
    file's sha256, checked before anything in the file is read."""
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256)
    meta = backbone_metadata(path)
    spec = meta["spec"]
    kwargs.setdefault("norm", meta["norm"])
    kwargs.setdefault("returned_features", meta["returned_features"])
    kwargs.setdefault("in_channels", len(meta["mean"]))  # one mean per input channel
    return resnext(depth=spec.depth, cardinality=spec.cardinality, base_width=spec.base_width, weights=path,
                   expected_sha256=expected_sha256, **kwargs)
