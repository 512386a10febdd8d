"""Export a trained model whole: ``python -m tasks export CKPT --format onnx|torch_export --output FILE``.

The detector goes out from preprocessing to postprocessing: one RGB image ``(3, H, W)``, float in [0, 1] (the model
normalises and resizes it), in; ``boxes`` (xyxy, in the input's pixels), ``scores`` and ``labels`` (the dataset's
category ids) out, and for Mask R-CNN ``masks`` ``(N, 1, H, W)``: each detection's mask probabilities in the input's
pixels, as torchvision's Mask R-CNN gives them (the task thresholds them at 0.5). The classifier: images
``(N, 3, H, W)`` in [0, 1] in, class ``probabilities`` (in the order of the checkpoint's classes) out. Class names
travel beside the file as ``FILE.classes.json``.

Both formats come from one ``torch.export`` program: ``torch_export`` saves it (``.pt2``, ``torch.export.load``),
``onnx`` translates it (torch.onnx's ``dynamo=True`` exporter; onnxruntime runs it). Both take any image height and
width from 64 to 4096 px (the classifier any batch too); ``--image-size H W`` only sets the size traced (default: a
detector's ``min_size`` by 5/4 of it, a classifier 224 x 224).

torchvision's detectors compute their resize scale, padding and box rescaling with Python arithmetic on the image size,
which ``torch.export`` would fix to the traced size; while tracing, :func:`traceable_torchvision` puts twins in their
place that do the same arithmetic on symbolic sizes (and twins of the functions that branch on the number of boxes,
which also let NMS keep fewer than 2). Two limits remain. torch.export treats a size of 1 apart, so the coarsest feature
map, traced at 2 cells or more a side, must stay so: the resized image (shorter side ``min_size`` unless the longer
would pass ``max_size``) needs sides above 64 px for Faster / Mask R-CNN (P6, stride 64), above 128 px for RetinaNet and
FCOS (P7, stride 128). A detector whose ``min_size`` is that stride or less takes only images resized on the same side
of it as the traced image (:func:`warn_of_one_cell_levels`); otherwise only images of an aspect ratio beyond
``max_size`` / 65 (R-CNN) or / 129 are refused (the torch_export program raises ``Guard failed``; the ONNX file checks
nothing). And torchvision's MultiScaleRoIAlign takes its levels' scales from the first image it sees and keeps them;
the export takes them from the traced image, as the eager model would from an image of that size (the same scales
for any resized height above 67 px).
(torch.onnx's older TorchScript exporter gave other detections than the model for some image sizes when tried with
torch 2.14 / torchvision 0.29, also on torchvision's own backbone.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import _utils as detection_utils
from torchvision.models.detection import roi_heads
from torchvision.models.detection import transform as detection_transform
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers, roi_align

from .base import BackboneTask
from .classification import ImageClassifier
from .detection import ARCHITECTURES, ObjectDetector

FORMATS = ("onnx", "torch_export")
MIN_SIDE, MAX_SIDE = 64, 4096  # the image sides an exported model takes
COARSEST_STRIDE = {"pool": 64, "p6p7": 128}  # a detector FPN's extra levels -> the stride of its coarsest level
TASKS = {"tasks.ObjectDetector": ObjectDetector, "tasks.detection.ObjectDetector": ObjectDetector,
         "tasks.ImageClassifier": ImageClassifier, "tasks.classification.ImageClassifier": ImageClassifier}


class ExportedDetector(nn.Module):
    """One image ``(3, H, W)`` in [0, 1] -> ``(boxes, scores, labels)``, labels as the dataset's category ids, and
    ``masks`` after them where the detector predicts masks."""

    def __init__(self, task: ObjectDetector) -> None:
        super().__init__()
        self.detector, self.masks = task.model, task.predicts_masks
        ids = [0] * task.label_map.offset + list(task.label_map.category_ids)  # model class -> category id
        self.register_buffer("category_ids", torch.tensor(ids, dtype=torch.int64))

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        (detections,) = self.detector([image])
        outputs = detections["boxes"], detections["scores"], self.category_ids[detections["labels"]]
        return outputs + (detections["masks"],) if self.masks else outputs


class ExportedClassifier(nn.Module):
    """Images ``(N, 3, H, W)`` in [0, 1] -> class probabilities ``(N, classes)``."""

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
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint of tasks.ObjectDetector or tasks.ImageClassifier "
                         "(no hyper_parameters/state_dict); export a trunk with python -m resnext_backbones export")
    task_class = TASKS.get(hyperparameters.get("_class_path"))
    if task_class is None:
        task_class = ObjectDetector if "architecture" in hyperparameters else ImageClassifier
    return task_class.load_from_checkpoint(path, map_location="cpu").eval()


def export_module(task: BackboneTask) -> nn.Module:
    return (ExportedDetector(task) if isinstance(task, ObjectDetector) else ExportedClassifier(task)).eval()


# -- torch.export: torchvision's detection functions branch or loop in Python on data-dependent sizes (the number of
# boxes left after a threshold or NMS); their twins below compute the same values without such branches, and stand in
# for them only while a program is traced.
def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS per class in one call: each class's boxes moved apart by more than the largest coordinate (the same
    result as torchvision's ``batched_nms``, which loops over classes above 4,000 boxes on the CPU). Two boxes apart
    from all others, scored below them, go in and come out last, and are dropped: torchvision's fake ``nms`` tells
    torch.export that it keeps at least 2 boxes, which the program asserts at run time (fewer would raise)."""
    extent = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()  # defined on no boxes too
    moved = boxes + (idxs.to(boxes) * (extent + 1))[:, None]
    top = torch.cat([moved.reshape(-1), moved.new_zeros(1)]).max()
    apart = top + torch.tensor([[1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]], dtype=boxes.dtype, device=boxes.device)
    below = (torch.cat([scores, scores.new_zeros(1)]).min() - 1).expand(2)
    return torch.ops.torchvision.nms(torch.cat([moved, apart]), torch.cat([scores, below]), iou_threshold)[:-2]


def _decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
    """``BoxCoder.decode`` of ``(boxes, 4 * k)`` codes (what the RPN and the box head give it) into ``(boxes, k, 4)``
    with the sizes spelled out, where torchvision reshapes by ``-1`` only when there are boxes (a ``-1`` is ambiguous
    on none): a branch on the number of boxes NMS kept."""
    concat_boxes = torch.cat(boxes, dim=0)
    return self.decode_single(rel_codes, concat_boxes).reshape(concat_boxes.shape[0], rel_codes.shape[-1] // 4, 4)


def _multiscale_roi_align(features: List[Tensor], boxes: List[Tensor], output_size: List[int], sampling_ratio: int,
                          scales: Optional[List[float]], mapper) -> Tensor:
    """RoIAlign of each box on the pyramid level ``mapper`` assigns it (torchvision's values), gathered with an
    out-of-place ``index_put`` instead of a Python-sized result filled in place."""
    rois = poolers._convert_to_roi_format(boxes)
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, scales[0], sampling_ratio)
    levels = mapper(boxes)
    result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
        index = torch.where(levels == level)[0]
        pooled = roi_align(feature, rois[index], output_size, scale, sampling_ratio)
        result = result.index_put((index,), pooled.to(result.dtype))
    return result


def _paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape: Tuple[int, int], padding: int = 1) -> Tensor:
    """Each detection's mask resized into its box in the image (torchvision's values: the mask padded, the box grown
    to match and truncated to integers, a bilinear resize without corner alignment), for all detections at once as
    ``rows @ mask @ columns^T`` with per-box interpolation matrices, where torchvision loops over detections."""
    masks, scale = roi_heads.expand_masks(masks, padding)
    boxes = roi_heads.expand_boxes(boxes, scale).to(torch.int64)
    rows = _resize_weights(boxes[:, 1], boxes[:, 3], img_shape[0], masks.shape[-2])
    columns = _resize_weights(boxes[:, 0], boxes[:, 2], img_shape[1], masks.shape[-1])
    return (rows @ masks[:, 0] @ columns.transpose(1, 2))[:, None]


def _resize_weights(start: Tensor, end: Tensor, pixels: int, size: int) -> Tensor:
    """``(boxes, pixels, size)``: the weights by which each image pixel along one axis takes the ``size`` mask cells,
    for a mask resized to ``end - start + 1`` pixels at ``start`` (zero outside it), as ``F.interpolate`` would."""
    length = (end - start + 1).clamp(min=1)
    inside = torch.arange(pixels, device=start.device) - start[:, None]  # the pixel's index in the resized mask
    source = ((inside + 0.5) * (size / length)[:, None] - 0.5).clamp(min=0)
    low = source.long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    frac, keep = source - low, (inside >= 0) & (inside < length[:, None])
    weights = source.new_zeros((*source.shape, size))
    weights.scatter_add_(2, low[..., None], ((1 - frac) * keep)[..., None])
    return weights.scatter_add_(2, high[..., None], (frac * keep)[..., None])


# -- dynamic image size: torchvision computes the resize, the padding and the box rescaling from the image size with
# Python arithmetic that torch.export would fix to the traced size (a comparison picks the side that limits the
# resize; torch.tensor(size) makes a constant). The twins do the same arithmetic on symbolic sizes, so the program
# computes it from each input's size, with torchvision's values.
def _resize_image_and_masks(image: Tensor, self_min_size: int, self_max_size: int, target=None, fixed_size=None):
    """torchvision's inference resize: the scale that brings the shorter side to ``self_min_size`` unless the longer
    would pass ``self_max_size``, each side ``trunc(side * scale)`` in double precision (``interpolate`` with
    ``recompute_scale_factor=True``), bilinear. ``torch.sym_min`` picks the scale where torchvision's Python ``min``
    would branch; the interpolation then gets the size, which is what ``recompute_scale_factor`` gives it."""
    if target is not None or fixed_size is not None:
        raise NotImplementedError("the export resizes images without targets or a fixed size")
    height, width = image.shape[-2:]
    scale = torch.sym_min(self_min_size / torch.sym_float(torch.sym_min(height, width)),
                          self_max_size / torch.sym_float(torch.sym_max(height, width)))
    size = [torch.sym_int(torch.sym_float(height) * scale), torch.sym_int(torch.sym_float(width) * scale)]
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], None


def _resize_boxes(boxes: Tensor, original_size: List[int], new_size: List[int]) -> Tensor:
    """Boxes scaled from one image size to another by the ratio of the sizes, in float32 as torchvision's, with the
    sizes made tensors by ``torch.scalar_tensor`` (``torch.tensor`` of a symbolic size fixes it)."""
    ratio_height, ratio_width = (torch.scalar_tensor(new, dtype=torch.float32, device=boxes.device)
                                 / torch.scalar_tensor(old, dtype=torch.float32, device=boxes.device)
                                 for new, old in zip(new_size, original_size, strict=True))
    return boxes * torch.stack([ratio_width, ratio_height, ratio_width, ratio_height])


def _batch_images(self, images: List[Tensor], size_divisible: int = 32) -> Tensor:
    """``GeneralizedRCNNTransform.batch_images`` for one image: zeros below and right of it up to the next multiple of
    ``size_divisible``, as ``(side + divisible - 1) // divisible * divisible`` in integers, where torchvision goes
    through ``float(side)`` (which fixes a symbolic size) and copies into a slice (whose bound export cannot prove)."""
    if len(images) != 1:
        raise NotImplementedError("the export batches one image")
    (image,) = images
    height, width = image.shape[-2:]
    pad_height = (height + size_divisible - 1) // size_divisible * size_divisible - height
    pad_width = (width + size_divisible - 1) // size_divisible * size_divisible - width
    return F.pad(image, (0, pad_width, 0, pad_height))[None]


def _topk_min(input: Tensor, orig_kval: int, axis: int) -> int:
    """``min(k, size)`` as ``torch.sym_min``, where the number of anchors depends on the image size."""
    return torch.sym_min(orig_kval, input.size(axis))


@contextlib.contextmanager
def traceable_torchvision() -> Iterator[None]:
    """torchvision's detection functions replaced by their branch-free twins, for the duration of a trace."""
    places = [(box_ops, "batched_nms", _batched_nms), (poolers, "_multiscale_roi_align", _multiscale_roi_align),
              (detection_transform, "paste_masks_in_image", _paste_masks_in_image),
              (detection_transform, "_resize_image_and_masks", _resize_image_and_masks),
              (detection_transform, "resize_boxes", _resize_boxes), (detection_utils, "_topk_min", _topk_min),
              (detection_transform.GeneralizedRCNNTransform, "batch_images", _batch_images),
              (detection_utils.BoxCoder, "decode", _decode)]
    saved = [getattr(module, name) for module, name, _ in places]
    for module, name, twin in places:
        setattr(module, name, twin)
    try:
        yield
    finally:
        for (module, name, _), original in zip(places, saved, strict=True):
            setattr(module, name, original)


def program(task: BackboneTask, image_size: Optional[Sequence[int]] = None) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``task`` whole (:class:`ExportedDetector` or :class:`ExportedClassifier`), for
    any image height and width (and, the classifier, any batch); ``image_size`` is the size it is traced at."""
    module, detector = export_module(task), isinstance(task, ObjectDetector)
    if image_size is None and detector:  # a size the detector keeps: its own min_size
        transform = task.model.transform
        image_size = transform.min_size[-1], min(transform.max_size, transform.min_size[-1] * 5 // 4)
    height, width = image_size or (224, 224)
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    if detector:
        warn_of_one_cell_levels(task, image)
    # sides from 64 px: at 32 or less a classifier's C5 is 1x1, a size torch.export would have to treat apart (a
    # detector resizes the image first: its guards are on the resized size, see the module docstring)
    dims = [torch.export.Dim(name, min=low, max=MAX_SIDE) for name, low in (("batch", 1), ("height", MIN_SIDE),
                                                                             ("width", MIN_SIDE))]
    with torch.no_grad():
        if detector:
            # torchvision's MultiScaleRoIAlign infers its levels' scales from the first image it sees, in Python
            # floats, and keeps them: one eager call here fixes them as the task would, before the trace
            module(image)
            with traceable_torchvision():
                return torch.export.export(module, (image,), dynamic_shapes=({1: dims[1], 2: dims[2]},),
                                           strict=False)
        batch = torch.stack([image, image.flip(-1)])  # traced at batch 2: a size of 1 would be specialised
        return torch.export.export(module, (batch,), dynamic_shapes=({0: dims[0], 2: dims[1], 3: dims[2]},),
                                   strict=False)


def warn_of_one_cell_levels(task: ObjectDetector, image: Tensor) -> None:
    """Warn where the detector's resize can leave its coarsest feature level one cell a side: torch.export treats a
    size of 1 apart, so the program takes only images whose resized sides fall where the traced image's did."""
    stride = COARSEST_STRIDE[ARCHITECTURES[task.hparams.architecture].extra_blocks]
    transform = task.model.transform
    if transform.min_size[-1] <= stride:
        traced, resized = tuple(image.shape[-2:]), tuple(transform.resize(image, None)[0].shape[-2:])
        warnings.warn(f"model.min_size={transform.min_size[-1]} resizes images to a shorter side of at most "
                      f"{transform.min_size[-1]} px, where {task.hparams.architecture}'s coarsest feature level "
                      f"(stride {stride}) can be one cell a side: the exported program takes only images whose resized "
                      f"sides are on the same side of {stride} px as the traced image's ({traced} resized to "
                      f"{resized}; others raise 'Guard failed'). A detector with min_size above {stride} exports for "
                      "any image size", stacklevel=2)


def onnx_program(exported: torch.export.ExportedProgram, inputs: List[str], outputs: Optional[List[str]]):
    """``exported`` translated to ONNX by torch.onnx, with its arithmetic on symbolic sizes (the detector's resize
    scale and resized size) in float64, as Python computes it in the program: torch.onnx's translations of
    ``torch.sym_float`` and ``/`` cast to float32, which gives another resized size than torchvision's for about one
    image size in ten."""
    import operator

    import onnxscript
    from onnxscript import opset18 as op

    double = onnxscript.DOUBLE.dtype

    def sym_float(x):
        return op.Cast(x, to=double)

    def truediv(a, b):
        return op.Div(op.Cast(a, to=double), op.Cast(b, to=double))

    return torch.onnx.export(exported, dynamo=True, input_names=inputs, output_names=outputs, verbose=False,
                             custom_translation_table={torch.sym_float: sym_float, operator.truediv: truediv})


def export(checkpoint: str, fmt: str, output: str, image_size: Optional[Sequence[int]] = None) -> Path:
    """Export the model of ``checkpoint`` to ``output`` in ``fmt`` (``onnx`` | ``torch_export``); the class names go
    to ``<output>.classes.json``. Returns the path written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; choose one of {list(FORMATS)}")
    task = load_task(checkpoint)
    detector = isinstance(task, ObjectDetector)
    exported = program(task, image_size)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch_export":
        torch.export.save(exported, str(out))
    else:
        outputs = ["boxes", "scores", "labels", "masks"][:4 if task.predicts_masks else 3] if detector else \
            ["probabilities"]
        onnx = onnx_program(exported, ["image" if detector else "images"], outputs)
        onnx.save(str(out))
    classes = {"category_ids": list(task.label_map.category_ids), "names": list(task.label_map.names),
               "task": type(task).__name__, "input": "RGB float in [0, 1], " +
               ("one image (3, H, W)" if detector else "images (N, 3, H, W)"), "sides": [MIN_SIDE, MAX_SIDE]}
    Path(f"{out}.classes.json").write_text(json.dumps(classes, indent=2))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint of tasks.ObjectDetector or tasks.ImageClassifier")
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

