"""Write a trunk from any checkpoint or weight file into another ecosystem's layout.

    python -m resnext_backbones export CHECKPOINT OUT [--format safetensors|torchvision|timm|mmdet|detectron2]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence

from torch import Tensor

from .files import WeightsError
from .formats import WRITERS
from .formats.torchvision import trunk_tensors
from .loading import infer_spec, source_state_dict

FORMATS = tuple(WRITERS)  # safetensors, torchvision, timm, mmdet, detectron2


def trunk_state_dict(source) -> Dict[str, Tensor]:
    """The trunk's tensors (torchvision names, no ``fc``) from any file ``load_weights`` reads."""
    return trunk_tensors(source_state_dict(source))


def export(source, out, fmt: str = "safetensors") -> Path:
    """Export the trunk found in ``source`` (a path or a state dict) to ``out`` in ``fmt`` (one of ``FORMATS``)."""
    if fmt not in WRITERS:
        raise ValueError(f"format={fmt!r} is not supported; choose one of {list(FORMATS)}")
    state = trunk_state_dict(source)
    if not any(k.endswith("running_mean") for k in state):
        raise WeightsError(f"{source}: the trunk has no BatchNorm statistics (a GroupNorm trunk?); the ecosystems "
                           "this exports to expect BatchNorm")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt]({k: v.detach().cpu().contiguous() for k, v in state.items()}, out, infer_spec(state))
    return out


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
    args = parser.parse_args(argv)
    try:
        state = trunk_state_dict(args.checkpoint)  # read once: the export and the message share it
        path = export(state, args.out, args.format)
    except (WeightsError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {path} ({args.format}, {infer_spec(state)})")
