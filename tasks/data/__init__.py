"""Data modules: COCO detection, image-folder classification, and the embedded shapes set behind both."""

from .coco import CocoDetection, CocoDetectionDataModule, CocoIndex
from .folder import ImageFolderDataModule
from .labels import LabelMap

__all__ = ["CocoDetection", "CocoDetectionDataModule", "CocoIndex", "ImageFolderDataModule", "LabelMap"]
