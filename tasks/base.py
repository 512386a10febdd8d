"""What both tasks share: optimizer and warmup schedule, channels_last, torch.compile, weight reporting."""

from __future__ import annotations

import logging
import random
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR

from .schedule import total_training_steps, warmup_then

log = logging.getLogger("tasks")


def sgd(params: Iterable, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """The detection 1x default (Goyal et al. / Detectron): SGD, lr 0.02 for 16 images, momentum 0.9, wd 1e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class BackboneTask(LightningModule):
    """Base of :class:`~tasks.ImageClassifier` and :class:`~tasks.ObjectDetector`.

    Args:
        optimizer: any ``torch.optim`` class (``class_path`` + ``init_args`` in YAML); frozen parameters are left out.
        lr_schedule: ``multistep`` | ``cosine`` | ``constant``, after a linear warmup, stepped every optimizer step.
        warmup_steps: optimizer steps of linear warmup from ``0.001 x lr``.
        milestones: for ``multistep``, fractions of training where the lr drops by ``gamma`` (1x: [0.667, 0.917]).
        gamma: lr factor at each milestone.
        channels_last: run the network in NHWC memory format (faster convolutions on CPU and tensor cores).
        compile: ``torch.compile`` the trunk (in place, so checkpoints keep their keys).
        skip_nonfinite_loss: on a NaN/inf loss, skip the step (zero gradient; momentum and weight decay still
            apply) and count it, instead of stopping with an error that names the step and the batch.
    """

    def __init__(self, *, optimizer: OptimizerCallable, lr_schedule: str, warmup_steps: int,
                 milestones: Sequence[float], gamma: float, channels_last: bool, compile: bool,
                 skip_nonfinite_loss: bool) -> None:
        super().__init__()
        warmup_then(lr_schedule, total_steps=1, warmup_steps=0, milestones=milestones)  # validate early
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps, self.milestones, self.gamma = lr_schedule, warmup_steps, milestones, gamma
        self.channels_last, self.compile_trunk = channels_last, compile
        self.skip_nonfinite_loss, self.skipped_steps = skip_nonfinite_loss, 0

    def guard_loss(self, loss: torch.Tensor, what: str) -> torch.Tensor:
        """``loss`` if finite; else an error naming the step and batch, or (``skip_nonfinite_loss``) a zero loss
        on every trainable parameter, so that all DDP processes still take part in the step."""
        if torch.isfinite(loss):
            return loss
        message = f"non-finite loss ({loss.item()}) at step {self.global_step}, batch of {what}"
        if not self.skip_nonfinite_loss:
            raise FloatingPointError(f"{message}. Lower the learning rate, add warmup or gradient clipping, check "
                                     "those images' boxes, or set model.skip_nonfinite_loss: true to skip such steps")
        self.skipped_steps += 1
        log.warning("%s: step skipped (%d so far)", message, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))
        return self.zero_loss()

    def zero_loss(self) -> torch.Tensor:
        """A loss of zero on every trainable parameter: the step goes on with a zero gradient (momentum and weight
        decay still apply), and all DDP processes still take part in it."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    # -- exact resumption: the RNG states (augmentations, detector sampling, MixUp) are part of the checkpoint and
    # are put back right before the first training step after a restart, so that nothing Lightning does while
    # restarting (sanity checks, new loader iterators) can move them.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if getattr(self, "_rng_states_to_restore", None) is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """As Lightning's, but the initial ``weights`` file is not loaded again: the checkpoint holds the weights,
        and the file it started from may not exist where the checkpoint is used."""
        kwargs.setdefault("weights", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_trunk:
            self.trunk_module().compile(dynamic=True)

    def trunk_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        # The length is asked for after the first step: reading trainer.estimated_stepping_batches here would load
        # the training data before Lightning restores the loader's position (Lightning issue #20550).
        factor = warmup_then(self.lr_schedule, total_steps=lambda: total_training_steps(self.trainer),
                             warmup_steps=self.warmup_steps, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}


def rng_states() -> dict:
    """The states of every random number generator a training step may draw from (torch CPU and CUDA, numpy,
    Python's ``random``), as tensors and plain Python values: checkpoints load with ``weights_only=True``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                      has_gauss, gauss),
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` under torch.distributed (any picklable, any size), else ``[obj]``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_categories(num_classes: int, categories: Optional[dict]) -> Optional[dict]:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes!r} must be a positive integer")
    if categories is not None:
        categories = {int(k): str(v) for k, v in categories.items()}
        if len(categories) != num_classes:
            raise ValueError(f"model.categories has {len(categories)} entries but num_classes={num_classes}")
    return categories
