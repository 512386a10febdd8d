"""Weight formats, one module per ecosystem, each holding its reader and its writers:

============== ==================================================================================================
safetensors    ours (:func:`save_backbone`): tensors + spec, normalisation and a sha256 of the tensors
lightning      Lightning checkpoints of either task (reader only: Lightning writes them)
mmdet          mmdet/mmpretrain checkpoints, ``state_dict`` with ``backbone.*``
detectron2     ``stem``/``res2..5``/``convN.norm``/``shortcut`` names; BGR stem and stride-in-1x1 handled
torchvision    flat torchvision/timm state dicts, and anything that nests one (detectors, ``BackboneWithFPN``)
============== ==================================================================================================

A format module has ``NAME``, ``detect(...) -> bool``, ``read(...) -> (tensors with torchvision names, conversion
notes)`` and ``WRITERS`` (``{export name: write(state, path, spec,
normalization)}``; only formats with a place for it record ``normalization``). A format whose files record their
input normalisation also has ``normalization(...) -> {"mean", "std"} or None`` (RGB, images in [0, 1], as the
trunk takes them once read). Each of them takes, by name, only those of ``content`` (the file's content), ``meta``
(its safetensors metadata, or ``{}``), ``source`` (its name in messages) and ``pinned`` (whether the caller checked
the file's digest) that it reads: :func:`_call` passes them.
The format of a file is the first entry of :data:`READERS` that detects it, from the content, never the file
name. Adding a format is its module plus one line in each table below.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Union

from torch import Tensor

from .. import registry
from ..files import PathLike, check_sha256, read_file
from . import detectron2, lightning, mmdet, safetensors, torchvision

__all__ = ["READERS", "WRITERS", "Source", "detect", "read"]

# Detection order: the most specific first; torchvision accepts anything and comes last.
READERS = (safetensors, lightning, mmdet, detectron2, torchvision)

# Export targets, in the order the command line lists them.
WRITERS: Dict[str, Callable] = {name: write for module in (safetensors, torchvision, mmdet, detectron2, lightning)
                                for name, write in module.WRITERS.items()}


class Source(NamedTuple):
    """A weight source, read: flat tensors with torchvision names, and what was done to get them."""

    state: Dict[str, Tensor]
    format: str
    notes: List[str]
    name: str
    normalization: Optional[Dict[str, tuple]] = None  # mean/std (RGB, [0, 1]) the weights were trained with


def _call(function: Callable, **available):
    """``function`` called with those of ``available`` that it names as parameters."""
    return function(**{k: v for k, v in available.items() if k in inspect.signature(function).parameters})


def detect(content: Mapping, meta: Optional[Mapping[str, str]] = None):
    """The format module that reads ``content`` (a file's content, and its safetensors metadata if any)."""
    return next(module for module in READERS if _call(module.detect, content=content, meta=meta or {}))


def read(source: Union[PathLike, Mapping, Source], *, expected_sha256: Optional[str] = None,
         model: Optional[str] = None) -> Source:
    """Read a file, a registered weights name (downloaded once and cached: :mod:`resnext_backbones.registry`;
    a tag alone names ``model``'s weights), or an in-memory checkpoint / state dict, in any supported format.

    With ``expected_sha256`` (the sha256 of the file's bytes, or a prefix of at least 8 hex characters) the bytes
    are checked before anything in them is parsed. A :class:`Source` already read is returned as it is."""
    if isinstance(source, Source):
        return source
    if isinstance(source, Mapping):
        if expected_sha256 is not None:
            raise ValueError("expected_sha256 checks a file's bytes; pass the file's path, not its loaded state dict")
        content, meta, name, entry = dict(source), {}, "<state dict>", None
    else:
        path, entry = registry.resolve(source, model, expected_sha256)  # a name: fetched and verified
        name = str(source) if entry is None else f"{entry.name} ({path})"
        if expected_sha256 is not None and entry is None:
            check_sha256(Path(path), expected_sha256)
        content, meta = read_file(path)
        if entry is not None and entry.file_hints:  # what the registry knows and the file does not say
            content = {**entry.file_hints, **content}
    module = detect(content, meta)
    pinned = expected_sha256 is not None or entry is not None
    state, notes = _call(module.read, content=content, meta=meta, source=name, pinned=pinned)
    if expected_sha256 is not None:
        notes = [f"file sha256 matches the pinned {expected_sha256.strip().lower()}"] + notes
    elif entry is not None:
        notes = [f"file sha256 matches the registry's {entry.sha256}"] + notes
    normalization = entry.normalization() if entry is not None else \
        _call(getattr(module, "normalization", lambda: None), content=content, meta=meta)
    return Source(state, module.NAME, notes, name, normalization)
