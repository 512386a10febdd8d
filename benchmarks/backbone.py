"""Our trunk vs torchvision's resnext50_32x4d as a C2-C5 backbone, same weights, alternating in one process.

    python -m benchmarks.backbone [--batches 1 8] [--size 224] [--repeats 8] [--threads 2] [--malloc pinned]

Rows per batch size and layout (NCHW, channels_last): forward (eval, no grad) and forward+backward (train),
eager and compiled (both models compiled alike). An A/A row (torchvision against a copy of itself) shows how far
from 1.0 the same work reads on this machine. Then our inference fast path (``trunk.eval().fuse()``: norms
folded, oneDNN fused kernels on reordered weights, channels_last), eager and compiled, against torchvision eager
NCHW. Ratio = ours/torchvision throughput (> 1 means ours is faster). Results go to benchmarks/README.md.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch._inductor.config
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

import resnext_backbones as rb

from .common import benchmark_parser, machine, median_seconds_alternating, pin_malloc, publish


def torchvision_backbone(name: str) -> IntermediateLayerGetter:
    """torchvision's model as a C2-C5 backbone: the ``IntermediateLayerGetter`` its ``BackboneWithFPN`` wraps.
    (Returning C2-C4 costs a compiled NCHW graph ~6% over returning C5 alone, so the classifier is no peer.)"""
    return IntermediateLayerGetter(getattr(torchvision.models, name)(), {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})


def build_pair(name: str, memory_format: torch.memory_format):
    """Ours and torchvision's backbone with the same weights (its getter has dropped avgpool and fc)."""
    tv = torchvision_backbone(name)
    ours = rb.resnext(name)
    ours.load_state_dict(tv.state_dict())
    return ours.to(memory_format=memory_format), tv.to(memory_format=memory_format)


def step(model, x, train: bool):
    if train:
        model(x)["c5"].mean().backward()
        return
    with torch.inference_mode():
        model(x)


def ratio_row(label: str, fns: dict, batch: int, repeats: int) -> str:
    t = median_seconds_alternating(fns, repeats=repeats)
    row = f"| {label} | {batch / t['ours']:.2f} | {batch / t['tv']:.2f} | {t['tv'] / t['ours']:.3f} |"
    print(row, flush=True)
    return row


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                        help="pinned: fix glibc's thresholds first (see common.pin_malloc); default: leave them")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only (compiling takes ~1 min a model)")
    args = parser.parse_args(argv)
    allocator = pin_malloc() if args.malloc == "pinned" else "malloc: the platform's default, adaptive"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._inductor.config.freezing = True  # compiled inference folds weights as constants (both models)
    layouts = [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]
    modes = ["eager"] if args.no_compile else ["eager", "compile"]

    rows = ["| batch | pass | layout | mode | ours img/s | torchvision img/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    diffs = []
    for batch in args.batches:
        for layout, fmt in layouts:
            ours, tv = build_pair(args.model, fmt)
            x = torch.rand(batch, 3, args.size, args.size).to(memory_format=fmt)
            for mode in modes:
                models = {"ours": ours, "tv": tv}
                if mode == "compile":
                    models = {k: torch.compile(m) for k, m in models.items()}
                for name, train in [("forward", False), ("forward+backward", True)]:
                    ours.train(train), tv.train(train)
                    fns = {k: partial(step, m, x, train) for k, m in models.items()}
                    rows.append(ratio_row(f"{batch} | {name} | {layout} | {mode}", fns, batch, args.repeats))
        # The noise floor: torchvision against a copy of itself, the same work alternating like every row above.
        tv = torchvision_backbone(args.model)
        x = torch.rand(batch, 3, args.size, args.size)
        fns = {"ours": partial(step, copy.deepcopy(tv), x, True), "tv": partial(step, tv, x, True)}  # "ours": the copy
        label = f"{batch} | A/A control: torchvision vs a copy of itself, forward+backward | NCHW | eager"
        rows.append(ratio_row(label, fns, batch, args.repeats))
        # The inference fast path vs torchvision eager NCHW: norms folded, fused oneDNN kernels, channels_last.
        ours, tv = build_pair(args.model, torch.contiguous_format)
        ours, tv = ours.eval().fuse().to(memory_format=torch.channels_last), tv.eval()
        x_nchw = torch.rand(batch, 3, args.size, args.size)
        x_nhwc = x_nchw.to(memory_format=torch.channels_last)
        fast = {"fused, eager": ours}
        if not args.no_compile:
            fast["fused, compile"] = torch.compile(ours)
        for mode, model in fast.items():
            with torch.inference_mode():
                diffs.append((model(x_nhwc)["c5"] - tv(x_nchw)["c5"]).abs().max().item())
            fns = {"ours": partial(step, model, x_nhwc, False), "tv": partial(step, tv, x_nchw, False)}
            rows.append(ratio_row(f"{batch} | inference: ours vs torchvision eager NCHW | channels_last | {mode}",
                                  fns, batch, args.repeats))
    flags = " --no-compile" if args.no_compile else ""
    body = (f"## Trunk: ours vs torchvision `{args.model}` as a C2-C5 backbone\n\n"
            f"`python -m benchmarks.backbone --batches {' '.join(map(str, args.batches))} --size {args.size} "
            f"--repeats {args.repeats} --threads {args.threads} --malloc {args.malloc}{flags}`; same weights, "
            f"alternating, median of {args.repeats}; torchvision's model wrapped in the `IntermediateLayerGetter` "
            f"of its `BackboneWithFPN`, so both return C2-C5. compile: `torch.compile` (inductor, freezing on for "
            f"inference) of both models alike. Inference rows: ours in inference form (`trunk.eval().fuse()`, "
            f"channels_last input) vs torchvision eager NCHW; max |diff| of C5 vs torchvision: {max(diffs):.1e}.\n"
            f"Machine: {machine()}; {allocator}.\n\n" + "\n".join(rows))
    return publish("backbone", body, args)


if __name__ == "__main__":
    main()
