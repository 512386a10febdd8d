"""Convert a trunk from any checkpoint or weight file into another ecosystem's layout.

    python -m resnext_backbones export CHECKPOINT OUT [--format safetensors|torchvision|timm|mmdet|detectron2]
                                      [--register URL [--name MODEL.TAG] [--license LICENSE]]

With ``--register URL`` (where OUT will be published: ``https://...`` or ``file://...``) it also prints the
registry entry that lets everyone load the trunk by name: add it to the file named by
``$RESNEXT_BACKBONES_REGISTRY`` or pass it to ``resnext_backbones.register_weights``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from . import formats, registry
from .files import WeightsError, file_sha256
from .formats import WRITERS
from .formats.safetensors import backbone_metadata
from .formats.torchvision import trunk_tensors
from .loading import infer_spec
from .trunk import ResNeXtSpec

FORMATS = tuple(WRITERS)  # safetensors, torchvision, timm, mmdet, detectron2


def convert(source, out, fmt: str = "safetensors") -> Path:
    """Write the trunk found in ``source`` (a path, a weights name, a state dict or a read
    :class:`~resnext_backbones.formats.Source`) to ``out`` in ``fmt`` (one of ``FORMATS``); the source's input
    normalisation goes along where the format has a place for it (ours)."""
    if fmt not in WRITERS:
        raise ValueError(f"format={fmt!r} is not supported; choose one of {list(FORMATS)}")
    source = formats.read(source)
    state = trunk_tensors(source.state)
    if not any(k.endswith("running_mean") for k in state):
        raise WeightsError(f"{source.name}: the trunk has no BatchNorm statistics (a GroupNorm trunk?); the "
                           "ecosystems this exports to expect BatchNorm")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt]({k: v.detach().cpu().contiguous() for k, v in state.items()}, out, infer_spec(state),
                 normalization=source.normalization)
    return out


def registry_entry(path: Path, url: str, spec: ResNeXtSpec, name: Optional[str] = None,
                   license: str = "unknown") -> Dict[str, dict]:
    """The registry entry (``{name: fields}``, as ``$RESNEXT_BACKBONES_REGISTRY`` files hold them) of a trunk of
    ``spec`` exported to ``path``, to be published at ``url``."""
    model = registry.model_of(spec)
    name = name or (f"{model}.{path.stem}" if model else None)
    if name is None:
        raise ValueError("this trunk's spec has no model name (resnext_backbones.list_models()), and registry "
                         "names are '<model>.<tag>': pass --name")
    fields = {"url": url, "sha256": file_sha256(path), "source": "resnext_backbones", "license": license}
    try:
        meta = backbone_metadata(path)
        fields.update(mean=list(meta["mean"]), std=list(meta["std"]), notes=f"exported trunk, spec {meta['spec']}")
    except WeightsError:  # another ecosystem's layout: ImageNet normalisation unless you say otherwise
        pass
    registry.register_weights(name, overwrite=True, **fields)  # checks the name, url and fields now
    return {name: fields}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnext_backbones", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("export", help="write the trunk of a checkpoint or weight file in another layout")
    cmd.add_argument("checkpoint", help="a Lightning checkpoint of either task, or any file load_weights reads")
    cmd.add_argument("out", help="file to write")
    cmd.add_argument("--format", default="safetensors", choices=FORMATS,
                     help="safetensors (ours: spec, normalisation, sha256), torchvision/timm state dict, mmdet "
                          "checkpoint (backbone.*), detectron2 pickle (numpy)")
    cmd.add_argument("--register", metavar="URL", help="also print the registry entry for OUT published at URL")
    cmd.add_argument("--name", help="registry name, '<model>.<tag>' (default: the model and OUT's file stem)")
    cmd.add_argument("--license", default="unknown", help="licence recorded in the registry entry")
    args = parser.parse_args(argv)
    try:
        source = formats.read(args.checkpoint)  # read once: the export and the message share it
        path = convert(source, args.out, args.format)
        spec = infer_spec(trunk_tensors(source.state))
        entry = registry_entry(path, args.register, spec, args.name, args.license) if args.register else None
    except (WeightsError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {path} ({args.format}, {spec})")
    if entry is not None:
        print(json.dumps(entry, indent=2))
