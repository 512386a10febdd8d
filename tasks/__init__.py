"""Lightning tasks on ResNeXt backbones: classification and detection, trained from YAML configs."""

from .classification import ImageClassifier
from .detection import ObjectDetector
from .writers import ClassificationResultsWriter, CocoResultsWriter

__all__ = ["ClassificationResultsWriter", "CocoResultsWriter", "ImageClassifier", "ObjectDetector"]
