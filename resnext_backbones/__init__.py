"""ResNeXt trunks with C2-C5 features and an FPN adapter for torchvision detectors. Pure PyTorch: no Lightning.

Layers, imported one way only (each imports only those below it):

- ``deployment``: ``inference_copy`` and ``export`` of whole models built on the trunks (torchvision detectors,
  classifiers): the fused inference path and ONNX / ``torch.export``, with no Lightning
- ``builders``: ``resnext``, ``resnext_fpn``, ``load_backbone`` (a spec plus weights -> a module)
- ``convert``: ``python -m resnext_backbones export`` (a trunk from any source -> any ecosystem's layout)
- ``loading``: ``load_weights`` and its ``LoadReport``, ``infer_spec``
- ``formats``: one module per ecosystem (reader + writers) and the detection table over them
- ``registry``: named pretrained weights (``list_weights``, ``weights_info``, ``register_weights``): verified
  downloads, a cache that works offline
- ``files``: safe file reading, ``WeightsError``, file digests
- ``trunk``, ``fpn``, ``fused``: model code
"""

from .builders import load_backbone, resnext, resnext_fpn
from .deployment import export, inference_copy
from .files import UnverifiedWeightsWarning, WeightsError, file_sha256
from .formats import Source
from .formats import read as read_weights
from .formats.safetensors import backbone_metadata, save_backbone
from .fpn import ResNeXtFPN
from .loading import LoadReport, infer_spec, load_weights, source_state_dict
from .registry import list_weights, register_weights, weights_info
from .trunk import IMAGENET_MEAN, IMAGENET_STD, MODELS, ResNeXt, ResNeXtSpec, list_models

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "LoadReport", "ResNeXt", "ResNeXtFPN", "ResNeXtSpec",
           "Source", "UnverifiedWeightsWarning", "WeightsError", "backbone_metadata", "export", "file_sha256",
           "inference_copy", "infer_spec", "list_models", "list_weights", "load_backbone", "load_weights",
           "read_weights", "register_weights",
           "resnext", "resnext_fpn", "save_backbone", "source_state_dict", "weights_info"]
__version__ = "0.1.0"
