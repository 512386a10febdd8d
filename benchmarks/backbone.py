"""Our trunk vs torchvision's resnext50_32x4d, same weights, alternating in one process.

    python -m benchmarks.backbone [--batch 8] [--size 224] [--repeats 8] [--threads 2]

Rows: forward (eval, no grad) and forward+backward (train), NCHW and channels_last, then our inference fast
path (BatchNorm folded by ``fuse()``, channels_last) against torchvision eager NCHW. Ratio = ours/torchvision
throughput (> 1 means ours is faster). Results go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torchvision

import resnext_backbones as rb

from .common import machine, median_seconds_alternating, write_section


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


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/README.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = ["| pass | layout | ours img/s | torchvision img/s | ratio |", "|---|---|---|---|---|"]
    for layout, fmt in [("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)]:
        ours, tv = build_pair(args.model, fmt)
        x = torch.rand(args.batch, 3, args.size, args.size).to(memory_format=fmt)
        for name, train in [("forward", False), ("forward+backward", True)]:
            ours.train(train), tv.train(train)
            fns = {"ours": partial(step, ours, x, train), "tv": partial(step, tv, x, train)}
            t = median_seconds_alternating(fns, repeats=args.repeats)
            row = (f"| {name} | {layout} | {args.batch / t['ours']:.2f} | {args.batch / t['tv']:.2f} | "
                   f"{t['tv'] / t['ours']:.3f} |")
            print(row, flush=True)
            rows.append(row)
    # The inference fast path: ours with BatchNorm folded and channels_last vs torchvision eager NCHW.
    ours, tv = build_pair(args.model, torch.contiguous_format)
    ours = ours.eval().fuse().to(memory_format=torch.channels_last)
    tv.eval()
    x_nchw = torch.rand(args.batch, 3, args.size, args.size)
    x_nhwc = x_nchw.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        diff = (torch.flatten(ours(x_nhwc)["c5"], 1) - tv(x_nchw)).abs().max().item()  # tv: fc, pool removed
    fns = {"ours": partial(step, ours, x_nhwc, False), "tv": partial(step, tv, x_nchw, False)}
    t = median_seconds_alternating(fns, repeats=args.repeats)
    row = (f"| inference: ours fused + channels_last vs torchvision NCHW | - | {args.batch / t['ours']:.2f} | "
           f"{args.batch / t['tv']:.2f} | {t['tv'] / t['ours']:.3f} |")
    print(row, f"(max |diff| of c5: {diff:.1e})", flush=True)
    rows.append(row)
    body = (f"## Trunk: ours vs torchvision `{args.model}`\n\n"
            f"`python -m benchmarks.backbone --batch {args.batch} --size {args.size} --repeats {args.repeats} "
            f"--threads {args.threads}`; same weights, alternating, median of {args.repeats}.\n"
            f"Machine: {machine()}. Fused-path max |diff| of C5 vs torchvision: {diff:.1e}.\n\n" + "\n".join(rows))
    if not args.no_write:
        write_section("backbone", body)
    return body


if __name__ == "__main__":
    main()
