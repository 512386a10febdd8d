"""Our trunk vs torchvision's resnext50_32x4d, same weights, alternating in one process.

    python -m benchmarks.backbone [--batches 1 8] [--size 224] [--repeats 8] [--threads 2]

Rows per batch size: forward (eval, no grad) and forward+backward (train), NCHW and channels_last, eager; forward
compiled (both models); then our inference fast path (BatchNorm folded by ``fuse()``, channels_last, eager and
compiled) against torchvision eager NCHW. Ratio = ours/torchvision throughput (> 1 means ours is faster).
Results go to benchmarks/README.md.
"""

from __future__ import annotations

from functools import partial

import torch
import torch._inductor.config
import torchvision

import resnext_backbones as rb

from .common import benchmark_parser, machine, median_seconds_alternating, publish


def build_pair(name: str, memory_format: torch.memory_format):
    tv = getattr(torchvision.models, name)()
    ours = rb.resnext(name)
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    tv.fc = torch.nn.Identity()  # compare trunks: the 2048x1000 fc is not part of a backbone
    tv.avgpool = torch.nn.Identity()
    return ours.to(memory_format=memory_format), tv.to(memory_format=memory_format)


def step(model, x, train: bool):
    if train:
        out = model(x)
        loss = out["c5"].float().mean() if isinstance(out, dict) else out.float().mean()
        loss.backward()
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._inductor.config.freezing = True  # compiled inference folds weights as constants (both models)
    layouts = [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]

    rows = ["| batch | pass | layout | mode | ours img/s | torchvision img/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    for batch in args.batches:
        for layout, fmt in layouts:
            ours, tv = build_pair(args.model, fmt)
            x = torch.rand(batch, 3, args.size, args.size).to(memory_format=fmt)
            for name, train in [("forward", False), ("forward+backward", True)]:
                ours.train(train), tv.train(train)
                fns = {"ours": partial(step, ours, x, train), "tv": partial(step, tv, x, train)}
                rows.append(ratio_row(f"{batch} | {name} | {layout} | eager", fns, batch, args.repeats))
            ours.eval(), tv.eval()
            fns = {name: partial(step, torch.compile(model), x, False) for name, model in [("ours", ours), ("tv", tv)]}
            rows.append(ratio_row(f"{batch} | forward | {layout} | compile", fns, batch, args.repeats))
        # The inference fast path vs torchvision eager NCHW: BatchNorm folded, channels_last, compiled.
        ours, tv = build_pair(args.model, torch.contiguous_format)
        ours, tv = ours.eval().fuse().to(memory_format=torch.channels_last), tv.eval()
        x_nchw = torch.rand(batch, 3, args.size, args.size)
        x_nhwc = x_nchw.to(memory_format=torch.channels_last)
        compiled = torch.compile(ours)
        with torch.inference_mode():
            diff = (torch.flatten(compiled(x_nhwc)["c5"], 1) - tv(x_nchw)).abs().max().item()  # tv: fc, pool gone
        for mode, model in [("fused, eager", ours), ("fused, compile", compiled)]:
            fns = {"ours": partial(step, model, x_nhwc, False), "tv": partial(step, tv, x_nchw, False)}
            rows.append(ratio_row(f"{batch} | inference: ours vs torchvision eager NCHW | channels_last | {mode}",
                                  fns, batch, args.repeats))
        print(f"(batch {batch}: max |diff| of c5, fused + compiled vs torchvision: {diff:.1e})", flush=True)
    body = (f"## Trunk: ours vs torchvision `{args.model}`\n\n"
            f"`python -m benchmarks.backbone --batches {' '.join(map(str, args.batches))} --size {args.size} "
            f"--repeats {args.repeats} --threads {args.threads}`; same weights, alternating, median of {args.repeats}. "
            f"compile: `torch.compile` with inductor freezing, both models (forward only: compiling the backward "
            f"takes minutes on a CPU). Inference rows: ours with BatchNorm folded (`fuse()`), channels_last, vs "
            f"torchvision eager NCHW; max |diff| of C5 (compiled) vs torchvision: {diff:.1e}.\n"
            f"Machine: {machine()}.\n\n" + "\n".join(rows))
    return publish("backbone", body, args)


if __name__ == "__main__":
    main()
