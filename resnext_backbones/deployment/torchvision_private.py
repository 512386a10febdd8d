"""Every name of torchvision's that the deployment layer uses and torchvision does not document as public, in one
place, with the torchvision versions they are tested on (``pyproject.toml`` bounds torchvision to that range).

The sparse RoIAlign reads ``MultiScaleRoIAlign``'s helpers; the export runs torchvision's own detection methods with
twins in place of the module-level functions listed in :data:`REBOUND_GLOBALS` and replaces the methods in
:data:`REPLACED_METHODS` (:mod:`resnext_backbones.deployment.exporting`). A torchvision that renames one of these fails
at import or when the export rebinds it, with a message naming the name and these versions.
"""

from __future__ import annotations

import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import roi_heads, rpn, transform
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers

__all__ = ["TESTED_TORCHVISION", "REBOUND_GLOBALS", "REBOUND_METHODS", "REPLACED_METHODS", "box_ops", "det_utils",
           "poolers", "roi_heads", "transform", "untested_version"]

TESTED_TORCHVISION = ("0.29",)  # the whole test suite (CI); keep pyproject.toml's torchvision bound to these

# the MultiScaleRoIAlign helpers the sparse RoIAlign and the export's twin call, and mask pasting's
filter_input, setup_scales, convert_to_roi_format = (poolers._filter_input, poolers._setup_scales,
                                                     poolers._convert_to_roi_format)
expand_masks, expand_boxes = roi_heads.expand_masks, roi_heads.expand_boxes

# the module-level names that torchvision's detection methods read and the export gives twins to, by the name those
# methods read them under (a module imported as ``box_ops``: its function ``batched_nms``)
REBOUND_GLOBALS = {"box_ops": ("batched_nms",), "det_utils": ("_topk_min",), "_resize_image_and_masks": (),
                   "resize_boxes": (), "paste_masks_in_image": (), "_multiscale_roi_align": ()}
# torchvision's methods that read them: run with the twins, for the traced copy only
REBOUND_METHODS = {rpn.RegionProposalNetwork: ("_get_top_n_idx", "filter_proposals"),
                   roi_heads.RoIHeads: ("postprocess_detections",),
                   RetinaNet: ("postprocess_detections",), FCOS: ("postprocess_detections",),
                   transform.GeneralizedRCNNTransform: ("resize", "postprocess"),
                   poolers.MultiScaleRoIAlign: ("forward",)}
# torchvision's methods the export replaces whole
REPLACED_METHODS = {transform.GeneralizedRCNNTransform: ("batch_images",), det_utils.BoxCoder: ("decode",)}


def untested_version() -> str:
    """What to tell a user whose torchvision lacks one of these names."""
    return (f"torchvision {torchvision.__version__} is not one resnext_backbones' export is tested with "
            f"({', '.join(TESTED_TORCHVISION)}); install one of those")
