"""Deployment of models built on our trunks, with no Lightning: the fast inference copy and the whole-model export.

- :func:`inference_copy`: a copy of a torchvision detector or a classifier on our trunks that runs the fused trunk,
  the packed FPN and heads and the sparse RoIAlign, natively in low precision where the device has it
  (:mod:`.inference`, :mod:`.roi_align`);
- :func:`export`: the whole model to ONNX or a ``torch.export`` program, for any image size, with no process-wide
  patching of torchvision (:mod:`.exporting`; the torchvision internals it relies on: :mod:`.torchvision_private`);
- :func:`tiled_detections`: a detector on images larger than its input, by overlapping tiles batched through it and
  merged back (NMS or SAHI's NMM; :mod:`.tiling`);
- :mod:`.device`: what the device computes natively (CPU flags, oneDNN's limit, CUDA), for the inference copy and
  the tasks' training precision (``auto``, and the advice ``fit`` logs).
"""

from .device import (
    BF16_TRAINING_FASTER,
    auto_training_precision,
    describe_device,
    isa_flags,
    native_dtype,
    native_support,
    training_precision_advice,
)
from .exporting import FORMATS, export, program, traceable_copy
from .inference import Native, inference_copy
from .roi_align import SparseRoIAlign, sparse_roi_align, sparse_roi_poolers
from .tiling import Tiling, merge_detections, tile_grid, tiled_detections

__all__ = ["BF16_TRAINING_FASTER", "FORMATS", "Native", "SparseRoIAlign", "Tiling", "auto_training_precision",
           "describe_device", "export", "inference_copy", "isa_flags", "merge_detections", "native_dtype",
           "native_support", "program", "sparse_roi_align", "sparse_roi_poolers", "tile_grid", "tiled_detections",
           "traceable_copy", "training_precision_advice"]
