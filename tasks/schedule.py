"""Learning-rate schedules shared by the tasks: linear warmup, then multi-step (detection), cosine or polynomial
(segmentation) decay."""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Union

SCHEDULES = ("multistep", "cosine", "poly", "constant")
WARMUP_FACTOR = 0.001  # the warmup starts at this fraction of the base learning rate (detectron2's and mmdet's)
# mmsegmentation's PolyLR (configs/_base_/schedules/schedule_160k.py, commit 229a6c8d: power=0.9, eta_min=1e-4 for
# lr 0.01) and mmcv's poly policy before it (whai362/PVT segmentation/configs, commit 57e2dfaa: power=0.9)
POLY_POWER = 0.9


def lr_factor(schedule: str, *, total_steps: Union[int, Callable[[], int]], warmup_steps: int,
              milestones: Sequence[float] = (), gamma: float = 0.1, min_factor: float = 0.0
              ) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step, as a function of the step (for
    ``LambdaLR``): a linear warmup from :data:`WARMUP_FACTOR` over ``warmup_steps``, then ``schedule``.

    ``milestones`` are fractions of ``total_steps`` (``[8/12, 11/12]`` is the detection 1x schedule), so one
    schedule serves any dataset size and epoch count. ``total_steps`` may be a function, asked once, after step 0.
    ``poly`` is mmsegmentation's ``PolyLR`` over the steps after the warmup: ``(1 - t / T) ** 0.9 * (1 - m) + m`` at
    the ``t``-th of them, ``T`` the index of the last, the base learning rate decaying to ``min_factor`` (``m``) of it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not supported; choose one of {list(SCHEDULES)}")
    if not 0 <= min_factor <= 1:
        raise ValueError(f"min_factor={min_factor!r} must be in [0, 1]: the poly schedule's floor, as a fraction "
                         "of the learning rate")
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"milestones={list(milestones)} must be fractions of training in (0, 1), e.g. [0.667, 0.917]")
    count = total_steps if callable(total_steps) else lambda: total_steps

    @functools.cache
    def lengths() -> tuple:
        total = max(1, int(count()))
        return total, max(0, min(warmup_steps, total))

    def factor(step: int) -> float:
        if step == 0:  # depends on no length: LambdaLR asks for it before the trainer has loaded the data
            return WARMUP_FACTOR if warmup_steps > 0 else 1.0
        total_steps, warmup_steps_ = lengths()
        if step < warmup_steps_:
            alpha = step / warmup_steps_
            return WARMUP_FACTOR * (1 - alpha) + alpha
        if schedule == "multistep":
            return gamma ** sum(step >= m * total_steps for m in milestones)
        if schedule == "cosine":
            progress = (step - warmup_steps_) / max(1, total_steps - warmup_steps_)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "poly":  # mmengine's PolyLR: total_iters = end - begin - 1, the last step at the floor
            progress = (step - warmup_steps_) / max(1, total_steps - warmup_steps_ - 1)
            return (1 - min(1.0, progress)) ** POLY_POWER * (1 - min_factor) + min_factor
        return 1.0

    return factor


def total_training_steps(trainer) -> int:
    """Optimizer steps in the whole fit, from the trainer (``max_steps`` or epochs x batches)."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("set trainer.max_epochs or trainer.max_steps: the learning-rate schedule needs a length")
    return int(steps)
