"""Image-folder classification data (``root/<class>/<image>``), decoded by torchvision.io."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from .base import BaseDataModule
from .images import read_rgb
from .labels import LabelMap

log = logging.getLogger("tasks")


class ImageFolderDataModule(BaseDataModule):
    """Classification data in folders. Leave both paths unset for the embedded shapes set.

    Args:
        train_dir: folder with one sub-folder per class.
        val_dir: the same classes, for validation (also used by ``test`` and ``predict``).
        batch_size: images per device per step.
        num_workers: data-loading processes per device.
        image_size: side of the square crop the model sees.
        crop_scale: range of the image area a training crop keeps (``RandomResizedCrop``; ImageNet: 0.08-1).
        skip_corrupt_images: leave images that cannot be decoded out of their batch, with a warning, and count
            them, instead of failing with an error that names the file.
    """

    def __init__(self, train_dir: Optional[str] = None, val_dir: Optional[str] = None, batch_size: int = 32,
                 num_workers: int = 2, image_size: int = 224, crop_scale: Tuple[float, float] = (0.08, 1.0),
                 skip_corrupt_images: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt_images=skip_corrupt_images)
        if train_dir is None and val_dir is None:
            from .shapes import shapes_classification

            train_dir, val_dir = shapes_classification()
            log.info("using the embedded shapes classification set in %s", Path(train_dir).parent)
        elif train_dir is None or val_dir is None:
            raise ValueError("give both train_dir and val_dir, or neither for the embedded shapes set")
        for key, p in (("train_dir", train_dir), ("val_dir", val_dir)):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"data.{key}: {str(p)!r} is not a folder")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale={list(crop_scale)} must be two fractions 0 < low <= high <= 1")
        self.train_dir, self.val_dir, self.image_size = str(train_dir), str(val_dir), image_size
        self.crop_scale = tuple(crop_scale)
        classes = sorted(p.name for p in Path(val_dir).iterdir() if p.is_dir())
        train_classes = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
        if classes != train_classes:
            raise ValueError(f"data.train_dir and data.val_dir hold different classes: {train_classes} vs {classes}")
        self.label_map = LabelMap.from_categories(dict(enumerate(classes)))  # ImageFolder's class indices

    @property
    def categories(self) -> Dict[int, str]:
        """``{class index: folder name}``: the model is told these (``lightning`` links them)."""
        return self.label_map.categories

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def train_dataloader(self):
        transform = v2.Compose([v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
                                v2.RandomHorizontalFlip(),
                                v2.ToDtype(torch.float32, scale=True)])
        return self.loader(ImageFolder(self.train_dir, transform=transform, loader=read_rgb), train=True,
                           drop_last=True)

    def val_dataloader(self):
        transform = v2.Compose([v2.Resize(round(self.image_size / 0.875), antialias=True),
                                v2.CenterCrop(self.image_size), v2.ToDtype(torch.float32, scale=True)])
        dataset = ImageFolder(self.val_dir, transform=transform, loader=read_rgb)
        return self.loader(dataset, train=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
