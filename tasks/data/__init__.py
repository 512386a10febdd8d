"""Data modules: COCO detection, image-folder classification, and the embedded shapes set behind both."""

from .coco import CocoDetection, CocoDetectionDataModule, CocoIndex
from .folder import ImageFolderDataModule
from .labels import LabelMap
from .segmentation import SegmentationDataModule, coco_semantic_masks

__all__ = ["CocoDetection", "CocoDetectionDataModule", "CocoIndex", "ImageFolderDataModule", "LabelMap"]
__all__ += ["SegmentationDataModule", "coco_semantic_masks"]
