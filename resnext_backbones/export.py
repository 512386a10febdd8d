"""Write a trunk from any checkpoint or weight file into another ecosystem's layout.

    python -m resnext_backbones export CHECKPOINT OUT [--format safetensors|torchvision|timm|mmdet|detectron2]
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .trunk import ResNeXt
from .weights import WeightsError, infer_spec, save_backbone, source_state_dict, split_trunk, to_detectron2

FORMATS = ("safetensors", "torchvision", "timm", "mmdet", "detectron2")


TRUNK_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def trunk_state_dict(source) -> Dict[str, Tensor]:
    """The trunk's tensors (torchvision names, no ``fc``) from any file ``load_weights`` reads."""
    trunk, _, _ = split_trunk(source_state_dict(source))
    return {k: v for k, v in trunk.items() if k.split(".")[0] in TRUNK_MODULES}


def export(source, out, fmt: str = "safetensors") -> Path:
    """Export the trunk found in ``source`` (a path or a state dict) to ``out`` in ``fmt`` (one of ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not supported; choose one of {list(FORMATS)}")
    state = trunk_state_dict(source)
    if not any(k.endswith("running_mean") for k in state):
        raise WeightsError(f"{source}: the trunk has no BatchNorm statistics (a GroupNorm trunk?); only "
                           "'safetensors' keeps it, the other ecosystems expect BatchNorm")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = infer_spec(state)
    if fmt == "safetensors":
        trunk = ResNeXt(spec, norm="bn")
        trunk.load_state_dict(state, strict=False)  # missing num_batches_tracked only (checked by infer_spec)
        return save_backbone(trunk, out)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if fmt == "torchvision":
        torch.save(state, out)
    elif fmt == "timm":  # timm's hub layout: flat safetensors, torchvision names
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={"format": "pt"})
    elif fmt == "mmdet":
        torch.save({"meta": {"exported_by": "resnext_backbones", "spec": spec.as_dict()},
                    "state_dict": {"backbone." + k: v for k, v in state.items()}}, out)
    else:
        with open(out, "wb") as f:
            pickle.dump(to_detectron2(state), f)
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
