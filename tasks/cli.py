"""The ``lightning`` command: LightningCLI in subclass mode, with the data module telling the model its classes.

    lightning fit --config configs/detection.yaml
    lightning validate --config configs/detection.yaml --ckpt_path last
    python -m tasks predict --config configs/detection.yaml --ckpt_path path/to/last.ckpt
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .checkpoint_io import AtomicCheckpointIO


class TaskCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth: the data module knows the classes, the model is told.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.categories", "model.init_args.categories", apply_on="instantiate")


def cli(args: Optional[List[str]] = None, run: bool = True) -> TaskCLI:
    """Build (and by default run) the CLI; returns it, so callers can inspect ``.trainer`` and ``.model``."""
    for name in ("tasks", "resnext_backbones"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
    return TaskCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   args=args, run=run, save_config_kwargs={"overwrite": True})


def main(args: Optional[List[str]] = None) -> None:
    """The ``lightning`` console script and ``python -m tasks``."""
    cli(args)
