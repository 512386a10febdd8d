"""ResNeXt trunks with C2-C5 features and an FPN adapter for torchvision detectors. Pure PyTorch: no Lightning."""

from .fpn import ResNeXtFPN, resnext_fpn
from .trunk import MODELS, ResNeXt, ResNeXtSpec, list_models, resnext
from .weights import LoadReport, WeightsError, load_backbone, load_weights, save_backbone

__all__ = ["MODELS", "LoadReport", "ResNeXt", "ResNeXtFPN", "ResNeXtSpec", "WeightsError", "list_models",
           "load_backbone", "load_weights", "resnext", "resnext_fpn", "save_backbone"]
__version__ = "0.1.0"
