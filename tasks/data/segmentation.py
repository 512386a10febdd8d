"""Semantic segmentation data: images and single-channel index masks (PNG) paired by file stem, moved together by
``torchvision.transforms.v2`` (masks as ``tv_tensors.Mask``: nearest, padding with ``ignore_index``), batches padded
with ``ignore_index``; COCO instance annotations rasterised into such masks (:func:`coco_semantic_masks`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .base import BaseDataModule
from .image_files import ImageFiles, ImageList, list_images
from .images import CorruptImageError, read_rgb
from .labels import LabelMap
from .transforms import configured_or_default

log = logging.getLogger("tasks")


def read_classes(classes: Union[Sequence[str], str, int, None], key: str = "data.classes") -> List[str]:
    """Class names in label order: a list, a JSON/YAML file holding a list of names, ``{index: name}`` (indices
    0..N-1), or either under a ``classes`` key; or a number of classes, named by their indices."""
    if classes is None:
        raise ValueError(f"{key} is unset: give the class names in label order (mask value 0 first), as a list or a "
                         "JSON/YAML file, or their number")
    if isinstance(classes, str) and classes.isdigit():
        classes = int(classes)
    if isinstance(classes, int):
        if classes < 1:
            raise ValueError(f"{key}={classes} must be a positive number of classes")
        return [str(i) for i in range(classes)]
    if isinstance(classes, str):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {classes!r} is not a file (give a JSON/YAML file, or a list of names)")
        import yaml

        try:
            content = yaml.safe_load(path.read_text())  # YAML reads JSON too
        except yaml.YAMLError as e:
            raise ValueError(f"{key}: {path} is neither JSON nor YAML ({e})") from None
        if isinstance(content, dict) and "classes" in content:
            content = content["classes"]
        if isinstance(content, dict):
            indices = sorted(int(k) for k in content)
            if indices != list(range(len(indices))):
                raise ValueError(f"{key}: {path} maps indices {indices[:8]}...; they must be 0..N-1, the mask values")
            content = [content[k] if k in content else content[str(k)] for k in indices]
        if not isinstance(content, list):
            raise ValueError(f"{key}: {path} holds a {type(content).__name__}; give a list of class names")
        classes = content
    names = [str(c) for c in classes]
    if not names:
        raise ValueError(f"{key} is empty; give at least one class name")
    return names


def read_mask(path: Union[str, Path]) -> Tensor:
    """A single-channel index mask ``(H, W)``: uint8 (int32 where a 16-bit PNG holds values above 255). A palette
    PNG reads as its indices, not its colours (read by PIL: torchvision's decoder does not give a palette PNG's
    indices). An RGB mask is an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"mask {str(path)!r} is a {image.mode} image; a mask holds one class index per pixel "
                                 "(a grayscale or palette PNG): convert its colours to indices")
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CorruptImageError(f"cannot decode mask {str(path)!r}: {e}") from None
    if array.dtype == np.uint8 or array.max(initial=0) < 256:
        return torch.from_numpy(array.astype(np.uint8))
    return torch.from_numpy(array.astype(np.int32))


def pair_by_stem(images: ImageList, masks: ImageList, mask_suffix: str, key: str, skip_missing: bool
                 ) -> Tuple[ImageList, List[Path]]:
    """The images that have a mask, and their masks: a mask is the image's file name (relative to its folder) with
    the image's extension replaced by ``mask_suffix`` (``.png``; ``_labelTrainIds.png`` style suffixes too, with
    the image's own suffix before the extension removed by giving it in the image name)."""
    by_stem: Dict[str, Path] = {}
    for name in masks.file_names:
        if name.endswith(mask_suffix):
            by_stem[name[: -len(mask_suffix)]] = masks.root / name
    kept, paired, missing = [], [], []
    for name in images.file_names:
        stem = str(Path(name).with_suffix(""))
        if stem in by_stem:
            kept.append(name)
            paired.append(by_stem[stem])
        else:
            missing.append(name)
    if missing and not skip_missing:
        raise FileNotFoundError(f"{key}: image {str(images.root / missing[0])!r} has no mask "
                                f"{str(masks.root / (str(Path(missing[0]).with_suffix('')) + mask_suffix))!r} "
                                f"({len(missing)} images without one); add the masks, or set data.skip_missing: true "
                                "to leave such images out")
    if missing:
        log.warning("%s: left out %d images without a mask (data.skip_missing)", key, len(missing))
    if not kept:
        raise ValueError(f"{key}: no image of {images.root} has a mask in {masks.root} (a mask is the image's "
                         f"relative path with its extension replaced by {mask_suffix!r})")
    return ImageList(images.root, kept), paired


class SegmentationFiles(Dataset):
    """``(image, mask)`` pairs: the image as ``read_rgb`` decodes it (``tv_tensors.Image``, uint8), its mask
    (``tv_tensors.Mask``, uint8 ``(H, W)``) with ``reduce_zero_label`` applied (0 -> ``ignore_index``, k -> k - 1:
    ADE20K's convention), then ``transform`` on both. A mask whose size differs from its image's, or with a value
    that is neither a class nor ``ignore_index``, is an error naming the file."""

    def __init__(self, images: ImageList, masks: Sequence[Path], num_classes: int, ignore_index: int = 255,
                 reduce_zero_label: bool = False, transform=None) -> None:
        self.images, self.masks, self.transform = images, list(masks), transform
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        image_path, mask_path = self.images.root / self.images.file_names[i], self.masks[i]
        image, mask = read_rgb(str(image_path)), read_mask(mask_path)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"mask {str(mask_path)!r} is {mask.shape[0]}x{mask.shape[1]} pixels but its image "
                             f"{str(image_path)!r} is {image.shape[-2]}x{image.shape[-1]}; a mask labels its image's "
                             "pixels one to one")
        mask = self._labels(mask, mask_path)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def _labels(self, mask: Tensor, path: Path) -> Tensor:
        if self.reduce_zero_label:  # mmsegmentation's: 0 (ADE20K's "other") is ignored, class k is label k - 1
            mask = mask.long()
            mask = torch.where(mask == 0, self.ignore_index, torch.where(mask == self.ignore_index,
                                                                          self.ignore_index, mask - 1))
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bool(bad.any()):
            values = sorted(set(mask[bad].tolist()))
            raise ValueError(f"mask {str(path)!r} has values {values[:8]} that are neither a class (0.."
                             f"{self.num_classes - 1}{' after reduce_zero_label' if self.reduce_zero_label else ''}) "
                             f"nor ignore_index={self.ignore_index}; fix the mask, data.classes or data.ignore_index")
        return mask.to(torch.uint8) if self.ignore_index < 256 else mask


def pad_collate(ignore_index: int, sizes: bool = False):
    """A collate function: images (and masks) padded below and right to the batch's largest, images with 0, masks
    with ``ignore_index`` (padding is never evaluated); ``(images, masks)``, with ``sizes`` ``(images, masks,
    [(height, width) of each image before padding])`` (evaluation: the model predicts each image on its own pixels),
    or, for predict, ``(images, infos)``."""
    def collate(batch):
        height = max(int(item[0].shape[-2]) for item in batch)
        width = max(int(item[0].shape[-1]) for item in batch)

        def pad(x: Tensor, fill: int) -> Tensor:
            x = x.as_subclass(Tensor)
            return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), value=fill)

        images = torch.stack([pad(item[0], 0) for item in batch])
        if isinstance(batch[0][1], dict):
            return images, [item[1] for item in batch]
        masks = torch.stack([pad(item[1], ignore_index) for item in batch])
        if sizes:
            return images, masks, [tuple(int(s) for s in item[0].shape[-2:]) for item in batch]
        return images, masks

    return collate


class RequireCrop:
    """Fail naming the setting when training transforms do not end in ``crop_size`` pairs (which a batch needs)."""

    def __init__(self, size: Tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image, mask):
        if tuple(image.shape[-2:]) != self.size or tuple(mask.shape[-2:]) != self.size:
            raise ValueError(f"data.train_transforms gave an image of {tuple(image.shape[-2:])} pixels, but "
                             f"data.crop_size is {list(self.size)}: end the list with a RandomCrop of that size "
                             "(pad_if_needed: true)")
        return image, mask


class SegmentationDataModule(BaseDataModule):
    """Semantic segmentation data: images and index masks paired by file stem. Leave the paths unset for the
    embedded shapes set (each pixel labelled by its shape, background 0: :func:`tasks.data.shapes.shapes_segmentation`),
    or, with ``predict_images``, to have no labelled data (the classes come from the checkpoint).

    Args:
        train_images: training images: a folder (searched recursively), a glob, or a list file.
        train_masks: their masks (single-channel PNG of class indices; a palette PNG reads as its indices), the same
            relative paths with ``mask_suffix`` for the image's extension.
        val_images: validation images (also ``test``, and ``predict`` without ``predict_images``).
        val_masks: their masks.
        predict_images: images to predict on, without masks; predictions are at each image's size.
        classes: class names in label order, a JSON/YAML file of them, or their number (named by index).
        ignore_index: the mask value that is not a class: no loss, not evaluated; padding fills it.
        reduce_zero_label: ADE20K's convention: mask value 0 is ignored and value k is class k - 1.
        mask_suffix: what replaces an image's extension to name its mask.
        skip_missing: leave out images without a mask (with a warning) instead of failing.
        crop_size: side (or ``[height, width]``) of the training crops; the default augmentation resizes the shorter
            side to 0.5-2x of it, crops (padding with ``ignore_index`` where the image is smaller) and flips.
        train_transforms: the training augmentation instead, a list of ``torchvision.transforms.v2`` transforms on the
            image and its ``tv_tensors.Mask`` (masks resample by nearest neighbour); it must end in ``crop_size``.
        val_transforms: the same for validation and test (default: none, the images at their size).
        batch_size: images per device per step (evaluation batches are padded to their largest image).
        num_workers: data-loading processes per device.
        skip_corrupt_images: leave images that cannot be decoded out of their batch, with a warning.
    """

    def __init__(self, train_images: Optional[str] = None, train_masks: Optional[str] = None,
                 val_images: Optional[str] = None, val_masks: Optional[str] = None,
                 predict_images: Optional[str] = None, classes: Union[List[str], int, str, None] = None,
                 ignore_index: int = 255, reduce_zero_label: bool = False, mask_suffix: str = ".png",
                 skip_missing: bool = False, crop_size: Union[int, List[int]] = 512,
                 train_transforms: Optional[List[v2.Transform]] = None,
                 val_transforms: Optional[List[v2.Transform]] = None, batch_size: int = 8, num_workers: int = 2,
                 skip_corrupt_images: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt_images=skip_corrupt_images)
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(self.crop_size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.crop_size):
            raise ValueError(f"data.crop_size={crop_size!r} must be a positive integer or [height, width]")
        if not isinstance(ignore_index, int) or ignore_index < 0:
            raise ValueError(f"data.ignore_index={ignore_index!r} must be a non-negative integer (255 by convention)")
        self.ignore_index, self.reduce_zero_label, self.predict_images = ignore_index, reduce_zero_label, predict_images
        self.train_transform_list, self.val_transform_list = train_transforms, val_transforms
        paths = [train_images, train_masks, val_images, val_masks]
        self.train = self.val = None
        if all(p is None for p in paths):
            if predict_images is not None:
                return  # unlabeled images only
            from .shapes import shapes_segmentation

            *paths, default_classes = shapes_segmentation()
            classes = default_classes if classes is None else classes
            log.info("using the embedded shapes segmentation set in %s", Path(paths[0]).parent)
        elif any(p is None for p in paths):
            raise ValueError("give all of train_images, train_masks, val_images, val_masks, or none of them for the "
                             "embedded shapes set (or, with predict_images, for no labelled data)")
        self.classes = read_classes(classes)
        if ignore_index < len(self.classes):
            raise ValueError(f"data.ignore_index={ignore_index} is one of the {len(self.classes)} classes' labels; "
                             "give a value above them (255)")
        self.label_map = LabelMap.from_categories(dict(enumerate(self.classes)))
        self.train = pair_by_stem(list_images(paths[0], "data.train_images"), list_images(paths[1], "data.train_masks"),
                                  mask_suffix, "data.train_images", skip_missing)
        self.val = pair_by_stem(list_images(paths[2], "data.val_images"), list_images(paths[3], "data.val_masks"),
                                mask_suffix, "data.val_images", skip_missing)
        self.label_source_text = f"data.classes ({classes if isinstance(classes, str) else 'a list'})"

    @property
    def label_source(self) -> str:
        return self.label_source_text

    @property
    def predicts_unlabeled(self) -> bool:
        return self.predict_images is not None

    def _require_labels(self, stage: str) -> None:
        if self.label_map is None:
            raise ValueError(f"data: {stage} needs images with masks, and only predict_images is set; give "
                             "train_images, train_masks, val_images and val_masks")

    def train_transforms(self) -> v2.Compose:
        side = min(self.crop_size)
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: self.ignore_index}
        default = lambda: [v2.RandomResize(side // 2, 2 * side, antialias=True),  # noqa: E731
                           v2.RandomCrop(self.crop_size, pad_if_needed=True, fill=fill),
                           v2.RandomHorizontalFlip()]
        return v2.Compose([*configured_or_default(self.train_transform_list, default), RequireCrop(self.crop_size)])

    def eval_transforms(self) -> Optional[v2.Compose]:
        return None if not self.val_transform_list else v2.Compose(list(self.val_transform_list))

    def _dataset(self, pair, transform) -> SegmentationFiles:
        images, masks = pair
        return SegmentationFiles(images, masks, len(self.classes), self.ignore_index, self.reduce_zero_label,
                                 transform)

    def train_dataloader(self):
        self._require_labels("fit")
        return self.loader(self._dataset(self.train, self.train_transforms()), train=True,
                           collate_fn=pad_collate(self.ignore_index), drop_last=True)

    def val_dataloader(self):
        self._require_labels("validation")
        return self.loader(self._dataset(self.val, self.eval_transforms()), train=False,
                           collate_fn=pad_collate(self.ignore_index, sizes=True))

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        """The images of ``predict_images``, or else of the validation set, as they are (no transforms: predictions
        are in their pixels); batches are ``(images padded to the largest, infos)``; unreadable files skipped."""
        if self.predict_images is not None:
            images = list_images(self.predict_images, "data.predict_images")
        else:
            self._require_labels("predict without predict_images")
            images = self.val[0]
        return self.loader(ImageFiles(images), train=False, collate_fn=pad_collate(self.ignore_index),
                           skip_corrupt=True)


def coco_semantic_masks(annotations: str, output: str, ignore_crowd: bool = True, ignore_index: int = 255
                        ) -> List[str]:
    """Rasterise a COCO instance file into index masks: ``output/<file_name stem>.png`` per image (background 0,
    category ``k``-th by id: ``k + 1``; where instances overlap, the later annotation wins; crowd regions
    ``ignore_index`` with ``ignore_crowd``), and ``output/classes.json`` (``background`` first), so that a COCO set
    serves :class:`SegmentationDataModule` (``val_masks: output``, ``classes: output/classes.json``). Polygons and RLE
    are decoded by pycocotools at the image's ``height`` x ``width``. Returns the class names."""
    from PIL import Image

    from .coco import CocoIndex

    index = CocoIndex.from_file(annotations, masks=True)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(index.file_names):
        height, width = (int(v) for v in index.sizes[i])
        if not height or not width:
            raise ValueError(f"{annotations}: image {int(index.image_ids[i])} ({name}) has no height/width, which "
                             "rasterising needs; add them")
        rows = np.arange(index.offsets[i], index.offsets[i + 1])
        masks = index.segmentations.masks(rows, height, width)
        semantic = np.zeros((height, width), dtype=np.uint8)
        for row, mask in zip(rows, masks, strict=True):
            crowd = ignore_crowd and index.iscrowd[row]
            semantic[mask.astype(bool)] = ignore_index if crowd else index.labels[row] + 1
        path = out / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(semantic).save(path)
    names = ["background", *index.label_map.names]
    (out / "classes.json").write_text(json.dumps(names))
    return names
