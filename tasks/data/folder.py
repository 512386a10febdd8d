"""Image-folder classification data (``root/<class>/<image>``), decoded by torchvision.io."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from .base import BaseDataModule
from .image_files import ImageFiles, list_images
from .images import image_reader
from .labels import LabelMap
from .samplers import RepeatFactorSampler, balanced_repeat_factors
from .transforms import classification_pipeline, configured_or_default

log = logging.getLogger("tasks")


class ImageFolderDataModule(BaseDataModule):
    """Classification data in folders. Leave both paths unset for the embedded shapes set, or, with ``predict_dir``,
    to have no labelled data at all (``lightning predict --ckpt_path CKPT``: the classes come from the checkpoint).

    Args:
        train_dir: folder with one sub-folder per class.
        val_dir: the same classes, for validation (also used by ``test``, and by ``predict`` without
            ``predict_dir``).
        predict_dir: images to predict on, with no labels: a folder (searched recursively), a glob, or a text file
            of paths (one a line, relative to its folder). Unreadable files are reported and skipped.
        batch_size: images per device per step.
        num_workers: data-loading processes per device.
        image_size: side of the square images the model sees.
        train_transforms: training augmentation, a list of ``torchvision.transforms.v2`` transforms
            (``class_path``/``init_args``) on the uint8 image; it must end in ``image_size`` squares. Default:
            ``RandomResizedCrop(image_size, scale=crop_scale)``, ``RandomHorizontalFlip()``.
        val_transforms: the same for validation, test and predict. Default: ``Resize(image_size / 0.875)``,
            ``CenterCrop(image_size)``.
        crop_scale: range of the image area a crop keeps in the default training augmentation (``RandomResizedCrop``;
            default ImageNet's 0.08-1); with ``train_transforms``, set ``scale`` in that list instead.
        skip_corrupt_images: leave images that cannot be decoded out of their batch, with a warning, and count
            them, instead of failing with an error that names the file.
        class_balanced: draw training images by inverse class frequency (every class equally often in expectation,
            an epoch as long as the training set; :func:`~tasks.data.samplers.balanced_repeat_factors`) instead of
            each image once an epoch.
        channels: channels of the images (the model's ``in_channels``): 3 reads any image as RGB; another count
            reads PNG or TIFF (multi-band with ``tifffile``) with that many (:func:`~tasks.data.images.read_image`).
        max_value: the pixel value that becomes 1.0 (a 12-bit sensor's 4095); unset: 8-bit images are scaled by
            255, deeper ones by their type's largest value.
    """

    def __init__(self, train_dir: Optional[str] = None, val_dir: Optional[str] = None,
                 predict_dir: Optional[str] = None, batch_size: int = 32, num_workers: int = 2, image_size: int = 224,
                 train_transforms: Optional[List[v2.Transform]] = None,
                 val_transforms: Optional[List[v2.Transform]] = None,
                 crop_scale: Optional[Tuple[float, float]] = None, skip_corrupt_images: bool = False,
                 class_balanced: bool = False, channels: int = 3, max_value: Optional[float] = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt_images=skip_corrupt_images)
        if train_transforms is not None and crop_scale is not None:
            raise ValueError("data.crop_scale sets the default augmentation, which data.train_transforms replaces: "
                             "set scale in the RandomResizedCrop of train_transforms instead")
        crop_scale = (0.08, 1.0) if crop_scale is None else tuple(crop_scale)
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale={list(crop_scale)} must be two fractions 0 < low <= high <= 1")
        self.image_size, self.crop_scale, self.predict_dir = image_size, crop_scale, predict_dir
        self.class_balanced = class_balanced
        self.read = image_reader(channels, max_value)
        self.train_transform_list, self.val_transform_list = train_transforms, val_transforms
        if train_dir is None and val_dir is None:
            if predict_dir is not None:
                self.train_dir = self.val_dir = None
                return  # unlabeled images only: nothing to train or evaluate on
            from .shapes import shapes_classification

            train_dir, val_dir = shapes_classification()
            log.info("using the embedded shapes classification set in %s", Path(train_dir).parent)
        elif train_dir is None or val_dir is None:
            raise ValueError("give both train_dir and val_dir, or neither for the embedded shapes set (or, with "
                             "predict_dir, for no labelled data)")
        for key, p in (("train_dir", train_dir), ("val_dir", val_dir)):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"data.{key}: {str(p)!r} is not a folder")
        self.train_dir, self.val_dir = str(train_dir), str(val_dir)
        classes = sorted(p.name for p in Path(val_dir).iterdir() if p.is_dir())
        train_classes = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
        if classes != train_classes:
            raise ValueError(f"data.train_dir and data.val_dir hold different classes: {train_classes} vs {classes}")
        self.label_map = LabelMap.from_categories(dict(enumerate(classes)))  # ImageFolder's class indices

    @property
    def label_source(self) -> str:
        """Where the classes come from, as messages name it."""
        return f"data.val_dir ({self.val_dir})"

    @property
    def predicts_unlabeled(self) -> bool:
        """Whether ``predict`` reads images without labels (``predict_dir``), so that the data's classes have no say
        in the model's classes there."""
        return self.predict_dir is not None

    def _require_labels(self, stage: str) -> None:
        if self.label_map is None:
            raise ValueError(f"data: {stage} needs labelled data, and only predict_dir is set; give train_dir and "
                             "val_dir")

    def train_transforms(self) -> v2.Compose:
        default = lambda: [v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),  # noqa: E731
                           v2.RandomHorizontalFlip()]
        return classification_pipeline(configured_or_default(self.train_transform_list, default), self.image_size,
                                       "data.train_transforms")

    def eval_transforms(self) -> v2.Compose:
        default = lambda: [v2.Resize(round(self.image_size / 0.875), antialias=True),  # noqa: E731
                           v2.CenterCrop(self.image_size)]
        return classification_pipeline(configured_or_default(self.val_transform_list, default), self.image_size,
                                       "data.val_transforms")

    def training_sampler(self, dataset):
        if not self.class_balanced:
            return super().training_sampler(dataset)
        return RepeatFactorSampler(dataset, self.seed, balanced_repeat_factors(dataset.targets, len(self.label_map)))

    def train_dataloader(self):
        self._require_labels("fit")
        return self.loader(ImageFolder(self.train_dir, transform=self.train_transforms(), loader=self.read),
                           train=True, drop_last=True)

    def val_dataloader(self):
        self._require_labels("validation")
        dataset = ImageFolder(self.val_dir, transform=self.eval_transforms(), loader=self.read)
        return self.loader(dataset, train=False)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        """The images of ``predict_dir``, or else of ``val_dir``, through ``val_transforms``; batches are ``(images,
        info)`` with ``info["file_name"]`` (relative to the folder) and ``info["image_id"]`` (1..N in path order);
        unreadable files are skipped."""
        if self.predict_dir is not None:
            images = list_images(self.predict_dir, "data.predict_dir")
        else:
            self._require_labels("predict without predict_dir")
            images = list_images(self.val_dir, "data.val_dir")
        return self.loader(ImageFiles(images, transform=self.eval_transforms(), read=self.read), train=False,
                           skip_corrupt=True)
