"""Export a trained model whole: ``python -m tasks export CKPT --format onnx|torch_export --output FILE``.

The Lightning wiring of :func:`resnext_backbones.export`: the checkpoint's task in, the file and its class names
(``FILE.classes.json``) out. ``C`` below is the model's ``in_channels`` (3 for RGB; 1 gray, 4 RGB-D, ...). The
detector: one image ``(C, H, W)``, float in [0, 1], in; ``boxes`` (xyxy, in the input's pixels), ``scores`` and
``labels`` (the dataset's category ids) out, and for Mask R-CNN ``masks`` ``(N, 1, H, W)``: each detection's mask
probabilities, as torchvision's Mask R-CNN gives them (the task thresholds them at 0.5). The classifier: images
``(N, C, H, W)`` in [0, 1] in, class ``probabilities`` (in the order of the checkpoint's classes) out. The segmenter:
images ``(N, C, H, W)`` in [0, 1] in, ``logits`` ``(N, classes, H, W)`` at the input's size out. All take any image
size (:mod:`resnext_backbones.deployment.exporting` says which); ``--image-size H W`` only sets the size traced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import resnext_backbones as rb
from resnext_backbones.deployment.exporting import FORMATS, image_sides

from .base import BackboneTask
from .classification import ImageClassifier
from .detection import ObjectDetector
from .segmentation import SemanticSegmenter

TASKS = {"tasks.ObjectDetector": ObjectDetector, "tasks.detection.ObjectDetector": ObjectDetector,
         "tasks.ImageClassifier": ImageClassifier, "tasks.classification.ImageClassifier": ImageClassifier,
         "tasks.SemanticSegmenter": SemanticSegmenter, "tasks.segmentation.SemanticSegmenter": SemanticSegmenter}


class ExportedSegmenter(nn.Module):
    """Images ``(N, C, H, W)`` in [0, 1] -> logits ``(N, classes, H, W)`` at their size (one forward of the whole
    image: the task's ``sliding_window`` is a loop around the model, for the caller to run)."""

    def __init__(self, task: SemanticSegmenter) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: Tensor) -> Tensor:
        return self.task(images)


class ExportedClassifier(nn.Module):
    """Images ``(N, C, H, W)`` in [0, 1] -> class probabilities ``(N, classes)``."""

    def __init__(self, task: ImageClassifier) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: Tensor) -> Tensor:
        return self.task(images).softmax(-1)


def load_task(checkpoint: str) -> BackboneTask:
    """The task a Lightning checkpoint of this project holds, on the CPU, in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hyperparameters = content.get("hyper_parameters") if isinstance(content, dict) else None
    if not isinstance(hyperparameters, dict) or "state_dict" not in content:
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint of tasks.ObjectDetector, tasks.ImageClassifier "
                         "or tasks.SemanticSegmenter (no hyper_parameters/state_dict); export a trunk with python -m "
                         "resnext_backbones export")
    task_class = TASKS.get(hyperparameters.get("_class_path"))
    if task_class is None:
        task_class = ObjectDetector if "architecture" in hyperparameters else \
            SemanticSegmenter if "ignore_index" in hyperparameters else ImageClassifier
    return task_class.load_from_checkpoint(path, map_location="cpu").eval()


def export(checkpoint: str, fmt: str, output: str, image_size: Optional[Sequence[int]] = None) -> Path:
    """Export the model of ``checkpoint`` to ``output`` in ``fmt`` (``onnx`` | ``torch_export``); the class names go
    to ``<output>.classes.json``. Returns the path written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; choose one of {list(FORMATS)}")
    task = load_task(checkpoint)
    channels = task.trunk_module().in_channels  # what the stem takes: the exported model's input too
    if isinstance(task, ObjectDetector):
        model = task.model
        out = rb.export(model, output, fmt, image_size,
                        category_ids=[0] * task.label_map.offset + list(task.label_map.category_ids))
        what = f"one image ({channels}, H, W)"
    elif isinstance(task, SemanticSegmenter):
        model = ExportedSegmenter(task).eval()
        out = rb.export(model, output, fmt, image_size, output_names=["logits"])
        what = f"images (N, {channels}, H, W); logits (N, classes, H, W) out"
    else:
        model = ExportedClassifier(task).eval()
        out = rb.export(model, output, fmt, image_size, output_names=["probabilities"])
        what = f"images (N, {channels}, H, W)"
    kind = "RGB" if channels == 3 else f"{channels}-channel"
    classes = {"category_ids": list(task.label_map.category_ids), "names": list(task.label_map.names),
               "task": type(task).__name__, "input": f"{kind} float in [0, 1], {what}",
               "sides": list(image_sides(model))}
    Path(f"{out}.classes.json").write_text(json.dumps(classes, indent=2))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint of tasks.ObjectDetector, tasks.ImageClassifier or "
                                           "tasks.SemanticSegmenter")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torch_export (a .pt2 program)")
    parser.add_argument("--output", required=True, help="file to write (.onnx, .pt2)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="the image size to trace at (default: detectors their min_size, classifiers 224x224); "
                             "the exported model takes any")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.output, args.image_size)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {path} ({args.format}) and {path}.classes.json")
