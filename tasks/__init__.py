"""Lightning tasks on ResNeXt backbones: classification and detection, trained from YAML configs."""

from .callbacks import CocoResultsWriter
from .classification import ImageClassifier
from .detection import ObjectDetector

__all__ = ["CocoResultsWriter", "ImageClassifier", "ObjectDetector"]
