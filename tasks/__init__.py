"""Lightning tasks on ResNeXt backbones: classification and detection, trained from YAML configs."""

from .classification import ImageClassifier
from .detection import ObjectDetector
from .segmentation import SemanticSegmenter
from .writers import ClassificationResultsWriter, CocoResultsWriter, SegmentationWriter

__all__ = ["ClassificationResultsWriter", "CocoResultsWriter", "ImageClassifier", "ObjectDetector"]
__all__ += ["SegmentationWriter", "SemanticSegmenter"]
