"""Mixed-precision training throughput on a CUDA GPU: ours vs torchvision, model FLOP utilisation, and the
Faster R-CNN X101-32x8d-FPN training iteration. ``python -m benchmarks`` adds it where CUDA is available.

    python -m benchmarks.gpu [--models resnext50_32x4d resnext101_32x8d] [--batch 64 [128 256]] [--peak-tflops N]
                             [--compile] [--profile]

Rows: training images/s (forward, backward, SGD step; channels_last; ``bf16`` and ``fp16`` autocast, the
latter with a GradScaler, as Lightning's ``bf16-mixed`` / ``16-mixed`` do), ours vs torchvision's model with the
same weights, alternating, median of ``--repeats``, at each ``--batch``; with ``--compile`` also bf16 training of both
models under ``torch.compile`` (inductor) and under ``mode="reduce-overhead"`` (inductor with CUDA graphs, each step
marked by ``torch.compiler.cudagraph_mark_step_begin``); then inference images/s of our fused copy
(``trunk.fused(dtype)``, what validate/test/predict run) in fp32, bf16 and fp16 natively vs torchvision eager fp32
or under the same autocast. MFU = images/s x 3 x forward FLOPs per image / peak
(forward FLOPs counted by torch's FlopCounterMode; backward ~2x forward). Detector: s/iter of torchvision's
FasterRCNN on our FPN vs on torchvision's ``resnet_fpn_backbone``, same weights, 2 images of 800x1333.
``--profile`` adds torch.profiler's top ops by self device time in our bf16 training step (first model, first
batch): which kernels bound the MFU. ``--device cpu`` with tiny sizes checks the code path without a GPU
(tests/test_benchmarks.py).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import resnext_backbones as rb

from .backbone import build_pair
from .common import benchmark_parser, machine, median_seconds_alternating, publish

# training variants beyond eager: the row's name -> torch.compile's mode
COMPILE_MODES = {"compile": "default", "compile + CUDA graphs": "reduce-overhead"}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 3090": 71.0}  # dense bf16/fp16


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs (2 per multiply-add) of one image through ``model``'s forward."""
    training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    model.train(training)
    return counter.get_total_flops()


def train_step(model, optimizer, scaler, x, dtype, new_graph_step: bool = False) -> None:
    if new_graph_step:  # CUDA graph trees: the previous step's outputs may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(x.device.type, dtype=dtype):
        out = model(x)
        loss = (out["c5"] if isinstance(out, dict) else out).float().mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def infer(model, x, dtype) -> None:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        model(x)


def training_rows(name: str, args, device: torch.device, peak) -> list:
    """Training img/s and our MFU, ours vs torchvision with the same weights, at each batch: bf16 and fp16 autocast
    eager, and with ``--compile`` bf16 under each of :data:`COMPILE_MODES` (both models compiled alike)."""
    ours, tv = (m.to(device) for m in build_pair(name, torch.channels_last))
    flops = forward_flops(ours, args.size)
    variants = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None)]
    variants += [("bf16", torch.bfloat16, compiled) for compiled in (COMPILE_MODES if args.compile else ())]
    rows = []
    for batch in args.batch:
        x = torch.rand(batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
        for label, dtype, compiled in variants:
            fns = {}
            for key, model in [("ours", ours), ("tv", tv)]:
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
                step = model.train() if compiled is None else torch.compile(model.train(), mode=COMPILE_MODES[compiled])
                fns[key] = partial(train_step, step, optimizer, scaler, x, dtype, compiled == "compile + CUDA graphs")
            t = median_seconds_alternating(fns, repeats=args.repeats, warmup=3)
            ours_ips = batch / t["ours"]
            mfu = f"{100 * ours_ips * 3 * flops / (peak * 1e12):.1f}%" if peak else "-"
            rows.append(f"| {name} | training, {label} autocast, batch {batch}{f', {compiled}' if compiled else ''} | "
                        f"{ours_ips:.1f} | {batch / t['tv']:.1f} | {t['tv'] / t['ours']:.3f} | {mfu} |")
            print(rows[-1], flush=True)
    return rows


def profile_table(name: str, args, device: torch.device, top: int = 12) -> str:
    """torch.profiler's ``top`` ops by self device time (CPU time on a CPU) over 3 bf16 training steps of ours, eager,
    channels_last, at the first ``--batch``."""
    from torch.profiler import ProfilerActivity, profile

    model = rb.resnext(name).to(device).to(memory_format=torch.channels_last).train()
    x = torch.rand(args.batch[0], 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    for _ in range(3):  # warm-up: cuDNN's algorithm search, allocator
        train_step(model, optimizer, scaler, x, torch.bfloat16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            train_step(model, optimizer, scaler, x, torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"Top ops by self {'CUDA' if device.type == 'cuda' else 'CPU'} time, {name}, 3 bf16 training steps of "
            f"batch {args.batch[0]} (torch.profiler):\n\n```\n"
            f"{prof.key_averages().table(sort_by=sort, row_limit=top)}\n```")


def inference_rows(name: str, args, device: torch.device) -> list:
    """Inference img/s: our fused copy in the dtype natively (``trunk.fused(dtype)``, channels_last) vs torchvision's
    model under autocast to that dtype (channels_last), same weights."""
    ours, tv = build_pair(name, torch.channels_last)
    ours, tv = ours.to(device).eval(), tv.to(device).eval()
    batch = args.batch[0]
    x = torch.rand(batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    rows = []
    for label, dtype in [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        fused = ours.fused(dtype)
        fns = {"ours": partial(infer, fused, x.to(dtype or torch.float32), None), "tv": partial(infer, tv, x, dtype)}
        t = median_seconds_alternating(fns, repeats=args.repeats, warmup=3)
        rows.append(f"| {name} | inference, ours fused {label} natively vs torchvision {label} "
                    f"{'autocast' if dtype else 'eager'}, batch {batch} | {batch / t['ours']:.1f} | "
                    f"{batch / t['tv']:.1f} | {t['tv'] / t['ours']:.3f} | - |")
        print(rows[-1], flush=True)
        del fused
    return rows


def detector_seconds(detector: FasterRCNN, images, targets, dtype, steps: int) -> float:
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.001, momentum=0.9)
    detector.train()
    for step in range(steps + 1):
        if step == 1:
            if images[0].is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(images[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if images[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["resnext50_32x4d", "resnext101_32x8d"])
    parser.add_argument("--batch", type=int, nargs="+", default=[64],
                        help="training batches (inference at the first)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--detector-backbone", default="resnext101_32x8d")
    parser.add_argument("--detector-size", type=int, nargs=2, default=[800, 1333])
    parser.add_argument("--detector-steps", type=int, default=10)
    parser.add_argument("--detector-precision", choices=["bf16", "fp32"], default="bf16",
                        help="the detector row's autocast (fp32: none; for CPUs where bf16 is emulated)")
    parser.add_argument("--compile", action="store_true",
                        help="add bf16 training under torch.compile and under CUDA graphs (minutes to compile)")
    parser.add_argument("--profile", action="store_true", help="add the top ops of our bf16 training step")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    peak = args.peak_tflops or peak_tflops(device)
    rows = ["| model | pass (precision) | ours img/s | torchvision img/s | ratio | ours MFU |",
            "|---|---|---|---|---|---|"]
    for name in args.models:
        rows += training_rows(name, args, device, peak)
        rows += inference_rows(name, args, device)
    profile = f"\n\n{profile_table(args.models[0], args, device)}" if args.profile else ""

    h, w = args.detector_size
    images = [torch.rand(3, h, w, device=device) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, w / 2, h / 2], [w / 3, h / 3, w - 5, h - 5]], device=device),
                "labels": torch.tensor([1, 2], device=device)} for _ in images]
    ours_fpn = rb.resnext_fpn(args.detector_backbone, trainable_stages=3)
    tv_fpn = resnet_fpn_backbone(backbone_name=args.detector_backbone, weights=None, trainable_layers=3)
    tv_fpn.load_state_dict(ours_fpn.state_dict())
    detectors = {k: FasterRCNN(fpn, num_classes=91, min_size=h, max_size=w).to(device)
                 for k, fpn in [("ours", ours_fpn), ("tv", tv_fpn)]}
    dtype = torch.bfloat16 if args.detector_precision == "bf16" else None
    seconds = {k: detector_seconds(d, images, targets, dtype, args.detector_steps)
               for k, d in detectors.items()}
    detector_row = (f"Faster R-CNN {args.detector_backbone}-FPN, 2 images of {h}x{w}, {args.detector_precision}: ours "
                    f"{seconds['ours']:.3f} s/iter, torchvision backbone {seconds['tv']:.3f} s/iter "
                    f"(ratio {seconds['tv'] / seconds['ours']:.3f}). Anchor: detectron2 X101-32x8d-FPN 0.638 s/iter "
                    "on 8 V100 (2 images per GPU).")
    print(detector_row, flush=True)
    body = (f"## GPU: mixed-precision training, ours vs torchvision\n\n`python -m benchmarks.gpu --batch "
            f"{' '.join(map(str, args.batch))} --size {args.size} --repeats {args.repeats}"
            f"{' --compile' if args.compile else ''}{' --profile' if args.profile else ''}`; channels_last, SGD, "
            f"alternating, median of {args.repeats}; "
            f"peak {peak} TFLOPS. Machine: {machine()}.\n\n" + "\n".join(rows) + f"\n\n{detector_row}\n"
            "Anchors: timm RTX 3090 AMP NHWC resnext50_32x4d training 1001 img/s; NVIDIA A100 AMP "
            "ResNeXt101-32x4d 1211 img/s." + profile)
    return publish("gpu", body, args)


if __name__ == "__main__":
    main()
