"""Load a trunk (or an FPN backbone) from any supported weight source, with a report of what happened to every key.

Reading and converting a file is :mod:`resnext_backbones.formats`; this module matches the converted tensors
to a model's keys and shapes, and reads a trunk's spec off its shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

from . import formats, registry
from .files import PathLike, WeightsError
from .formats.torchvision import SHOW, find_prefix, split_trunk
from .trunk import STAGE_BLOCKS, ResNeXtSpec, normalization_for_channels

__all__ = ["LoadReport", "load_weights", "source_state_dict", "infer_spec", "adapt_input_conv"]

log = logging.getLogger("resnext_backbones")


@dataclass
class LoadReport:
    """What :func:`load_weights` did with every key of the source."""

    source: str
    format: str
    loaded: List[str] = field(default_factory=list)
    converted: List[str] = field(default_factory=list)  # notes on conversions applied (renames, BGR -> RGB, ...)
    missing: List[str] = field(default_factory=list)  # model keys the source lacks (left at init)
    unexpected: List[str] = field(default_factory=list)  # source keys the model lacks
    mismatched: List[str] = field(default_factory=list)  # same key, different shape
    ignored: List[str] = field(default_factory=list)  # source keys deliberately not used (fc.*, heads, ...)
    normalization: Optional[Dict[str, tuple]] = None  # the input mean/std the source records (RGB, [0, 1])

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        lines += [f"  converted: {note}" for note in self.converted]
        for name in ("missing", "unexpected", "mismatched", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:SHOW])}{' ...' if len(keys) > SHOW else ''}")
        return "\n".join(lines)


def adapt_input_conv(weight: Tensor, channels: int) -> Tensor:
    """A stem convolution's weight ``(out, 3, k, k)`` for ``channels`` input channels, as timm's
    ``adapt_input_conv``: 1 channel, the sum over RGB (a gray image fed to all three gives the same response);
    more than 3 (or 2), RGB's weights repeated and scaled by ``3 / channels`` (the response to an input whose
    channels are alike keeps its size)."""
    if weight.shape[1] != 3:
        raise WeightsError(f"a stem of {weight.shape[1]} input channels cannot be adapted to {channels}; only RGB "
                           "(3) stems can")
    original = weight.dtype
    weight = weight.float()
    if channels == 1:
        return weight.sum(dim=1, keepdim=True).to(original)
    repeats = -(-channels // 3)
    return (weight.repeat(1, repeats, 1, 1)[:, :channels] * (3 / channels)).to(original)


def source_state_dict(source: Union[PathLike, Mapping], *, expected_sha256: Optional[str] = None,
                      model: Optional[str] = None) -> Dict[str, Tensor]:
    """The flat tensors of any supported file or weights name, converted to torchvision names (detectron2
    renamed, BGR flipped)."""
    return formats.read(source, expected_sha256=expected_sha256, model=model).state


def _pick(state: Mapping[str, Tensor], model: nn.Module) -> Tuple[Dict[str, Tensor], List[str], str]:
    """The source tensors for ``model``'s keys, with the prefix that locates them, and the keys not used."""
    is_fpn = hasattr(model, "body") and hasattr(model, "fpn")
    if is_fpn:
        prefix = find_prefix(state, "body.conv1.weight", also="fpn.inner_blocks.0.0.weight")
        if prefix is not None:
            picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return picked, [k for k in state if not k.startswith(prefix)], prefix or "<root>"
    trunk, others, prefix = split_trunk(state)
    if is_fpn:
        trunk = {"body." + k: v for k, v in trunk.items()}
    return trunk, others, prefix or "<root>"


def load_weights(model: nn.Module, source: Union[PathLike, Mapping, formats.Source], *, strict: bool = True,
                 expected_sha256: Optional[str] = None) -> LoadReport:
    """Load a trunk (or an FPN backbone) from any supported file, registered weights name (``<model>.<tag>``,
    the tag alone, or ``DEFAULT``: :func:`resnext_backbones.list_weights`) or state dict, and report what
    happened. The input normalisation the source records (registry entry, our safetensors) becomes the trunk's
    ``normalization``.

    Strict (default): every trunk key must be present with the right shape, and no trunk-shaped key may be left
    over, else :class:`WeightsError` lists the first offenders. ``strict=False`` loads what fits and reports the
    rest. Classification heads (``fc.*``), keys outside the trunk, and stages the model does not build are
    reported as ignored; BatchNorm's ``num_batches_tracked`` is neither required nor reported.

    ``expected_sha256``: the sha256 of the file's bytes (``sha256sum FILE``; the full digest or a prefix of at
    least 8 hex characters). The file is checked before it is parsed; a mismatch raises :class:`WeightsError`.
    """
    trunk = getattr(model, "body", model)
    state, fmt, notes, name, normalization = formats.read(source, expected_sha256=expected_sha256,
                                                          model=registry.model_of(trunk.spec))
    picked, others, prefix = _pick(state, model)
    report = LoadReport(source=name, format=fmt, normalization=normalization,
                        converted=notes + ([f"trunk found under prefix {prefix!r}"] if prefix != "<root>" else []))
    report.ignored = list(others)
    target = model.state_dict()
    body = "body." if hasattr(model, "body") else ""
    unbuilt = tuple(f"{body}layer{i}." for i in range(1, 5)
                    if not any(k.startswith(f"{body}layer{i}.") for k in target))
    usable: Dict[str, Tensor] = {}
    order = {k: i for i, k in enumerate(target)}  # report in network order, not the file's
    stem = f"{body}conv1.weight"
    if stem in picked and stem in target and picked[stem].dim() == 4 and picked[stem].shape[1] == 3 \
            and target[stem].shape[1] != 3 and picked[stem].shape[0] == target[stem].shape[0]:
        channels = target[stem].shape[1]
        picked = {**picked, stem: adapt_input_conv(picked[stem], channels)}
        report.converted.append(f"stem {stem} adapted from 3 to {channels} input channels (timm's adapt_input_conv: "
                                + ("summed over RGB)" if channels == 1 else f"RGB repeated, scaled by 3/{channels})"))
    for key, value in sorted(picked.items(), key=lambda kv: order.get(kv[0], len(order))):
        if key.endswith("num_batches_tracked") and key not in target:
            continue
        if key not in target:
            (report.ignored if key.startswith(("fc.", "body.fc.")) or key.startswith(unbuilt)
             else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            usable[key] = value.to(dtype=target[key].dtype)
    is_fpn_trunk_only = hasattr(model, "fpn") and not any(k.startswith("fpn.") for k in picked)
    report.missing = [k for k in target if k not in picked and not k.endswith("num_batches_tracked")
                      and not (is_fpn_trunk_only and k.startswith("fpn."))]
    if is_fpn_trunk_only:
        report.converted.append("trunk only: the FPN layers keep their initialisation")
    if strict and not report.ok:
        raise WeightsError(f"weights in {name} do not fit {type(model).__name__} "
                           f"(spec {getattr(getattr(model, 'body', model), 'spec', '?')}):\n{report}\n"
                           "Pick the matching model, or pass strict=False to load what fits.")
    model.load_state_dict(usable, strict=False)
    if normalization is not None:
        trunk.normalization = normalization_for_channels(normalization, getattr(trunk, "in_channels", 3))
        report.converted.append(f"input normalisation of the weights: mean {normalization['mean']}, "
                                f"std {normalization['std']} (RGB, [0, 1])"
                                + ("" if trunk.normalization["mean"] == tuple(normalization["mean"]) else
                                   f", for {trunk.in_channels} channels mean {trunk.normalization['mean']}, "
                                   f"std {trunk.normalization['std']}"))
    report.loaded = sorted(usable)
    log.info("%s", report)
    return report


def infer_spec(state: Mapping[str, Tensor]) -> ResNeXtSpec:
    """The spec of a torchvision-layout trunk state dict, read off its shapes (blocks per stage, 3x3 groups)."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.") and k.endswith("conv1.weight")})
                   for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = next((d for d, (b, n) in STAGE_BLOCKS.items() if b == bottleneck and n == blocks), None)
    if depth is None:
        raise WeightsError(f"cannot tell the depth of a trunk with {blocks} {'bottleneck' if bottleneck else 'basic'} "
                           f"blocks per stage; known: { {d: n for d, (_, n) in STAGE_BLOCKS.items()} }")
    if not bottleneck:
        return ResNeXtSpec(depth)
    conv2 = state["layer1.0.conv2.weight"]
    width, per_group = conv2.shape[0], conv2.shape[1]
    cardinality = width // per_group
    return ResNeXtSpec(depth, cardinality, per_group)  # first stage: planes 64, so width per group == base_width
