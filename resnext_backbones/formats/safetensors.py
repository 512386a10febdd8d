"""Our own format: safetensors written by :func:`save_backbone`, holding the trunk's tensors and, in its metadata,
the spec, norm, returned features, input normalisation and a sha256 of the tensors.

The sha256 in the metadata is an integrity check written by the same hand that wrote the tensors: it catches a
file damaged or edited after export, not one made by someone else (who can write their own). A file that lacks
it loads with an :class:`~resnext_backbones.files.UnverifiedWeightsWarning`, unless the caller pinned the
file's own digest (``expected_sha256=``), which is the check that matters when the digest comes from someone
you trust. Other safetensors files (timm's hub files) are not this format: the torchvision reader reads them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from torch import Tensor

from ..files import PathLike, UnverifiedWeightsWarning, WeightsError
from ..trunk import FEATURES, ResNeXt, ResNeXtSpec

__all__ = ["NAME", "detect", "read", "WRITERS", "save_backbone", "backbone_metadata", "tensors_sha256"]

NAME = "safetensors"
FORMAT_TAG = "resnext_backbones"  # metadata["format"] of the files save_backbone writes


def tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """A sha256 over the tensors' names, dtypes, shapes and bytes, in name order (independent of the file's
    byte layout, so it survives a rewrite of the same tensors)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- reader

def detect(meta: Mapping[str, str]) -> bool:
    return meta.get("format") == FORMAT_TAG


def read(content: Mapping, meta: Mapping[str, str], source: str, *, pinned: bool = False
         ) -> Tuple[Dict[str, Tensor], List[str]]:
    """The tensors, after checking them against the sha256 in the metadata. A file without that entry loads with
    an :class:`UnverifiedWeightsWarning` unless ``pinned`` (the caller checked the file's own digest)."""
    expected = meta.get("sha256")
    if expected:
        if tensors_sha256(content) != expected:
            raise WeightsError(f"{source}: the tensors do not match the sha256 in the file's metadata; the file is "
                               "corrupt or was altered after export. Export it again from its checkpoint.")
        notes = ["tensors match the sha256 in the file's metadata"]
    else:
        notes = []
        if not pinned:
            warnings.warn(f"{source} has no sha256 of its tensors in its metadata, so they are unverified (written "
                          "by an older or another tool, or the entry was removed). Pass expected_sha256=<the file's "
                          "sha256> to check the file against a digest you trust.", UnverifiedWeightsWarning,
                          stacklevel=2)
    return dict(content), notes


# -------------------------------------------------------------------------------------------------- writer

def save_backbone(trunk: ResNeXt, path: PathLike, *, mean: Optional[Tuple[float, ...]] = None,
                  std: Optional[Tuple[float, ...]] = None) -> Path:
    """Write ``trunk`` (or a :class:`~resnext_backbones.ResNeXtFPN`'s trunk) as safetensors with its spec,
    norm, returned features, input normalisation (``mean``/``std`` of RGB images in [0, 1], default the trunk's
    ``normalization``) and a sha256 of the tensors."""
    from safetensors.torch import save_file

    trunk = getattr(trunk, "body", trunk)
    if not isinstance(trunk, ResNeXt):
        raise TypeError(f"save_backbone takes a ResNeXt trunk or ResNeXtFPN, got {type(trunk).__name__}")
    mean = trunk.normalization["mean"] if mean is None else mean
    std = trunk.normalization["std"] if std is None else std
    state = {k: v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()}
    meta = {"format": FORMAT_TAG, "spec": json.dumps(trunk.spec.as_dict()), "norm": trunk.norm,
            "returned_features": json.dumps(list(trunk.returned_features)), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "input_format": "RGB", "sha256": tensors_sha256(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def backbone_metadata(path: PathLike) -> Dict:
    """The spec, norm, returned features and input normalisation stored by :func:`save_backbone`, read from the
    file's header alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a non-safetensors file
        raise WeightsError(f"{str(path)!r} is not a safetensors file written by save_backbone "
                           f"({type(e).__name__}: {e}); build the trunk by name and use load_weights instead") from None
    if meta.get("format") != FORMAT_TAG:
        raise WeightsError(f"{str(path)!r} was not written by save_backbone (no spec in its metadata); build the "
                           "trunk by name and use load_weights instead")
    features = meta.get("returned_features", meta.get("out_features"))  # files before 0.2 say out_features
    return {"spec": ResNeXtSpec(**json.loads(meta["spec"])), "norm": meta.get("norm", "bn"),
            "returned_features": tuple(json.loads(features)) if features else FEATURES,
            "mean": tuple(json.loads(meta["mean"])), "std": tuple(json.loads(meta["std"])),
            "input_format": meta.get("input_format", "RGB")}


def normalization(meta: Mapping[str, str]) -> Optional[Dict[str, tuple]]:
    """The recorded mean/std (RGB images in [0, 1])."""
    if "mean" not in meta or "std" not in meta:
        return None
    return {"mean": tuple(json.loads(meta["mean"])), "std": tuple(json.loads(meta["std"]))}


def write(state: Mapping[str, Tensor], path: Path, spec: ResNeXtSpec,
          normalization: Optional[dict] = None) -> None:
    """:func:`save_backbone` of a BatchNorm trunk of ``spec`` holding ``state``, recording ``normalization``
    (the source's; ImageNet's if it records none)."""
    trunk = ResNeXt(spec, norm="bn")
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise WeightsError(f"the tensors do not make a {spec} trunk: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    if normalization is not None:
        trunk.normalization = dict(normalization)
    save_backbone(trunk, path)


WRITERS = {"safetensors": write}
