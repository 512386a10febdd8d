"""Detector training step: our ObjectDetector through Lightning vs a bare PyTorch loop over torchvision's
FasterRCNN, on the same backbone, weights and batch.

    python -m benchmarks.detector [--config configs/detection.yaml] [--steps 8] [--repeats 5] [--compile]

The detector is the one the config builds (default: the quick start's); the bare loop trains a copy of the
torchvision ``FasterRCNN`` inside it. Both run SGD steps (forward, backward, optimizer step) on one fixed batch
(the config's batch size, images of its ``min_size``, 3 boxes each).
Ours is timed inside ``Trainer.fit`` from the second step's start to the last step's end, so the rows include
everything Lightning does per step (hooks, logging of 5 losses, the lr scheduler); the bare loop does the same
steps and a scheduler step. Every round runs the bare loop and each of our variants (``channels_last: false``,
``channels_last: true``, with ``--compile`` also ``compile: true``), in reversed order every other round; the
per-step median is reported, each variant against the same bare-loop (NCHW eager) timings.
"""

from __future__ import annotations

import copy
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer
from torchvision.models.detection import FasterRCNN

from tasks import ObjectDetector

from .common import benchmark_parser, machine, publish

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection.yaml"


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


def make_batch(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
    xy = torch.rand(n, 3, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 3, 2, generator=g) * size * 0.3], -1)
    targets = [{"boxes": b, "labels": torch.tensor([0, 1, 2]), "image_id": i} for i, b in enumerate(boxes)]
    return images, targets


def lightning_step_seconds(model: ObjectDetector, batch, steps: int) -> float:
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(model, train_dataloaders=Repeat(batch, steps))
    return timer.seconds


def bare_step_seconds(model: FasterRCNN, batch, steps: int) -> float:
    images, targets = batch
    images = [im.float() / 255 for im in images]
    targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / (steps - 1)


def main(argv=None) -> str:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--config", default=str(CONFIG.relative_to(CONFIG.parents[1])))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add the compile: true row (minutes on a CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = yaml.safe_load((CONFIG.parents[1] / args.config).read_text())  # relative to the repository
    init = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "channels_last", "compile")}
    batch = make_batch(config["data"]["init_args"]["batch_size"], init["min_size"])
    options = {"channels_last: false": {"channels_last": False}, "channels_last: true": {"channels_last": True}}
    if args.compile:
        options["compile: true"] = {"compile": True}

    def ours(**option) -> ObjectDetector:
        return ObjectDetector(**{**init, "num_classes": 3, "warmup_steps": 0, "lr_schedule": "constant"},
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-4),
                              **option)

    reference = ours()
    times = {name: [] for name in ["bare", *options]}
    for r in range(args.repeats):  # every variant in every round, the order reversed every other round
        bare = copy.deepcopy(reference.model)  # the same torchvision FasterRCNN, trained by a bare loop
        runs = [("bare", partial(bare_step_seconds, bare, batch, args.steps))]
        for name, option in options.items():
            model = ours(**option)
            model.model.load_state_dict(reference.model.state_dict())
            runs.append((name, partial(lightning_step_seconds, model, batch, args.steps)))
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            times[name].append(run())
    t = {name: statistics.median(v) for name, v in times.items()}
    rows = ["| ours (Lightning) | ours s/step | bare loop s/step | ratio |", "|---|---|---|---|"]
    for name in options:
        rows.append(f"| {name} | {t[name]:.3f} | {t['bare']:.3f} | {t['bare'] / t[name]:.3f} |")
        print(rows[-1], flush=True)
    body = (f"## Detector training step: `ObjectDetector` in Lightning vs a bare loop over torchvision `FasterRCNN`"
            f"\n\n`python -m benchmarks.detector --config {args.config} --steps {args.steps} --repeats {args.repeats}"
            f"{' --compile' if args.compile else ''}`: the config's detector ({init['backbone']}, "
            f"{len(batch[0])} images of {init['min_size']}x{init['min_size']}), SGD, median s/step of "
            f"{args.repeats} alternating rounds; ratio = bare / ours (> 1: ours faster; the bare loop is NCHW eager)."
            f"\nMachine: {machine()}.\n\n" + "\n".join(rows))
    return publish("detector", body, args)


if __name__ == "__main__":
    main()
