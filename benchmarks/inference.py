"""Fast inference, ours vs torchvision in one process: the trunk, the quick-start detector and a bare torchvision
detector on our backbone, fp32 and bf16.

    python -m benchmarks.inference [--batches 1 8] [--size 224] [--repeats 8] [--threads 2]
                                   [--detection-checkpoint CKPT] [--classification-checkpoint CKPT]

Trunk (resnext50_32x4d, same weights): ours in inference form (``trunk.fused(dtype)``: norms folded, oneDNN kernels
on weights packed once, channels_last, the dtype native) against torchvision eager fp32 NCHW, and in bf16 also
against torchvision under the same bf16 autocast (channels_last, its fastest layout here). Our fused fp32 GFLOP/s is
set beside this CPU's fp32 convolution peak, measured on a dense 3x3 convolution (256 channels, 56x56, batch 8,
channels_last, oneDNN). Detector: ``predict`` on the quick-start validation images in batches of the config's size,
through ``ObjectDetector.predict_step`` (the fused trunk; ``inference_precision`` 32 and bf16) against torchvision's
eager fp32 ``FasterRCNN`` on torchvision's own ResNeXt + ``BackboneWithFPN`` with the same weights. bf16 rows run
only where the CPU computes bf16 natively (AMX or AVX-512 BF16). With the quick starts' checkpoints, the validation
mAP (detection) and accuracy (classification) at each inference precision. Bare: a torchvision ``FasterRCNN`` on
``rb.resnext_fpn`` built in plain PyTorch code, eager against its ``rb.inference_copy``. Ratios: ours/peer
throughput, medians of alternating rounds.
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path
from typing import List, Optional

import torch
import torchvision
import yaml
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import resnext_backbones as rb
from resnext_backbones.deployment import isa_flags, native_support
from resnext_backbones.onednn import ONEDNN_ISA_VARIABLES, onednn_isa_limit
from tasks import ImageClassifier, ObjectDetector

from .backbone import build_pair
from .common import benchmark_parser, machine, median_seconds_alternating, pin_malloc, publish

REPOSITORY = Path(__file__).resolve().parents[1]


def forward_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def conv_peak_gflops(repeats: int) -> float:
    """fp32 GFLOP/s of a dense 3x3 convolution (256 -> 256 channels, 56x56, batch 8, channels_last): about the best
    this CPU's oneDNN does in float32."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.rand(8, 256, 56, 56).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        t = median_seconds_alternating({"conv": partial(conv, x)}, repeats=repeats)["conv"]
    return 2 * 8 * 256 * 256 * 9 * 56 * 56 / t / 1e9


def infer(model, x) -> None:
    with torch.inference_mode():
        model(x)


def infer_autocast(model, x, dtype) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        model(x)


def trunk_rows(args, bf16: bool) -> List[str]:
    rows = ["| batch | ours | peer | ours img/s | peer img/s | ratio | ours GFLOP/s |", "|---|---|---|---|---|---|---|"]
    ours, tv = build_pair(args.model, torch.contiguous_format)
    ours.eval(), tv.eval()
    tv_nhwc = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    fused = {"fp32": ours.fused()}
    if bf16:
        fused["bf16"] = ours.fused(torch.bfloat16)
    gflops = forward_gflops(ours, torch.rand(1, 3, args.size, args.size))
    for batch in args.batches:
        x = torch.rand(batch, 3, args.size, args.size)
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        cases = [("fused fp32", "torchvision eager fp32 NCHW", partial(infer, fused["fp32"], x_nhwc),
                  partial(infer, tv, x))]
        if bf16:
            x_bf16 = x_nhwc.to(torch.bfloat16)
            cases += [("fused bf16", "torchvision eager fp32 NCHW", partial(infer, fused["bf16"], x_bf16),
                       partial(infer, tv, x)),
                      ("fused bf16", "torchvision bf16 autocast, channels_last", partial(infer, fused["bf16"], x_bf16),
                       partial(infer_autocast, tv_nhwc, x_nhwc, torch.bfloat16))]
        for ours_name, peer_name, ours_fn, peer_fn in cases:
            t = median_seconds_alternating({"ours": ours_fn, "peer": peer_fn}, repeats=args.repeats)
            rate = batch / t["ours"]
            rows.append(f"| {batch} | {ours_name} | {peer_name} | {rate:.2f} | {batch / t['peer']:.2f} | "
                        f"{t['peer'] / t['ours']:.3f} | {rate * gflops:.0f} |")
            print(rows[-1], flush=True)
    return rows


def quick_start_config(name: str) -> dict:
    return yaml.safe_load((REPOSITORY / "configs" / name).read_text())


def torchvision_detector(task: ObjectDetector) -> torch.nn.Module:
    """torchvision's FasterRCNN on torchvision's own ResNeXt and ``BackboneWithFPN``, with the task's weights."""
    spec = rb.MODELS[task.hparams.backbone]
    block = torchvision.models.resnet.Bottleneck if spec.bottleneck else torchvision.models.resnet.BasicBlock
    trunk = torchvision.models.resnet.ResNet(block, list(spec.blocks), groups=spec.cardinality,
                                             width_per_group=spec.base_width)
    channels = list(task.trunk_module().out_channels.values())
    backbone = BackboneWithFPN(trunk, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels,
                               task.hparams.fpn_channels, extra_blocks=LastLevelMaxPool())
    detector = copy.deepcopy(task.model)
    detector.backbone = backbone
    detector.load_state_dict(task.model.state_dict())
    return detector.eval()


def detection_batches(batch_size: int, count: int) -> List:
    from tasks.data import CocoDetectionDataModule

    data = CocoDetectionDataModule(batch_size=batch_size, num_workers=0)  # the embedded shapes set
    data.setup("validate")
    batches = []
    for batch in data.val_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def detector(checkpoint: Optional[str], precision: str) -> ObjectDetector:
    if checkpoint:
        return ObjectDetector.load_from_checkpoint(checkpoint, map_location="cpu", inference_precision=precision).eval()
    init = {k: v for k, v in quick_start_config("detection.yaml")["model"]["init_args"].items() if k != "optimizer"}
    torch.manual_seed(0)
    return ObjectDetector(**{**init, "num_classes": 3, "inference_precision": precision}).eval()


def predict_all(predict, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            predict(batch)


def detector_rows(args, bf16: bool) -> List[str]:
    batch_size = quick_start_config("detection.yaml")["data"]["init_args"]["batch_size"]
    batches = detection_batches(batch_size, args.detector_batches)
    images = sum(len(b[0]) for b in batches)
    ours = {"32": detector(args.detection_checkpoint, "32")}
    if bf16:
        ours["bf16"] = copy.deepcopy(ours["32"])
        ours["bf16"].inference_runner.precision = "bf16"
    peer = torchvision_detector(ours["32"])
    floats = [([im.float() / 255 for im in b[0]], None) for b in batches]
    fns = {f"ours {p}": partial(predict_all, partial(m.predict_step, batch_idx=0), batches) for p, m in ours.items()}
    fns["peer"] = partial(predict_all, lambda b: peer(b[0]), floats)
    t = median_seconds_alternating(fns, repeats=args.repeats)
    rows = ["| ours | ours img/s | torchvision eager fp32 img/s | ratio |", "|---|---|---|---|"]
    for name in ours:
        label = "fused fp32" if name == "32" else "fused bf16"
        rows.append(f"| {label} | {images / t[f'ours {name}']:.1f} | {images / t['peer']:.1f} | "
                    f"{t['peer'] / t[f'ours {name}']:.3f} |")
        print(rows[-1], flush=True)
    return rows


def bare_rows(args, bf16: bool) -> List[str]:
    """A torchvision ``FasterRCNN`` on ``rb.resnext_fpn`` as a user builds it in their own training code (no
    Lightning), eager, against its ``rb.inference_copy`` in fp32 and, where native, bf16: same weights and images."""
    torch.manual_seed(0)
    side = args.bare_size
    model = torchvision.models.detection.FasterRCNN(rb.resnext_fpn(args.model), num_classes=4, min_size=side,
                                                    max_size=side).eval()
    images = [torch.rand(3, side, side) for _ in range(args.bare_images)]
    copies = {"fp32": rb.inference_copy(model)}
    if bf16:
        copies["bf16"] = rb.inference_copy(model, dtype=torch.bfloat16)
    fns = {name: partial(infer, fast, images) for name, fast in copies.items()}
    fns["eager"] = partial(infer, model, images)
    t = median_seconds_alternating(fns, repeats=args.repeats)
    rows = ["| rb.inference_copy | its img/s | eager fp32 img/s | ratio |", "|---|---|---|---|"]
    for name in copies:
        rows.append(f"| {name} | {len(images) / t[name]:.2f} | {len(images) / t['eager']:.2f} | "
                    f"{t['eager'] / t[name]:.3f} |")
        print(rows[-1], flush=True)
    return rows


def quality_rows(args, bf16: bool) -> List[str]:
    """Validation mAP / accuracy of the quick starts' checkpoints at each inference precision."""
    from lightning.pytorch import Trainer

    from tasks.data import CocoDetectionDataModule, ImageFolderDataModule

    precisions = ["32", "bf16"] if bf16 else ["32"]
    rows = ["| model | metric | " + " | ".join(f"inference_precision {p}" for p in precisions) + " |",
            "|---|---|" + "---|" * len(precisions)]
    cases = []
    if args.detection_checkpoint:
        init = quick_start_config("detection.yaml")["data"]["init_args"]
        cases.append(("detection quick start", "val/map", ObjectDetector, args.detection_checkpoint,
                      partial(CocoDetectionDataModule, batch_size=init["batch_size"], num_workers=0)))
    if args.classification_checkpoint:
        init = quick_start_config("classification.yaml")["data"]["init_args"]
        cases.append(("classification quick start", "val/acc", ImageClassifier, args.classification_checkpoint,
                      partial(ImageFolderDataModule, image_size=init["image_size"], batch_size=init["batch_size"],
                              num_workers=0)))
    for name, metric, task_class, checkpoint, data in cases:
        values = []
        for precision in precisions:
            model = task_class.load_from_checkpoint(checkpoint, map_location="cpu", inference_precision=precision,
                                                    log_images=0)
            trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
            values.append(trainer.validate(model, datamodule=data(), verbose=False)[0][metric])
        rows.append(f"| {name} | {metric} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        print(rows[-1], flush=True)
    return rows if cases else []


SECTIONS = ("trunk", "detector", "bare", "quality")


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which tables (each is its own section of benchmarks/README.md); quality needs the "
                             "checkpoints")
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector-batches", type=int, default=8, help="validation batches each detector round")
    parser.add_argument("--bare-size", type=int, default=320, help="bare: image side (and the detector's min/max_size)")
    parser.add_argument("--bare-images", type=int, default=2, help="bare: images per forward")
    parser.add_argument("--detection-checkpoint", help="a checkpoint of configs/detection.yaml: mAP per precision")
    parser.add_argument("--classification-checkpoint", help="a checkpoint of configs/classification.yaml")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    allocator = pin_malloc()  # freed activations stay mapped: no page faults that depend on what ran before
    bf16 = native_support(torch.bfloat16, torch.device("cpu"))
    note = "" if bf16 else " bf16 rows: none, bf16 is not native here (AMX or AVX-512 BF16, open to oneDNN)."
    header = f"Machine: {machine()}; ISA: {isa_flags()}; {allocator}.{note}"
    # ONEDNN_MAX_CPU_ISA=AVX2 (with ATEN_CPU_CAPABILITY=avx2) runs this CPU as one without AVX-512 and bf16: its own
    # tables, beside the unrestricted ones
    limit = onednn_isa_limit()
    section, limited = ("", "") if limit is None else (f"_{limit[1].lower()}", f", oneDNN limited to {limit[1]}")
    env = "".join(f"{k}={os.environ[k]} " for k in (*ONEDNN_ISA_VARIABLES, "ATEN_CPU_CAPABILITY") if os.environ.get(k))
    bodies = []
    if "trunk" in args.sections:
        peak = conv_peak_gflops(args.repeats)
        rows = trunk_rows(args, bf16)
        bodies.append(publish(f"inference_trunk{section}", (
            f"## Inference, trunk: `{args.model}` at {args.size}x{args.size}, fused fp32 and native bf16 vs "
            f"torchvision, same weights{limited}\n\n`{env}python -m benchmarks.inference --sections trunk --batches "
            f"{' '.join(map(str, args.batches))} --size {args.size} --repeats {args.repeats} --threads {args.threads}`"
            f"; alternating, median of {args.repeats}. {header}\n\nThis CPU's fp32 convolution peak (dense 3x3, 256 "
            f"channels, 56x56, batch 8, channels_last): {peak:.0f} GFLOP/s.\n\n" + "\n".join(rows)), args))
    if "detector" in args.sections:
        rows = detector_rows(args, bf16)
        bodies.append(publish(f"inference_detector{section}", (
            "## Inference, detector `predict`: the quick start's (configs/detection.yaml) on its validation images"
            f"{limited}\n\n`{env}python -m benchmarks.inference --sections detector --detector-batches "
            f"{args.detector_batches} --repeats {args.repeats} --threads {args.threads}"
            f"{' --detection-checkpoint DET' if args.detection_checkpoint else ''}`: {args.detector_batches} batches "
            f"of the config's batch size per round, alternating, median of {args.repeats}; weights: "
            f"{'the quick start trained (DET)' if args.detection_checkpoint else 'random (seed 0)'}; ours through "
            "`predict_step` at inference_precision 32 and bf16 (fused trunk, packed FPN and heads, sparse RoIAlign); "
            "torchvision: its FasterRCNN on its own ResNeXt + BackboneWithFPN, same weights, eager fp32 NCHW. "
            f"{header}\n\n" + "\n".join(rows)), args))
    if "bare" in args.sections:
        rows = bare_rows(args, bf16)
        bodies.append(publish(f"inference_bare{section}", (
            f"## Inference without Lightning: a torchvision FasterRCNN on `rb.resnext_fpn(\"{args.model}\")`, eager vs "
            f"`rb.inference_copy`{limited}\n\n`{env}python -m benchmarks.inference --sections bare --model "
            f"{args.model} --bare-size {args.bare_size} --bare-images {args.bare_images} --repeats {args.repeats} "
            f"--threads {args.threads}`: {args.bare_images} random images of {args.bare_size}x{args.bare_size} per "
            f"forward, random weights (seed 0), alternating, median of {args.repeats}; the copy in fp32 and, where "
            f"native, bf16 (fused trunk, packed FPN and heads, sparse RoIAlign). {header}\n\n" + "\n".join(rows)),
            args))
    if "quality" in args.sections:
        rows = quality_rows(args, bf16)
        if rows:
            bodies.append(publish("inference_quality", (
                "## Inference, validation quality at each inference_precision: the quick starts' checkpoints\n\n"
                "`python -m benchmarks.inference --sections quality --detection-checkpoint DET "
                f"--classification-checkpoint CLS`: `Trainer.validate` on each quick start's validation set. "
                f"{header}\n\n" + "\n".join(rows)), args))
    return "\n\n".join(bodies)


if __name__ == "__main__":
    main()
