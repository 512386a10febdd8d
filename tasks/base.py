"""What both tasks share: the label map, the steps and their guards, per-stage metrics, optimizer and warmup
schedule, channels_last, torch.compile, exact resumption."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import random
from typing import Dict, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric, MetricCollection

from .classes import ClassesError, checkpoint_label_map, describe
from .data.labels import LabelMap
from .inference import InferenceRunner, precision_name
from .schedule import lr_factor, total_training_steps

log = logging.getLogger("tasks")


def sgd(params: Iterable, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """The detection 1x default (Goyal et al. / Detectron): SGD, lr 0.02 for 16 images, momentum 0.9, wd 1e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class BackboneTask(LightningModule):
    """Base of :class:`~tasks.ImageClassifier` and :class:`~tasks.ObjectDetector`: the label map, the steps with the
    skipped-batch and non-finite-loss guards, metrics cloned per evaluation stage, optimizer and schedule.

    A subclass declares its own recipe (``optimizer``, ``lr_schedule``, ``warmup_steps``, ``milestones``, whose
    defaults differ by task) and forwards the rest with ``**kwargs``: jsonargparse and ``save_hyperparameters`` see
    them as the subclass's own.

    Args:
        num_classes: classes (object categories without background), told by the data module in the CLI.
        categories: ``{category id: name}``, told by the data module; the label map is built from it (without it,
            ``num_classes`` labels that are their own ids) and saved in checkpoints as ``checkpoint["label_map"]``.
        optimizer: any ``torch.optim`` class (``class_path`` + ``init_args`` in YAML); frozen parameters are left out.
        lr_schedule: ``multistep`` | ``cosine`` | ``poly`` | ``constant``, after a linear warmup, stepped every
            optimizer step (``poly``: mmsegmentation's ``PolyLR``, power 0.9, from the lr down to ``min_lr``).
        warmup_steps: optimizer steps of linear warmup from ``0.001 x lr``.
        milestones: for ``multistep``, fractions of training where the lr drops by ``gamma`` (1x: [0.667, 0.917]).
        gamma: lr factor at each milestone.
        min_lr: for ``poly``, the learning rate of the last step (mmsegmentation's ``eta_min``; each parameter
            group's lr decays to it).
        channels_last: run the network in NHWC memory format (faster convolutions on CPU and tensor cores).
        compile: ``torch.compile`` the trunk (in place, so checkpoints keep their keys).
        skip_nonfinite_loss: on a NaN/inf loss, skip the step (zero gradient; momentum and weight decay still
            apply) and count it, instead of stopping with an error that names the step and the batch.
        inference_precision: ``32`` | ``bf16`` | ``16``: the precision of validate, test and predict, whatever
            ``trainer.precision`` (the training precision) is. Low precision runs the trunk, the FPN and the heads'
            networks natively in that dtype; box decoding and the rest of postprocessing stay float32. Applied where
            the device computes it natively (CUDA; CPUs with AMX or AVX-512 BF16 / FP16); elsewhere a warning, once,
            and float32.
        fused_inference: validate, test and predict run the network's inference copy
            (:func:`resnext_backbones.inference_copy`: the trunk fused, norms folded into its convolutions; the FPN
            and heads on packed convolutions; RoI poolers as sparse products on the CPU), rebuilt whenever the
            weights change; ``false`` runs the model as trained (in ``inference_precision``). A GroupNorm trunk is
            never fused.
    """

    STAGES = ("val", "test")
    INFERENCE_NETWORK: str  # the child that validate/test/predict replace by its inference copy

    def __init__(self, *, num_classes: int, categories: Optional[Dict[int, str]], optimizer: OptimizerCallable,
                 lr_schedule: str, warmup_steps: int, milestones: Sequence[float], gamma: float = 0.1,
                 min_lr: float = 0.0, channels_last: bool = False, compile: bool = False,
                 skip_nonfinite_loss: bool = False,
                 inference_precision: Union[int, str] = 32, fused_inference: bool = True) -> None:
        super().__init__()
        # the arguments of this __init__ and of the subclass's that called it (Lightning walks the frames)
        self.save_hyperparameters(ignore=["optimizer"])
        lr_factor(lr_schedule, total_steps=1, warmup_steps=0, milestones=milestones)  # validate early
        self.label_map = label_map_of(num_classes, categories)
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps, self.milestones, self.gamma = lr_schedule, warmup_steps, milestones, gamma
        if min_lr < 0 or (min_lr > 0 and lr_schedule != "poly"):
            raise ValueError(f"model.min_lr={min_lr!r}: the floor of lr_schedule: poly, a learning rate >= 0; with "
                             f"lr_schedule: {lr_schedule} leave it 0")
        self.min_lr = float(min_lr)
        self.channels_last, self.compile_trunk = channels_last, compile
        self.skip_nonfinite_loss, self.skipped_steps = skip_nonfinite_loss, 0
        self.inference_runner = InferenceRunner(precision_name(inference_precision), fused_inference)

    def __deepcopy__(self, memo: dict) -> BackboneTask:
        """A copy of the module (what Lightning's ``WeightAveraging`` makes) that shares the optimizer factory instead
        of copying it: the command line's factory is a closure over the whole ``LightningCLI``, data module included,
        whose loader state (a ``multiprocessing.Value``) cannot be copied, and a factory has no state to average."""
        memo[id(self.optimizer_factory)] = self.optimizer_factory
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    @property
    def categories(self) -> Dict[int, str]:
        """``{category id: name}`` of the model's classes."""
        return self.label_map.categories

    def stage_metrics(self, metrics: Union[Metric, MetricCollection]) -> nn.ModuleDict:
        """A clone of ``metrics`` per evaluation stage (``val``, ``test``): no stage reads another's state."""
        return nn.ModuleDict({stage: metrics.clone() for stage in self.STAGES})

    # -- the steps. A batch is ``None`` when every image in it was skipped as corrupt (data.skip_corrupt_images):
    # training still takes a (zero) step, so that all DDP processes take part in it; evaluation skips it.
    def training_step(self, batch, batch_idx: int) -> Tensor:
        if batch is None:
            return self.zero_loss()
        loss = self.guard_loss(self.training_loss(batch, batch_idx), self.describe_batch(batch, batch_idx))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch is not None:
            self.evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        if batch is not None:
            self.evaluation_step(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx: int):
        return self.empty_prediction() if batch is None else self.predict_batch(batch)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Inside the block, forwards run as validate/test/predict do (:mod:`tasks.inference`): the network's
        inference copy in its place, at ``inference_precision``, with any autocast of the trainer's turned off."""
        with torch.autocast(self.device.type, enabled=False), \
                self.inference_runner.swapped_in(self, self.INFERENCE_NETWORK):
            yield

    def on_train_epoch_start(self) -> None:
        self.inference_runner.release()  # its weights are about to change: no copy held through training

    # Each evaluation and prediction epoch makes its inference copy from the weights the model holds as it starts: a
    # weight-averaging callback (Lightning's EMAWeightAveraging) has swapped the averaged weights in by then (callbacks'
    # hooks run before the module's), and out again when it ends.
    def on_validation_epoch_start(self) -> None:
        self.inference_runner.release()

    def on_test_epoch_start(self) -> None:
        self.inference_runner.release()

    def on_predict_epoch_start(self) -> None:
        self.inference_runner.release()

    def training_loss(self, batch, batch_idx: int) -> Tensor:
        """The loss of a training batch (log its parts here; ``train/loss`` is logged by the base)."""
        raise NotImplementedError

    def evaluation_step(self, batch, batch_idx: int, stage: str) -> None:
        """Validation and test alike; ``stage`` is ``val`` or ``test``, the prefix of what is logged."""
        raise NotImplementedError

    def predict_batch(self, batch):
        raise NotImplementedError

    def empty_prediction(self):
        """What ``predict`` gives for a batch whose images were all skipped."""
        return []

    def describe_batch(self, batch, batch_idx: int) -> str:
        """The batch, as an error message names it."""
        return f"{len(batch[0])} images (batch {batch_idx})"

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
        checkpoint["label_map"] = self.label_map.to_dict()  # as plain values, beside the categories it came from
        checkpoint["input_normalization"] = dict(self.trunk_module().normalization)  # what the weights expect

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint_label_map(checkpoint)
        if saved is not None and saved.categories != self.categories:
            raise ClassesError(f"the checkpoint holds a model of {describe(saved.categories)}, but this model was "
                               f"built for {describe(self.categories)}; build it with the checkpoint's categories "
                               "(the lightning command does so where the data's labels allow)")
        self._rng_states_to_restore = checkpoint.get("rng_states")
        if "input_normalization" in checkpoint:  # not from the (possibly absent) initial weights file
            self.set_normalization(checkpoint["input_normalization"])

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

    def set_normalization(self, normalization: Dict[str, Sequence[float]]) -> None:
        """Normalise inputs with ``normalization`` (``mean``/``std``, one per input channel, of images in [0, 1]): the
        convention of the trunk's weights (registry entry, our safetensors) or the config's, recorded in checkpoints.
        The trunk's ``normalization`` is its one owner; a task that keeps a copy where its forward reads it (the
        classifier's buffers, the detector's torchvision transform) extends this method to set that copy from the
        trunk's, so that this is the one place the normalisation changes."""
        channels = getattr(self.trunk_module(), "in_channels", 3)
        values = {k: tuple(float(x) for x in normalization[k]) for k in ("mean", "std")}
        if any(len(v) != channels for v in values.values()) or min(values["std"]) <= 0:
            raise ValueError(f"model.normalization: mean {list(values['mean'])} and std {list(values['std'])} need "
                             f"one value per input channel ({channels}, model.in_channels), std above 0")
        self.trunk_module().normalization = values
        self.inference_runner.release()  # the copy holds the normalisation it was made with

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        # The length is asked for after the first step: reading trainer.estimated_stepping_batches here would load
        # the training data before Lightning restores the loader's position (Lightning issue #20550).
        total = functools.cache(lambda: total_training_steps(self.trainer))
        factors = [lr_factor(self.lr_schedule, total_steps=total, warmup_steps=self.warmup_steps,
                             milestones=self.milestones, gamma=self.gamma, min_factor=self._min_factor(group["lr"]))
                   for group in optimizer.param_groups]  # one per group: each decays to min_lr from its own lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factors), "interval": "step"}}

    def _min_factor(self, lr: float) -> float:
        if self.min_lr > lr:
            raise ValueError(f"model.min_lr={self.min_lr} is above the optimizer's lr={lr}: the poly schedule decays "
                             "from the lr down to min_lr; lower min_lr")
        return self.min_lr / lr if lr > 0 else 0.0


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


def label_map_of(num_classes: int, categories: Optional[Dict[int, str]]) -> LabelMap:
    """The model's label map: its categories (from the data module) or, without them, ``num_classes`` labels that
    are their own ids."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes!r} must be a positive integer")
    if categories is not None and len(categories) != num_classes:
        raise ValueError(f"model.categories has {len(categories)} entries but num_classes={num_classes}")
    return LabelMap.from_categories(categories, num_classes)
