"""Whole-model export of models built on our trunks: :func:`export` (ONNX, or a ``torch.export`` program).

A torchvision detector (``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``, ``FCOS``) goes out from preprocessing to
postprocessing: one image ``(C, H, W)``, float in [0, 1] (the model normalises and resizes it), in; ``boxes`` (xyxy,
in the input's pixels), ``scores`` and ``labels`` out, and for Mask R-CNN ``masks`` ``(N, 1, H, W)``: each detection's
mask probabilities in the input's pixels, as torchvision's Mask R-CNN gives them. Any other module (a classifier)
goes out as it is: ``model(images)`` for images ``(N, C, H, W)``. ``C`` is the trunk's ``in_channels`` (3 for RGB;
1 gray, 4 RGB-D, ...): the example input traced has as many.

Both formats come from one ``torch.export`` program: ``torch_export`` saves it (``.pt2``, ``torch.export.load``),
``onnx`` translates it (torch.onnx's ``dynamo=True`` exporter; onnxruntime runs it). Both take any image height and
width from twice the trunk's coarsest stride (64 px) to 4096 px (a classifier any batch too); ``image_size`` only
sets the size traced (default: a detector's ``min_size`` by 5/4 of it, anything else 224 x 224).

torchvision's detectors compute their resize scale, padding and box rescaling with Python arithmetic on the image size,
which ``torch.export`` would fix to the traced size, and branch on the number of boxes left after a threshold or NMS.
The export traces a copy of the detector whose parts run twins that do the same arithmetic on symbolic sizes and
need no such branch (:func:`traceable_copy`): torchvision's own methods, with the twins in place of the module-level
functions they call, for that copy only; torchvision itself is never patched, so other threads run it as it is.

Two limits remain. torch.export treats a size of 1 apart, so the coarsest feature map, traced at 2 cells or more a
side, must stay so: the resized image (shorter side ``min_size`` unless the longer would pass ``max_size``) needs
sides above the coarsest level's stride (64 px for Faster / Mask R-CNN's P6, 128 px for RetinaNet's and FCOS's P7). A
detector whose ``min_size`` is that stride or less takes only images resized on the same side of it as the traced
image (:func:`warn_of_one_cell_levels`); otherwise only images of an aspect ratio beyond ``max_size`` / (stride + 1)
are refused (the torch_export program raises ``Guard failed``; the ONNX file checks nothing). And torchvision's
MultiScaleRoIAlign takes its levels' scales from the first image it sees and keeps them: the export takes them from
the traced image, as the eager model would from an image of that size.
(torch.onnx's older TorchScript exporter gave other detections than the model for some image sizes with torch 2.14 /
torchvision 0.29, also on torchvision's own backbone.)
"""

from __future__ import annotations

import copy
import functools
import types
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import roi_align

from ..fpn import ResNeXtFPN
from ..trunk import ResNeXt
from . import torchvision_private as tv
from .inference import _outermost

__all__ = ["FORMATS", "MAX_SIDE", "default_output_names", "export", "image_sides", "predicts_masks", "program",
           "traceable_copy", "warn_of_one_cell_levels"]

FORMATS = ("onnx", "torch_export")
MAX_SIDE = 4096  # the longest image side an exported model takes
DETECTORS = (GeneralizedRCNN, RetinaNet, FCOS)


class ExportedDetector(nn.Module):
    """One image ``(C, H, W)`` in [0, 1] -> ``(boxes, scores, labels)``, and ``masks`` after them where the detector
    predicts masks; labels through ``category_ids`` (model class -> id) where given."""

    def __init__(self, detector: nn.Module, category_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.detector, self.masks = detector, predicts_masks(detector)
        self.register_buffer("category_ids", None if category_ids is None else
                             torch.tensor(list(category_ids), dtype=torch.int64))

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        (detections,) = self.detector([image])
        labels = detections["labels"] if self.category_ids is None else self.category_ids[detections["labels"]]
        outputs = detections["boxes"], detections["scores"], labels
        return outputs + (detections["masks"],) if self.masks else outputs


def predicts_masks(detector: nn.Module) -> bool:
    """Whether a torchvision detector predicts instance masks (Mask R-CNN)."""
    heads = getattr(detector, "roi_heads", None)
    return bool(heads is not None and heads.has_mask())


def default_output_names(model: nn.Module) -> List[str]:
    """The names of the exported outputs: a detector's ``boxes, scores, labels`` (and ``masks``), else ``output``."""
    if isinstance(model, DETECTORS):
        return ["boxes", "scores", "labels"] + (["masks"] if predicts_masks(model) else [])
    return ["output"]


def image_sides(model: nn.Module) -> Tuple[int, int]:
    """The least and the most image side the export of ``model`` takes: twice its trunks' coarsest stride (there the
    trunk's last map is 2 cells a side; 1 is a size torch.export treats apart), and :data:`MAX_SIDE`."""
    strides = [max(t.strides.values()) for t in _outermost(model, (ResNeXt,))] or [32]
    return 2 * max(strides), MAX_SIDE


def export(model: nn.Module, path: Union[str, Path], format: str = "onnx",
           image_size: Optional[Sequence[int]] = None, *, category_ids: Optional[Sequence[int]] = None,
           input_names: Optional[List[str]] = None, output_names: Optional[List[str]] = None) -> Path:
    """Export ``model`` whole to ``path``: ``format`` ``onnx`` (onnxruntime runs it) or ``torch_export`` (a ``.pt2``
    program for ``torch.export.load``), for any image size (module docstring). ``model``: a torchvision detector
    on :func:`resnext_backbones.resnext_fpn`, or any module of images (a classifier); it is left as it is.
    ``category_ids`` maps a detector's classes to the labels it outputs (default: its classes); ``image_size`` is
    the ``(height, width)`` traced. ``input_names`` / ``output_names`` name the ONNX graph's inputs and outputs
    (default ``image`` or ``images``, and :func:`default_output_names`). Returns ``path``."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; choose one of {list(FORMATS)}")
    exported = program(model, image_size, category_ids=category_ids)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "torch_export":
        torch.export.save(exported, str(out))
    else:
        detector = isinstance(model, DETECTORS)
        onnx = onnx_program(exported, input_names or ["image" if detector else "images"],
                            output_names or default_output_names(model))
        onnx.save(str(out))
    return out


def program(model: nn.Module, image_size: Optional[Sequence[int]] = None, *,
            category_ids: Optional[Sequence[int]] = None) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``model`` whole, for any image height and width (anything but a detector:
    any batch too); ``image_size`` is the size it is traced at."""
    detector = isinstance(model, DETECTORS)
    if image_size is None and detector:  # a size the detector keeps: its own min_size
        transform = model.transform
        image_size = transform.min_size[-1], min(transform.max_size, transform.min_size[-1] * 5 // 4)
    height, width = image_size or (224, 224)
    trunk = next(iter(_outermost(model, (ResNeXt,))), None)
    channels = trunk.in_channels if trunk is not None else 3  # the example input has the trunk's channels
    image = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(0))
    low, high = image_sides(model)
    dims = {name: torch.export.Dim(name, min=least, max=high)
            for name, least in (("batch", 1), ("height", low), ("width", low))}
    with torch.no_grad():
        if not detector:
            batch = torch.stack([image, image.flip(-1)])  # traced at batch 2: a size of 1 would be specialised
            return torch.export.export(copy.deepcopy(model).eval(), (batch,), strict=False,
                                       dynamic_shapes=({0: dims["batch"], 2: dims["height"], 3: dims["width"]},))
        warn_of_one_cell_levels(model, image)
        module = ExportedDetector(traceable_copy(model), category_ids).eval()
        # torchvision's MultiScaleRoIAlign infers its levels' scales from the first image it sees, in Python
        # floats, and keeps them: one eager call here fixes them as the model would, before the trace
        module(image)
        return torch.export.export(module, (image,), dynamic_shapes=({1: dims["height"], 2: dims["width"]},),
                                   strict=False)


def warn_of_one_cell_levels(detector: nn.Module, image: Tensor) -> None:
    """Warn where the detector's resize can leave its coarsest feature level one cell a side: torch.export treats a
    size of 1 apart, so the program takes only images whose resized sides fall where the traced image's did."""
    backbone = detector.backbone
    if not isinstance(backbone, ResNeXtFPN):
        return
    stride = max(backbone.strides.values())
    transform = detector.transform
    if transform.min_size[-1] <= stride:
        traced, resized = tuple(image.shape[-2:]), tuple(transform.resize(image, None)[0].shape[-2:])
        warnings.warn(f"min_size={transform.min_size[-1]} resizes images to a shorter side of at most "
                      f"{transform.min_size[-1]} px, where this {type(detector).__name__}'s coarsest feature level "
                      f"(stride {stride}) can be one cell a side: the exported program takes only images whose resized "
                      f"sides are on the same side of {stride} px as the traced image's ({traced} resized to "
                      f"{resized}; others raise 'Guard failed'). A detector with min_size above {stride} exports for "
                      "any image size", stacklevel=3)


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


# -- the traceable copy: each part of a detector whose torchvision methods branch or loop in Python on sizes that
# torch.export makes symbolic gets a class of its own, a subclass of its class in which those methods are torchvision's
# own code reading the twins below in place of the module-level functions (torchvision_private.REBOUND_*), or are
# replaced whole (torchvision_private.REPLACED_METHODS).

def traceable_copy(detector: nn.Module) -> nn.Module:
    """A copy of ``detector`` (in eval mode) that computes the same detections and traces with symbolic image sizes;
    ``detector`` and torchvision are left as they are."""
    traceable = copy.deepcopy(detector).eval()
    for module in traceable.modules():
        for part in (module, getattr(module, "box_coder", None)):
            if part is not None and _traceable_class(type(part)) is not type(part):
                part.__class__ = _traceable_class(type(part))
    return traceable


@functools.cache
def _traceable_class(cls: type) -> type:
    """``cls`` itself where torchvision's tables name none of its bases, else a subclass running the twins."""
    methods = {}
    for base, names in tv.REBOUND_METHODS.items():
        if issubclass(cls, base):
            methods.update({name: _with_twins(getattr(cls, name)) for name in names})
    for base, names in tv.REPLACED_METHODS.items():
        if issubclass(cls, base):
            methods.update({name: _REPLACEMENTS[name] for name in names})
    if not methods:
        return cls
    return type(f"Traceable{cls.__name__}", (cls,), {**methods, "__module__": __name__})


def _with_twins(function: types.FunctionType) -> types.FunctionType:
    """``function``'s own code, reading the twins where it reads one of ``torchvision_private.REBOUND_GLOBALS``."""
    read = set(function.__code__.co_names)
    twins = {name: value for name, value in _global_twins().items() if name in read}
    if not twins:
        raise RuntimeError(f"{function.__qualname__} reads none of {sorted(tv.REBOUND_GLOBALS)}: "
                           f"{tv.untested_version()}")
    rebound = types.FunctionType(function.__code__, {**function.__globals__, **twins}, function.__name__,
                                 function.__defaults__, function.__closure__)
    rebound.__kwdefaults__, rebound.__qualname__ = function.__kwdefaults__, function.__qualname__
    return rebound


@functools.cache
def _global_twins() -> dict:
    """``torchvision_private.REBOUND_GLOBALS`` -> its twin: a function, or a module's stand-in whose listed
    functions are twins."""
    functions = {"batched_nms": _batched_nms, "_topk_min": _topk_min,
                 "_resize_image_and_masks": _resize_image_and_masks, "resize_boxes": _resize_boxes,
                 "paste_masks_in_image": _paste_masks_in_image, "_multiscale_roi_align": _multiscale_roi_align}
    modules = {"box_ops": tv.box_ops, "det_utils": tv.det_utils}
    twins = {}
    for name, inside in tv.REBOUND_GLOBALS.items():
        if inside:
            twins[name] = types.SimpleNamespace(**{**vars(modules[name]), **{f: functions[f] for f in inside}})
        else:
            twins[name] = functions[name]
    return twins


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
    rois = tv.convert_to_roi_format(boxes)
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
    masks, scale = tv.expand_masks(masks, padding)
    boxes = tv.expand_boxes(boxes, scale).to(torch.int64)
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


_REPLACEMENTS = {"batch_images": _batch_images, "decode": _decode}  # torchvision_private.REPLACED_METHODS' names
