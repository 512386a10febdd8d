"""Load, convert and save trunk weights across ecosystems, with a report of what happened to every key.

Formats, detected from the file's content (not its name):

============== ===================================================================================================
torchvision    flat state dict ``conv1.weight``, ``layer1.0.conv1.weight``, ... (``fc.*`` optional); timm's ResNet
               uses the same names. Also detector / ``BackboneWithFPN`` state dicts (``backbone.body.``, ``body.``)
               and any checkpoint that nests one of these (``model.``, ``state_dict``) -- the trunk is found
               whatever its prefix.
mmdet          mmdet/mmpretrain checkpoints: ``{"state_dict": {"backbone.conv1.weight", ...}, "meta": ...}``.
lightning      Lightning checkpoints: ``{"state_dict": ..., "pytorch-lightning_version": ...}``.
detectron2     ``{"model": {"stem.conv1.weight", "res2.0.conv1.norm.weight", "res2.0.shortcut.weight", ...}}``
               with numpy arrays (``.pkl``) or tensors (``.pth``). Two traps are handled explicitly: detectron2's
               default input is BGR (the stem's input channels are flipped to RGB, and the report says so), and
               MSRA/Caffe2-trained ResNets put the stride in the 1x1 conv (``STRIDE_IN_1X1``) where this trunk puts
               it in the 3x3 -- same shapes, different network, so such files are refused rather than mis-loaded.
safetensors    files written by :func:`save_backbone`: the trunk's tensors, its spec, input normalisation and a
               sha256 of the tensors in the metadata, so :func:`load_backbone` rebuilds the trunk with no name.
============== ===================================================================================================

Nothing here executes code from a file: pickles load with ``torch.load(weights_only=True)`` or, for plain
(detectron2) pickles, an unpickler that admits only numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .trunk import STAGE_BLOCKS, ResNeXt, ResNeXtSpec, resnext

__all__ = ["LoadReport", "WeightsError", "load_weights", "read_weights", "source_state_dict", "split_trunk",
           "infer_spec", "save_backbone", "load_backbone", "to_detectron2", "from_detectron2", "IMAGENET_MEAN",
           "IMAGENET_STD"]

log = logging.getLogger("resnext_backbones")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAFETENSORS_FORMAT = "resnext_backbones"
_SHOW = 5  # how many offending keys an error lists

PathLike = Union[str, Path]


class WeightsError(ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the model."""


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

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        lines += [f"  converted: {note}" for note in self.converted]
        for name in ("missing", "unexpected", "mismatched", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:_SHOW])}{' ...' if len(keys) > _SHOW else ''}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- reading files

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other global (no code execution)."""

    _ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_weights(path: PathLike) -> Tuple[Dict, Dict[str, str]]:
    """Read a weight file safely: ``(content, safetensors_metadata)``. Raises :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    refused = ("it holds Python objects other than tensors and plain containers, and loading them could run code. "
               "Re-save just the state dict (torch.save(model.state_dict(), path)) or convert it to safetensors")
    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as e:
            raise WeightsError(f"refusing to load {str(path)!r}: {refused}. ({str(e).splitlines()[0]})") from None
    with open(path, "rb") as f:
        try:
            content = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"refusing to load {str(path)!r}: {refused}. ({e})") from None
        except Exception as e:  # noqa: BLE001 - any other failure means it is not a pickle we know
            raise WeightsError(f"{str(path)!r} is not a weight file this library reads (safetensors, torch "
                               f"checkpoint or detectron2 pickle): {type(e).__name__}: {e}") from None
    if isinstance(content, int):  # torch's legacy (non-zip) format starts with a pickled magic number
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as e:
            raise WeightsError(f"refusing to load {str(path)!r}: {refused}. ({str(e).splitlines()[0]})") from None
    if not isinstance(content, Mapping):
        raise WeightsError(f"{str(path)!r} holds a {type(content).__name__}, not a dict of weights")
    return dict(content), {}


# ---------------------------------------------------------------------------------------- detectron2 naming

# One table, used both ways: torchvision name <-> detectron2 name. {s} stage, {b} block, {k} conv, {t} tensor.
_D2_NAMES = [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.{t}", "stem.conv1.norm.{t}"),
    ("layer{s}.{b}.conv{k}.weight", "res{s}.{b}.conv{k}.weight"),
    ("layer{s}.{b}.bn{k}.{t}", "res{s}.{b}.conv{k}.norm.{t}"),
    ("layer{s}.{b}.downsample.0.weight", "res{s}.{b}.shortcut.weight"),
    ("layer{s}.{b}.downsample.1.{t}", "res{s}.{b}.shortcut.norm.{t}"),
]
_STAGE_OFFSET = 1  # torchvision layer1 is detectron2 res2


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\w+)", re.escape(template)) + "$")


def _rename(key: str, to_d2: bool) -> Optional[str]:
    for tv, d2 in _D2_NAMES:
        src, dst = (tv, d2) if to_d2 else (d2, tv)
        m = _template_regex(src).match(key)
        if m:
            fields = m.groupdict()
            if "s" in fields:
                fields["s"] = str(int(fields["s"]) + (_STAGE_OFFSET if to_d2 else -_STAGE_OFFSET))
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
    prefix = _find_prefix(model, "stem.conv1.weight")
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


# ------------------------------------------------------------------------------------------------- matching

def _find_prefix(keys, suffix: str, also: str = "") -> Optional[str]:
    """The shortest prefix P with ``P + suffix`` (and ``P + also``) among ``keys``."""
    found = [k[: -len(suffix)] for k in keys if k.endswith(suffix) and (not also or k[: -len(suffix)] + also in keys)]
    return min(found, key=len) if found else None


def _unwrap(content: Dict) -> Tuple[Dict, str]:
    """The state dict inside a checkpoint, and the name of its format."""
    if "pytorch-lightning_version" in content or "lightning_version" in content:
        return content["state_dict"], "lightning"
    if isinstance(content.get("state_dict"), Mapping):
        return content["state_dict"], "mmdet"
    if isinstance(content.get("model"), Mapping):
        model = content["model"]
        if _find_prefix(model, "stem.conv1.weight") is not None:
            return content, "detectron2"
        return model, "torchvision"
    if _find_prefix(content, "stem.conv1.weight") is not None:
        return {"model": content}, "detectron2"
    return content, "torchvision"


def _sha256(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _source_state(source: Union[PathLike, Mapping]) -> Tuple[Dict[str, Tensor], str, List[str], str]:
    """(flat tensors, format, conversion notes, source name) for a path or an in-memory dict."""
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    if isinstance(source, Mapping):
        content, meta = dict(source), {}
    else:
        content, meta = read_weights(source)
    if meta.get("format") == SAFETENSORS_FORMAT:
        expected = meta.get("sha256")
        if expected and _sha256(content) != expected:
            raise WeightsError(f"{name}: the tensors do not match the sha256 in the file's metadata; the file is "
                               "corrupt or was altered after export")
        return content, "safetensors", [], name
    if meta:
        return content, "safetensors", [], name
    state, fmt = _unwrap(content)
    notes: List[str] = []
    if fmt == "detectron2":
        state, notes = from_detectron2(state, name)
    return dict(state), fmt, notes, name


def source_state_dict(source: Union[PathLike, Mapping]) -> Dict[str, Tensor]:
    """The flat tensors of any supported file, converted to torchvision names (detectron2 renamed, BGR flipped)."""
    return _source_state(source)[0]


def split_trunk(state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], str]:
    """``(trunk tensors without their prefix, the other keys, the prefix)``: the trunk is found whatever its
    prefix (``backbone.``, ``model.backbone.body.``, ...), as the ``conv1.weight`` next to ``layer1.0.conv1.weight``."""
    prefix = _find_prefix(state, "conv1.weight", also="layer1.0.conv1.weight")
    if prefix is None:
        raise WeightsError("no ResNet/ResNeXt trunk found in the source: no '*conv1.weight' next to "
                           f"'*layer1.0.conv1.weight'; first keys: {list(state)[:_SHOW]}")
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return trunk, [k for k in state if not k.startswith(prefix)], prefix


def _pick(state: Mapping[str, Tensor], model: nn.Module) -> Tuple[Dict[str, Tensor], List[str], str]:
    """The source tensors for ``model``'s keys, with the prefix that locates them, and the keys not used."""
    is_fpn = hasattr(model, "body") and hasattr(model, "fpn")
    if is_fpn:
        prefix = _find_prefix(state, "body.conv1.weight", also="fpn.inner_blocks.0.0.weight")
        if prefix is not None:
            picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return picked, [k for k in state if not k.startswith(prefix)], prefix or "<root>"
    trunk, others, prefix = split_trunk(state)
    if is_fpn:
        trunk = {"body." + k: v for k, v in trunk.items()}
    return trunk, others, prefix or "<root>"


def load_weights(model: nn.Module, source: Union[PathLike, Mapping], *, strict: bool = True) -> LoadReport:
    """Load a trunk (or an FPN backbone) from any supported file or state dict, and report what happened.

    Strict (default): every trunk key must be present with the right shape, and no trunk-shaped key may be left
    over, else :class:`WeightsError` lists the first offenders. ``strict=False`` loads what fits and reports the
    rest. Classification heads (``fc.*``), keys outside the trunk, and stages the model does not build are
    reported as ignored; BatchNorm's ``num_batches_tracked`` is neither required nor reported.
    """
    state, fmt, notes, name = _source_state(source)
    picked, others, prefix = _pick(state, model)
    report = LoadReport(source=name, format=fmt, converted=notes + ([f"trunk found under prefix {prefix!r}"]
                                                                    if prefix != "<root>" else []))
    report.ignored = list(others)
    target = model.state_dict()
    unbuilt = tuple(f"{'body.' if hasattr(model, 'body') else ''}layer{i}." for i in range(1, 5)
                    if not any(k.startswith(f"{'body.' if hasattr(model, 'body') else ''}layer{i}.") for k in target))
    usable: Dict[str, Tensor] = {}
    order = {k: i for i, k in enumerate(target)}  # report in network order, not the file's
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


# ------------------------------------------------------------------------------------------- safetensors

def save_backbone(trunk: ResNeXt, path: PathLike, *, mean: Tuple[float, ...] = IMAGENET_MEAN,
                  std: Tuple[float, ...] = IMAGENET_STD, input_format: str = "RGB") -> Path:
    """Write ``trunk`` as safetensors with its spec, input normalisation and a sha256 of the tensors."""
    from safetensors.torch import save_file

    trunk = getattr(trunk, "body", trunk)
    if not isinstance(trunk, ResNeXt):
        raise TypeError(f"save_backbone takes a ResNeXt trunk or ResNeXtFPN, got {type(trunk).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()}
    meta = {"format": SAFETENSORS_FORMAT, "spec": json.dumps(trunk.spec.as_dict()), "norm": trunk.norm,
            "out_features": json.dumps(list(trunk.out_features)), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "input_format": input_format, "sha256": _sha256(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def backbone_metadata(path: PathLike) -> Dict:
    """The spec and input normalisation stored by :func:`save_backbone`."""
    _, meta = read_weights(path)
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise WeightsError(f"{str(path)!r} was not written by save_backbone (no spec in its metadata); build the "
                           "trunk by name and use load_weights instead")
    return {"spec": ResNeXtSpec(**json.loads(meta["spec"])), "norm": meta.get("norm", "bn"),
            "out_features": tuple(json.loads(meta.get("out_features", '["c2","c3","c4","c5"]'))),
            "mean": tuple(json.loads(meta["mean"])), "std": tuple(json.loads(meta["std"])),
            "input_format": meta.get("input_format", "RGB")}


def load_backbone(path: PathLike, **kwargs) -> ResNeXt:
    """Rebuild the trunk saved by :func:`save_backbone`; ``kwargs`` (``norm``, ``trainable_stages``, ...)
    override what was saved."""
    meta = backbone_metadata(path)
    spec = meta["spec"]
    kwargs.setdefault("norm", meta["norm"])
    kwargs.setdefault("out_features", meta["out_features"])
    return resnext(depth=spec.depth, cardinality=spec.cardinality, base_width=spec.base_width, weights=str(path),
                   **kwargs)
