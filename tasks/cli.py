"""The ``lightning`` command: LightningCLI in subclass mode, with the data module telling the model its classes.

    lightning fit --config configs/detection.yaml
    lightning validate --config configs/detection.yaml --ckpt_path last
    python -m tasks predict --config configs/detection.yaml --ckpt_path path/to/last.ckpt
    python -m tasks export path/to/last.ckpt --format onnx --output detector.onnx
"""

from __future__ import annotations

import logging
import sys
from typing import Dict, List, Literal, Optional, Union

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT  # the Trainer's own type of precision
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from resnext_backbones.deployment import auto_training_precision, training_precision_advice

from .checkpoint_io import AtomicCheckpointIO
from .classes import ClassesError, classes_for_model

# Model arguments that say how a run uses the model, not what the model is: with --ckpt_path, the run's values stand
RUN_ARGUMENTS = ("inference_precision", "fused_inference", "log_images", "tile")


class TaskTrainer(Trainer):
    """Lightning's ``Trainer``, also with ``precision="auto"`` (the shipped quick starts'): the precision that trains
    fastest on the device the accelerator picks (:func:`resnext_backbones.deployment.auto_training_precision`),
    chosen before Lightning's Trainer is built and logged with the reason. An explicit precision is kept as it is."""

    def __init__(self, *, precision: Union[_PRECISION_INPUT, Literal["auto"], None] = None, **kwargs) -> None:
        if precision == "auto":
            precision, why = auto_training_precision(training_device(kwargs.get("accelerator", "auto")))
            logging.getLogger("tasks").info("trainer.precision=auto: %s, as %s", precision, why)
        super().__init__(precision=precision, **kwargs)


def training_device(accelerator: Union[str, Accelerator, None]) -> str:
    """The device type Lightning trains on for ``trainer.accelerator`` (``auto``: CUDA where there is a GPU)."""
    if isinstance(accelerator, Accelerator):
        kinds = {CPUAccelerator: "cpu", CUDAAccelerator: "cuda"}
        return next((k for cls, k in kinds.items() if isinstance(accelerator, cls)), type(accelerator).__name__)
    name = accelerator or "auto"
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if name == "auto" else name


class TaskCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth: the data module knows the classes and the model is told, except where a checkpoint
        # predicts on unlabeled images: then its own classes win (tasks.classes says when and checks conflicts).
        parser.link_arguments("data", "model.init_args.num_classes", apply_on="instantiate",
                              compute_fn=lambda data: len(self.model_classes(data)))
        parser.link_arguments("data", "model.init_args.categories", apply_on="instantiate",
                              compute_fn=self.model_classes)

    def model_classes(self, data) -> Dict[int, str]:
        """The classes the model is built with (:func:`tasks.classes.classes_for_model`), worked out once."""
        if getattr(self, "_model_classes", (None,))[0] is not data:
            config = self.config[self.subcommand] if self.subcommand else self.config
            self._model_classes = (data, classes_for_model(data, self.subcommand, config.get("ckpt_path")))
        return self._model_classes[1]

    def _parse_ckpt_path(self) -> None:
        # Lightning puts every model argument of the --ckpt_path checkpoint over the config and the command line
        # (Lightning issue #20801). Those that say how to run a model, not what it is, keep this run's values.
        subcommand = self.config.get("subcommand")
        init_args = self.config[subcommand].get("model", {}).get("init_args") if subcommand else None
        ours = {k: init_args[k] for k in RUN_ARGUMENTS if init_args is not None and k in init_args}
        super()._parse_ckpt_path()
        for key, value in ours.items():
            self.config[subcommand].model.init_args[key] = value

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # a link's error comes wrapped in one that prints the whole data module
            if isinstance(e.__cause__, ClassesError):
                raise e.__cause__ from None
            raise

    def before_fit(self) -> None:
        # the fastest precision depends on the hardware (native bf16 is faster than float32, emulated bf16 much
        # slower): say which one runs, and what would be faster here
        if self.trainer.is_global_zero:
            logging.getLogger("tasks").log(*training_precision_advice(self.trainer.precision,
                                                                       self.trainer.strategy.root_device))

    def before_instantiate_classes(self) -> None:
        # Predictions reach the files through writer callbacks as batches finish; Lightning would otherwise also
        # keep every one of them in memory to return them, which the command line never uses.
        if self.subcommand == "predict" and self.config.predict.get("return_predictions") is None:
            self.config.predict.return_predictions = False


def cli(args: Optional[List[str]] = None, run: bool = True) -> TaskCLI:
    """Build (and by default run) the CLI; returns it, so callers can inspect ``.trainer`` and ``.model``."""
    for name in ("tasks", "resnext_backbones"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
    return TaskCLI(LightningModule, LightningDataModule, trainer_class=TaskTrainer, subclass_mode_model=True,
                   subclass_mode_data=True, args=args, run=run, save_config_kwargs={"overwrite": True})


def main(args: Optional[List[str]] = None) -> None:
    """The ``lightning`` console script and ``python -m tasks``; ``export`` goes to :mod:`tasks.export`."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from .export import main as export

        return export(argv[1:])
    cli(args)  # None: LightningCLI reads sys.argv itself
