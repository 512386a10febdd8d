"""What both tasks share: optimizer and warmup schedule, channels_last, torch.compile, weight reporting."""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

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
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

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
        factor = warmup_then(self.lr_schedule, total_steps=total_training_steps(self.trainer),
                             warmup_steps=self.warmup_steps, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}


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
