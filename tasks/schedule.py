"""Learning-rate schedules shared by the tasks: linear warmup, then multi-step (detection) or cosine decay."""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Union

SCHEDULES = ("multistep", "cosine", "constant")
WARMUP_FACTOR = 0.001  # the warmup starts at this fraction of the base learning rate (detectron2's and mmdet's)


def lr_factor(schedule: str, *, total_steps: Union[int, Callable[[], int]], warmup_steps: int,
              milestones: Sequence[float] = (), gamma: float = 0.1) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step, as a function of the step (for
    ``LambdaLR``): a linear warmup from :data:`WARMUP_FACTOR` over ``warmup_steps``, then ``schedule``.

    ``milestones`` are fractions of ``total_steps`` (``[8/12, 11/12]`` is the detection 1x schedule), so one
    schedule serves any dataset size and epoch count. ``total_steps`` may be a function, asked once, after step 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not supported; choose one of {list(SCHEDULES)}")
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
        return 1.0

    return factor


def total_training_steps(trainer) -> int:
    """Optimizer steps in the whole fit, from the trainer (``max_steps`` or epochs x batches)."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("set trainer.max_epochs or trainer.max_steps: the learning-rate schedule needs a length")
    return int(steps)
