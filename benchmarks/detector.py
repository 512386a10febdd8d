"""Detector training: our ObjectDetector through Lightning vs a bare PyTorch loop over the same torchvision detector,
and the detector's forward+backward with torchvision's RoIAlign vs the sparse one.

    python -m benchmarks.detector [--configs detection.yaml instance_segmentation.yaml] [--steps 6] [--repeats 3]
                                  [--precision 32-true] [--compile]

The detectors are the ones the quick-start configs build (Faster R-CNN and Mask R-CNN); the bare loop trains a copy of
the torchvision detector inside ours. Both run SGD steps (forward, backward, optimizer step) on one fixed batch (the
config's batch size, images of its ``min_size``, 3 boxes each, and a mask filling each box for Mask R-CNN).
Ours is timed inside ``Trainer.fit`` from the second step's start to the last step's end, so the rows include
everything Lightning does per step (hooks, logging of the losses, the lr scheduler); the bare loop does the same
steps and a scheduler step. Every round runs the bare loop and each of our variants (``sparse_roi_align`` on, as by
default, and off; ``channels_last: true``; with ``--compile`` also ``compile: true``), in reversed order every other
round; the per-step median is reported, each variant against the same bare-loop (NCHW eager) timings. The
forward+backward table times the bare torchvision detector alone (no optimizer, no Lightning) with its own
``MultiScaleRoIAlign`` and with the sparse one (:func:`resnext_backbones.deployment.sparse_roi_poolers`), alternating.
Everything runs in ``--precision``: ``32-true``, or ``bf16-mixed`` (ours through the Trainer's ``precision``, the bare
loop's and the forward+backward's forward under ``torch.autocast("cpu", torch.bfloat16)``, as Lightning runs it), or
``auto`` (what ``trainer.precision: auto`` resolves to here).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from resnext_backbones.deployment import isa_flags, sparse_roi_poolers
from tasks import ObjectDetector

from .common import benchmark_parser, machine, median_seconds_alternating, publish, training_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class StepTimer(Callback):
    """Seconds per step from the start of the second step to the end of the last (the first warms up)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds = (time.perf_counter() - self.start) / batch_idx if batch_idx else float("nan")


class Repeat:
    """``batch``, ``times`` times: a data loader with no loading cost, so only the steps are timed."""

    def __init__(self, batch, times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self):
        return iter([self.batch] * self.times)

    def __len__(self) -> int:
        return self.times


def make_batch(n: int, size: int, masks: bool = False):
    """``n`` random uint8 images of ``size`` squared, 3 boxes each (labels 0, 1, 2); with ``masks``, a mask filling each
    box."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
    xy = torch.rand(n, 3, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 3, 2, generator=g) * size * 0.3], -1)
    targets = [{"boxes": b, "labels": torch.tensor([0, 1, 2]), "image_id": i} for i, b in enumerate(boxes)]
    if masks:
        ys, xs = torch.arange(size)[:, None], torch.arange(size)
        for t in targets:
            t["masks"] = torch.stack([((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).to(torch.uint8)
                                      for x0, y0, x1, y1 in t["boxes"].tolist()])
    return images, targets


def bare_inputs(batch):
    """The batch as a bare torchvision loop gives it: float images in [0, 1], labels with the background first."""
    images, targets = batch
    return ([im.float() / 255 for im in images],
            [{**{k: v for k, v in t.items() if k != "image_id"}, "labels": t["labels"] + 1} for t in targets])


def autocast(precision: str):
    """The context a forward runs in at ``precision`` on the CPU, as Lightning's ``bf16-mixed`` runs it."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lightning_step_seconds(model: LightningModule, batch, steps: int, precision: str = "32-true") -> float:
    """Seconds per training step of ``model`` inside ``Trainer.fit`` at ``precision`` on ``batch`` repeated (from the
    second step)."""
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=Repeat(batch, steps))
    return timer.seconds


def bare_step_seconds(model: nn.Module, batch, steps: int, precision: str) -> float:
    images, targets = bare_inputs(batch)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        with autocast(precision):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / (steps - 1)


def forward_backward(model: nn.Module, batch, sparse: bool, precision: str):
    """One forward+backward of the bare torchvision detector, with torchvision's poolers or the sparse ones."""
    images, targets = bare_inputs(batch)

    def run():
        model.zero_grad(set_to_none=True)
        with sparse_roi_poolers(model.roi_heads) if sparse else contextlib.nullcontext():
            with autocast(precision):
                loss = sum(model(images, targets).values())
            loss.backward()
    return run


def config_rows(name: str, args) -> tuple:
    """The whole-step rows and the forward+backward row of the detector of config ``name``."""
    torch.manual_seed(0)
    config = yaml.safe_load((CONFIGS / name).read_text())
    init = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "channels_last", "compile")}
    masks = init.get("architecture") == "mask_rcnn"
    batch = make_batch(config["data"]["init_args"]["batch_size"], init["min_size"], masks)
    options = {"sparse_roi_align: true (default)": {}, "sparse_roi_align: false": {"sparse_roi_align": False},
               "channels_last: true": {"channels_last": True}}
    if args.compile:
        options["compile: true"] = {"compile": True}

    def ours(**option) -> ObjectDetector:
        settings = {**init, "num_classes": 3, "warmup_steps": 0, "lr_schedule": "constant", "log_images": 0}
        return ObjectDetector(**settings, **option,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4))

    reference = ours()
    times = {name: [] for name in ["bare", *options]}
    # every variant in every round, the order reversed every other round
    for r in range(0 if args.no_steps else args.repeats):
        bare = copy.deepcopy(reference.model)  # the same torchvision detector, trained by a bare loop
        runs = [("bare", partial(bare_step_seconds, bare, batch, args.steps, args.precision))]
        for option_name, option in options.items():
            model = ours(**option)
            model.model.load_state_dict(reference.model.state_dict())
            runs.append((option_name, partial(lightning_step_seconds, model, batch, args.steps, args.precision)))
        for option_name, run in runs if r % 2 == 0 else runs[::-1]:
            times[option_name].append(run())
    t = {option_name: statistics.median(v) if v else math.nan for option_name, v in times.items()}
    detector = (f"{init.get('architecture', 'faster_rcnn')} ({init['backbone']}, {len(batch[0])} x "
                f"{init['min_size']} px)")
    steps = [f"| configs/{name}: {detector} | {option_name} | {t[option_name]:.3f} | {t['bare']:.3f} | "
             f"{t['bare'] / t[option_name]:.2f}x |" for option_name in options if not args.no_steps]
    model = copy.deepcopy(reference.model).train()
    fb = median_seconds_alternating({"torchvision": forward_backward(model, batch, False, args.precision),
                                     "sparse": forward_backward(model, batch, True, args.precision)},
                                    repeats=args.repeats * 2)
    pair = (f"| configs/{name}: {detector} | {fb['torchvision']:.3f} | {fb['sparse']:.3f} | "
            f"{fb['torchvision'] / fb['sparse']:.2f}x |")
    return steps, pair


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["detection.yaml", "instance_segmentation.yaml"],
                        help="quick-start configs under configs/")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed", "auto"], default="32-true",
                        help="of both sides; auto: as trainer.precision: auto resolves here")
    parser.add_argument("--compile", action="store_true", help="add the compile: true row (minutes on a CPU)")
    parser.add_argument("--no-steps", action="store_true", help="only the forward+backward table (a loaded machine)")
    args = parser.parse_args(argv)
    asked = args.precision
    args.precision = training_precision(asked, "cpu")
    torch.set_num_threads(args.threads)
    steps = ["| detector | ours (Lightning) | ours s/step | bare loop s/step | speed-up |", "|---|---|---|---|---|"]
    pairs = ["| detector | torchvision RoIAlign s | sparse RoIAlign s | speed-up |", "|---|---|---|---|"]
    for name in args.configs:
        rows, pair = config_rows(name, args)
        steps += rows
        pairs.append(pair)
        print("\n".join([*rows, pair]), flush=True)
    command = (f"`python -m benchmarks.detector --configs {' '.join(args.configs)} --steps {args.steps} --repeats "
               f"{args.repeats} --precision {asked}{' --compile' if args.compile else ''}"
               f"{' --no-steps' if args.no_steps else ''}`")
    machine_line = f"Precision: {args.precision}. Machine: {machine()}; ISA: {isa_flags()}."
    forward_backward = ("Forward+backward of the bare torchvision detector alone (no optimizer, no Lightning), its "
                        f"own RoIAlign vs the sparse one, median of {args.repeats * 2} alternating runs:\n\n"
                        + "\n".join(pairs))
    if args.no_steps:  # a section of its own: the whole-step table stays as it was measured
        body = (f"## Detector forward+backward: torchvision's RoIAlign vs the sparse one\n\n{command}. {machine_line}"
                f"\n\n{forward_backward}")
        return publish("detector_forward_backward", body, args)
    body = (f"## Detector training: `ObjectDetector` in Lightning vs a bare loop over the same torchvision detector"
            f"\n\n{command}: SGD steps on one fixed batch of each config's size, median s/step of {args.repeats} "
            f"alternating rounds; speed-up = bare / ours (> 1: ours faster; the bare loop is NCHW eager, with "
            f"torchvision's RoIAlign).\n{machine_line}\n\n" + "\n".join(steps) + f"\n\n{forward_backward}")
    return publish("detector", body, args)


if __name__ == "__main__":
    main()
