"""Which classes a model is built with: the data's, or the checkpoint's where the data has no labels to compare with.

A checkpoint carries its classes (``checkpoint["label_map"]``, written by ``BackboneTask.on_save_checkpoint``).
Where a stage compares the model's outputs with labels (fit, validate, test, and predict on the validation set),
the data's categories and the checkpoint's must be the same, and a difference is an error. Predicting on images
without labels takes the checkpoint's classes whatever the config's data lists (another training set, or none).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from .data.labels import LabelMap

log = logging.getLogger("tasks")


class ClassesError(ValueError):
    """The model's classes cannot be worked out, or the data's and the checkpoint's differ where they must agree."""


def checkpoint_label_map(checkpoint: Mapping[str, Any]) -> Optional[LabelMap]:
    """The classes a loaded checkpoint holds: its ``label_map``, or, in a checkpoint written before there was one,
    the ``num_classes``/``categories`` among its hyperparameters; ``None`` if it has neither."""
    if checkpoint.get("label_map") is not None:
        return LabelMap.from_dict(checkpoint["label_map"])
    hyperparameters = checkpoint.get("hyper_parameters") or {}
    if isinstance(hyperparameters.get("num_classes"), int):
        return LabelMap.from_categories(hyperparameters.get("categories"), hyperparameters["num_classes"])
    return None


def read_checkpoint_label_map(path: str) -> Optional[LabelMap]:
    """:func:`checkpoint_label_map` of the checkpoint file at ``path`` (memory-mapped: the weights are not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: no memory map
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint_label_map(checkpoint)


def describe(categories: Mapping[int, str], at_most: int = 8) -> str:
    """``{3: 'square', 5: 'disk', ...} (12 categories)``, for messages."""
    items = list(categories.items())
    shown = ", ".join(f"{k}: {v!r}" for k, v in items[:at_most]) + (", ..." if len(items) > at_most else "")
    return f"{{{shown}}} ({len(items)} categories)"


def data_categories(data) -> Optional[Dict[int, str]]:
    """The categories of a data module's labelled data: its ``categories``, or ``num_classes`` labels that are their
    own ids; ``None`` when it has no labelled data (only images to predict on)."""
    categories = getattr(data, "categories", None)
    if categories is not None:
        return dict(categories)
    num_classes = getattr(data, "num_classes", None)
    return None if num_classes is None else LabelMap.from_categories(None, num_classes).categories


def classes_for_model(data, stage: Optional[str], ckpt_path: Optional[str]) -> Dict[int, str]:
    """``{category id: name}`` to build the model with, for ``stage`` (``fit``, ``validate``, ``test``, ``predict``;
    ``None`` outside a subcommand) of ``data`` and the checkpoint file ``ckpt_path`` (if any).

    The checkpoint's classes when ``predict`` reads images without labels (the data module's
    ``predicts_unlabeled``) or the data has none; else the data's, which must then equal the checkpoint's.
    """
    ours = data_categories(data)
    theirs = read_checkpoint_label_map(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None
    if theirs is None:
        if ours is None:
            reason = (f"--ckpt_path {ckpt_path!r} is not a file here, so its classes cannot be read" if ckpt_path
                      else "no --ckpt_path was given")
            raise ClassesError(f"{type(data).__name__} has no labelled data to take the classes from, and {reason}; "
                               "give --ckpt_path of a trained model (its classes are used), or labelled data")
        return ours
    if ours is None or (stage == "predict" and getattr(data, "predicts_unlabeled", False)):
        if ours is not None and ours != theirs.categories:
            log.info("predicting with the checkpoint's classes %s; the config's data lists %s, which unlabeled "
                     "images do not use", describe(theirs.categories), describe(ours))
        return theirs.categories
    if ours != theirs.categories:
        source = getattr(data, "label_source", type(data).__name__)
        raise ClassesError(
            f"the checkpoint {ckpt_path} was trained on {describe(theirs.categories)}, but {source} lists "
            f"{describe(ours)}; {stage or 'this run'} compares the model's classes with those labels, so they must be "
            "the same. Give data with the checkpoint's categories, or predict on images without labels "
            "(--data.init_args.predict_images PATH for detection, --data.init_args.predict_dir PATH for "
            "classification), where the checkpoint's classes are used whatever the data lists")
    return ours
