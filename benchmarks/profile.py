"""Where a training step's time goes: the quick-start detector's and classifier's training step under
torch.profiler, the top ops by self CPU time in the forward, the backward and the optimizer step.

    python -m benchmarks.profile [--configs detection.yaml classification.yaml] [--steps 3] [--top 12]
                                 [--threads 2] [--batch-size N] [--backbone NAME] [--size PIXELS]

The models and batches are the quick starts' (:func:`benchmarks.precision.quick_start`: the configs' model sections,
one fixed batch of their size), the step is the task's own (``training_loss``, backward, SGD step), in the config's
memory format. The detector runs twice, with ``sparse_roi_align`` off (torchvision's RoIAlign, forward and backward)
and on, so that the table shows the rows that option moves. One warm-up step, then ``--steps`` profiled steps; each
op is counted in the phase it ran in (forward, backward, optimizer step), each row is an op's self CPU time per step
and its share of that phase's time (which includes Python's).
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict
from typing import Callable, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from resnext_backbones.deployment import isa_flags

from .common import benchmark_parser, machine, publish
from .precision import quick_start

PHASES = ("forward", "backward", "optimizer step")
MARK = "phase: "  # the record_function range of each phase


def variants(configs: List[str]) -> Dict[str, tuple]:
    """What is profiled: (config, model attributes to set) by row title."""
    out = {}
    for name in configs:
        if name in ("detection.yaml", "instance_segmentation.yaml"):
            for sparse in (False, True):
                out[f"configs/{name}, sparse_roi_align: {str(sparse).lower()}"] = (name, {"sparse_roi_align": sparse})
        else:
            out[f"configs/{name}"] = (name, {})
    return out


def step_phases(model, batch, optimizer) -> Dict[str, Callable[[], object]]:
    """The training step of ``model`` on ``batch`` in its three phases, to be run in order."""
    state = {}

    def forward():
        state["loss"] = model.training_loss(batch, 0)

    def backward():
        optimizer.zero_grad(set_to_none=True)
        state.pop("loss").backward()

    return {"forward": forward, "backward": backward, "optimizer step": optimizer.step}


def profile_step(name: str, settings: dict, args: argparse.Namespace) -> Dict[str, tuple]:
    """Per phase: its CPU time per step, and (op, self CPU µs per step, calls per step) of each op run in it, the
    slowest first."""
    steps = args.steps
    model, batch = quick_start(name, args.batch_size, args.backbone, args.size)
    for key, value in settings.items():
        setattr(model, key, value)
    model.train()
    model.setup("fit")  # channels_last where the config asks for it
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    phases = step_phases(model, batch, optimizer)
    for run in phases.values():  # warm-up: oneDNN primitives, the allocator, the poolers' scales
        run()
    with profile(activities=[ProfilerActivity.CPU]) as session:
        for _ in range(steps):
            for phase, run in phases.items():
                with record_function(MARK + phase):
                    run()
    totals = dict.fromkeys(PHASES, 0.0)
    ops = {phase: defaultdict(lambda: [0.0, 0]) for phase in PHASES}
    for event in session.events():  # each op under the phase it ran in (CPU autograd runs on this thread)
        top = event
        while top.cpu_parent is not None:
            top = top.cpu_parent
        if not top.name.startswith(MARK):
            continue
        phase = top.name[len(MARK):]
        if event is top:
            totals[phase] += event.cpu_time_total
        else:
            ops[phase][event.name][0] += event.self_cpu_time_total
            ops[phase][event.name][1] += 1
    return {phase: (totals[phase] / steps, sorted(((op, t / steps, n / steps) for op, (t, n) in ops[phase].items()),
                                                   key=lambda row: -row[1])) for phase in PHASES}


def table(title: str, results: Dict[str, tuple], top: int) -> str:
    rows = [f"### {title}", "", "| phase | op | self CPU ms/step | share of phase | calls/step |",
            "|---|---|---|---|---|"]
    for phase in PHASES:
        total, ops = results[phase]
        rows.append(f"| **{phase}** | (all, with Python) | **{total / 1e3:.1f}** | 100% | |")
        for op, micros, calls in ops[:top]:
            rows.append(f"| {phase} | `{op}` | {micros / 1e3:.1f} | {100 * micros / total:.0f}% | {calls:g} |")
    return "\n".join(rows)


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["detection.yaml", "classification.yaml"],
                        help="quick-start configs under configs/")
    parser.add_argument("--batch-size", type=int, help="instead of each config's (tests use a tiny one)")
    parser.add_argument("--backbone", help="instead of each config's (tests use resnet18)")
    parser.add_argument("--size", type=int, help="image side instead of each config's (tests use a tiny one)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="ops listed per phase")
    parser.add_argument("--threads", type=int, default=2)
    args: argparse.Namespace = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = []
    with warnings.catch_warnings():  # the step outside a Trainer: its self.log calls say there is none
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for title, (name, settings) in variants(args.configs).items():
            sections.append(table(title, profile_step(name, settings, args), args.top))
            print(sections[-1], flush=True)
    batch = "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                    if k in ("batch_size", "backbone", "size") and v)
    body = (f"## Profile of the quick starts' training step\n\n`python -m benchmarks.profile --configs "
            f"{' '.join(args.configs)} --steps {args.steps} --top {args.top} --threads {args.threads}{batch}`: "
            f"torch.profiler, self CPU time per step of each op, mean of {args.steps} steps after one warm-up. "
            f"Machine: {machine()}; ISA: {isa_flags()}.\n\n" + "\n\n".join(sections))
    return publish("profile", body, args)


if __name__ == "__main__":
    main()
