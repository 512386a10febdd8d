"""Detection data: a COCO file read directly (no pycocotools index, no console noise), or YOLO or VOC labels read
into the same index (:mod:`tasks.data.label_formats`); compact arrays for the samples (instance masks too),
transforms v2 for the boxes and masks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .base import BaseDataModule
from .image_files import ImageFiles, ImageList, list_images
from .images import CorruptImageError, image_reader, image_size, read_rgb
from .labels import LabelMap
from .masks import Segmentations, row_offsets
from .samplers import RepeatFactorSampler, lvis_repeat_factors
from .transforms import DropEmptyMasks, configured_or_default, detection_pipeline

log = logging.getLogger("tasks")


@dataclass
class CocoIndex:
    """A COCO annotation file as flat arrays (no per-image Python dicts: data-loader workers share the pages).

    Boxes of image ``i`` are rows ``offsets[i]:offsets[i + 1]``; ``labels`` are contiguous (0..N-1), translated by
    ``label_map`` from the file's category ids. ``segmentations`` holds each box's COCO ``segmentation`` (polygons or
    RLE, decoded only when its image is loaded), where masks were asked for.
    """

    image_ids: np.ndarray
    file_names: List[str]
    sizes: np.ndarray  # (num_images, 2) height, width: the JSON's, then the files' (check_image_files)
    offsets: np.ndarray
    boxes: np.ndarray  # (num_boxes, 4) xyxy float32
    labels: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray
    label_map: LabelMap
    segmentations: Optional[Segmentations] = None

    @classmethod
    def from_file(cls, annotations: str, masks: Optional[bool] = False) -> CocoIndex:
        """Read and check a COCO file. Errors name the file and the ids at fault; boxes with no area are dropped
        with a summary line. Boxes are fitted to their images by :func:`check_image_files`, which knows the sizes.

        ``masks``: read every annotation's ``segmentation`` (an annotation without one is an error naming it);
        ``None``: read them if every annotation has one; ``False``: leave them."""
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        return cls.from_coco(data, str(path), masks)

    @classmethod
    def from_coco(cls, data, path: str, masks: Optional[bool] = False) -> CocoIndex:
        """As :meth:`from_file`, from the COCO file's content; ``path`` names it in messages. An annotation may
        carry a ``"source"`` (``"labels/a.txt line 3"``, where a YOLO or VOC reader found it), which messages
        name instead of its id (:mod:`tasks.data.label_formats`)."""
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a COCO file holds one JSON object, not a {type(data).__name__}")
        cats = data.get("categories", [])
        if not cats:
            raise ValueError(f"{path}: 'categories' is empty; a detection file needs at least one category")
        try:
            label_map = LabelMap.from_coco(cats)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        images = sorted(data.get("images", []), key=lambda img: img["id"])
        anns = data.get("annotations", [])
        image_ids = np.asarray([img["id"] for img in images], dtype=np.int64)
        ann_ids = np.asarray([a.get("id", -1) for a in anns], dtype=np.int64)
        for name, ids in (("image", image_ids), ("annotation", ann_ids)):
            unique, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"{path}: duplicate {name} ids {unique[counts > 1][:5].tolist()}; ids must be unique")

        known = set(label_map.category_ids)
        row_image = np.searchsorted(image_ids, [a["image_id"] for a in anns]).astype(np.int64)
        for a, i in zip(anns, row_image, strict=True):
            if i >= len(image_ids) or image_ids[i] != a["image_id"]:
                raise ValueError(f"{_where(path, a)} refers to image_id {a['image_id']}, which has no entry in "
                                 "'images'")
            if a["category_id"] not in known:
                raise ValueError(f"{_where(path, a)} has category_id {a['category_id']!r}, which is not in "
                                 f"'categories' {list(label_map.category_ids)} {list(label_map.names)}")
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        bad = ~np.isfinite(xywh).all(1)
        if bad.any():
            named = [anns[r].get("source", anns[r].get("id")) for r in np.flatnonzero(bad)[:5]]
            raise ValueError(f"{path}: annotations {named} have non-finite bbox coordinates")
        sizes = np.asarray([(img.get("height", 0), img.get("width", 0)) for img in images], dtype=np.int64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        _warn_outside(path, anns, boxes, sizes[row_image])
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        if not keep.all():
            log.warning("%s: dropped %d of %d boxes with zero or negative width or height", path, (~keep).sum(),
                        len(anns))

        order = np.argsort(row_image[keep], kind="stable")
        rows = np.flatnonzero(keep)[order]
        segmentations = None
        if masks is not False:
            try:
                segmentations = Segmentations.from_coco([anns[r].get("segmentation") for r in rows],
                                                        ann_ids[rows].tolist(), str(path))
            except ValueError:
                if masks:
                    raise
        return cls(image_ids=image_ids, file_names=[img["file_name"] for img in images], sizes=sizes,
                   offsets=row_offsets(np.bincount(row_image[rows], minlength=len(images))),
                   boxes=boxes[rows].astype(np.float32),
                   labels=label_map.labels([anns[r]["category_id"] for r in rows]),
                   iscrowd=np.asarray([anns[r].get("iscrowd", 0) for r in rows], dtype=np.uint8),
                   areas=np.asarray([anns[r].get("area", xywh[r, 2] * xywh[r, 3]) for r in rows], dtype=np.float32),
                   label_map=label_map, segmentations=segmentations)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _with_rows(self, rows: np.ndarray, boxes_per_image: np.ndarray, boxes: Optional[np.ndarray] = None,
                   **images) -> CocoIndex:
        """A copy keeping the box rows where ``rows`` is true (``boxes`` replaces the box coordinates first)."""
        boxes = self.boxes if boxes is None else boxes
        segmentations = None if self.segmentations is None else self.segmentations.take(rows)
        return replace(self, offsets=row_offsets(boxes_per_image), boxes=boxes[rows], labels=self.labels[rows],
                       iscrowd=self.iscrowd[rows], areas=self.areas[rows], segmentations=segmentations, **images)

    def subset(self, keep: np.ndarray) -> CocoIndex:
        """Only the images where ``keep`` is true, with their boxes."""
        counts = np.diff(self.offsets)
        return self._with_rows(np.repeat(keep, counts), counts[keep], image_ids=self.image_ids[keep],
                               file_names=[f for f, k in zip(self.file_names, keep, strict=True) if k],
                               sizes=self.sizes[keep])

    def fit_to_images(self, source: str) -> CocoIndex:
        """Clip boxes partly outside their image and drop those entirely outside, with a summary line."""
        counts = np.diff(self.offsets)
        h, w = (np.repeat(self.sizes[:, i], counts).astype(np.float32) for i in (0, 1))
        clipped = np.clip(self.boxes, 0, np.stack([w, h, w, h], 1))
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        changed = keep & (clipped != self.boxes).any(1)
        if changed.any() or not keep.all():
            log.warning("%s: clipped %d boxes partly outside their image, dropped %d entirely outside", source,
                        changed.sum(), (~keep).sum())
        image_of_row = np.repeat(np.arange(len(counts)), counts)
        return self._with_rows(keep, np.bincount(image_of_row[keep], minlength=len(counts)), boxes=clipped)


def _where(path: str, annotation: dict) -> str:
    """An annotation as messages name it: where a reader found it (file and line), else its id in ``path``."""
    if "source" in annotation:
        return str(annotation["source"])
    return f"{path}: annotation {annotation.get('id')}"


def _warn_outside(path: str, annotations: list, boxes: np.ndarray, sizes: np.ndarray) -> None:
    """A warning naming the first annotations whose box reaches outside the image size the annotations give
    (:meth:`CocoIndex.fit_to_images` then clips them to the file's size)."""
    if not len(boxes):
        return
    h, w = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    known = (sizes > 0).all(1)
    outside = known & ((boxes[:, :2] < 0).any(1) | (boxes[:, 2:3] > w)[:, 0] | (boxes[:, 3:4] > h)[:, 0])
    if outside.any():
        first = [_where(path, annotations[r]) for r in np.flatnonzero(outside)[:3]]
        log.warning("%s: %d boxes reach outside their image, first: %s", path, int(outside.sum()), "; ".join(first))


def _drop_images(index: CocoIndex, bad: np.ndarray, root: Path, key: str, problem: str, option: str, skip: bool,
                 error: type) -> CocoIndex:
    """``index`` without the images where ``bad`` is true: an error naming the first of them and the count, or,
    with ``skip``, a warning."""
    if not bad.any():
        return index
    first = [str(root / index.file_names[i]) for i in np.flatnonzero(bad)[:5]]
    message = f"data.{key}: {int(bad.sum())} of {len(index)} listed images {problem}, first: {first}"
    if not skip:
        raise error(f"{message}. Fix or remove them, or set data.{option}: true to drop them")
    log.warning("%s; dropping them (data.%s)", message, option)
    return index.subset(~bad)


def check_image_files(index: CocoIndex, images: str, key: str, skip_missing: bool,
                      skip_corrupt: bool = False) -> CocoIndex:
    """Every listed image must exist and have a readable header (else an error naming the first files at fault and
    the count, or, with ``skip_missing`` / ``skip_corrupt``, they are dropped with a warning); sizes come from the
    files, with a warning where the JSON disagrees; then boxes are fitted to those sizes."""
    root = Path(images)
    missing = np.asarray([not (root / f).is_file() for f in index.file_names], dtype=bool)
    index = _drop_images(index, missing, root, key, "are missing", "skip_missing_images", skip_missing,
                         FileNotFoundError)
    actual = np.zeros((len(index), 2), dtype=np.int64)
    unreadable, first_error = np.zeros(len(index), dtype=bool), ""
    for i, f in enumerate(index.file_names):
        try:
            actual[i] = image_size(root / f)
        except CorruptImageError as e:
            unreadable[i], first_error = True, first_error or str(e)
    index = _drop_images(index, unreadable, root, key, f"cannot be read ({first_error})", "skip_corrupt_images",
                         skip_corrupt, CorruptImageError)
    actual = actual[~unreadable]
    wrong = np.flatnonzero((index.sizes != actual).any(1) & (index.sizes > 0).all(1))
    if len(wrong):
        i = wrong[0]
        log.warning("data.%s: %d images have a width/height in the annotations that differs from the file (first: "
                    "%s, json %s vs file %s); using the file's", key, len(wrong), root / index.file_names[i],
                    tuple(index.sizes[i].tolist()), tuple(actual[i].tolist()))
    return replace(index, sizes=actual).fit_to_images(f"data.{key}")


class CocoDetection(Dataset):
    """``(image, target)`` pairs; ``target`` has ``boxes`` (xyxy ``BoundingBoxes``), ``labels`` (contiguous),
    ``image_id``, ``iscrowd`` and ``area``, and with ``masks`` the instance ``masks`` (a ``tv_tensors.Mask``, N x H x
    W uint8, which v2 transforms move with the image and boxes). Crowd boxes are dropped unless ``keep_crowd``
    (evaluation needs them)."""

    def __init__(self, index: CocoIndex, images: str, transforms: Optional[v2.Transform] = None,
                 keep_crowd: bool = False, masks: bool = False, read: Callable = read_rgb) -> None:
        if masks and index.segmentations is None:
            raise ValueError("masks were asked for, but the index was read without segmentations; read it with "
                             "CocoIndex.from_file(path, masks=True)")
        self.index, self.root, self.transforms, self.keep_crowd = index, Path(images), transforms, keep_crowd
        self.masks, self.read = masks, read

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        idx = self.index
        image = tv_tensors.Image(self.read(str(self.root / idx.file_names[i])))
        rows = slice(idx.offsets[i], idx.offsets[i + 1])
        keep = slice(None) if self.keep_crowd else idx.iscrowd[rows] == 0
        h, w = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(idx.boxes[rows][keep]).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(idx.labels[rows][keep]),
            "iscrowd": torch.from_numpy(idx.iscrowd[rows][keep]).long(),
            "area": torch.from_numpy(idx.areas[rows][keep]),
            "image_id": int(idx.image_ids[i]),
        }
        if self.masks:
            instances = np.arange(idx.offsets[i], idx.offsets[i + 1])[keep]
            try:
                masks = idx.segmentations.masks(instances, h, w)
            except ValueError as e:
                raise ValueError(f"{self.root / idx.file_names[i]}: {e}") from None
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch, strict=True))


class CocoDetectionDataModule(BaseDataModule):
    """COCO-format detection data. Leave the four annotation paths unset to use the embedded shapes set (generated once
    into a cache folder, see :mod:`tasks.data.shapes`), or, with ``predict_images``, to have no labelled data at all
    (``lightning predict --ckpt_path CKPT``: the classes come from the checkpoint).

    Args:
        train_annotations: COCO json of the training set.
        train_images: folder the training ``file_name``s are relative to.
        val_annotations: COCO json of the validation set (also used by ``test``, and by ``predict`` without
            ``predict_images``).
        val_images: folder of the validation images.
        predict_images: images to predict on, with no annotations: a folder (searched recursively), a glob, or a
            text file of paths (one a line, relative to its folder). Unreadable files are reported and skipped.
        batch_size: images per device per step.
        num_workers: data-loading processes per device.
        train_transforms: training augmentation, a list of box-aware ``torchvision.transforms.v2`` transforms
            (``class_path``/``init_args``) on the uint8 image and its target; boxes are then clamped to the image and
            those with no area left dropped. Default: ``RandomHorizontalFlip(horizontal_flip)``; ``[]`` for none.
        val_transforms: the same for validation and test (default: none). ``predict`` reads images as they are, so
            that boxes are in the original image's pixels.
        horizontal_flip: probability of flipping a training image in the default augmentation (default 0.5); with
            ``train_transforms``, put a ``RandomHorizontalFlip`` in that list instead.
        skip_missing_images: drop listed images whose file is missing (with a warning) instead of failing.
        skip_corrupt_images: drop images that cannot be decoded (a header that cannot be read: at startup; a
            truncated or corrupt body: from their batch, when loaded), each with a warning and counted, instead of
            failing with an error that names the file.
        masks: give each instance its mask (COCO ``segmentation``: polygons, RLE or crowd RLE, decoded by pycocotools
            when its image is loaded), for Mask R-CNN. Unset: whenever the model predicts masks
            (``ObjectDetector(architecture=mask_rcnn)``); ``true`` or ``false`` to decide here. After augmentation,
            an instance whose mask is empty is dropped with its box, and counted.
        format: the labels' form, ``coco`` | ``yolo`` | ``voc`` (:mod:`tasks.data.label_formats`); unset: detected
            from each annotation path (and logged). COCO: the ``.json`` file and its image folder. YOLO: the
            ``data.yaml`` (or a names list) and the images folder (``.../images/train``, labels in
            ``.../labels/train``). VOC: ``ImageSets/Main/<split>.txt`` (or the ``Annotations/`` folder) and
            ``JPEGImages/``.
        classes: VOC's class names, in the order of their category ids (1..N); unset: the sorted names found in
            ``Annotations/``.
        repeat_threshold: sample training images with rare classes more often, by LVIS's repeat factors
            (:func:`~tasks.data.samplers.lvis_repeat_factors`: a class in fewer than this fraction of the images is
            repeated, up to ``sqrt(t / f(c))`` times; LVIS: 0.001); :meth:`repeat_factors` tells each image's.
            Unset: every image once an epoch.
        channels: channels of the images (the model's ``in_channels``): 3 reads any image as RGB; another count
            reads PNG or TIFF (multi-band with ``tifffile``) with that many (:func:`~tasks.data.images.read_image`).
        max_value: the pixel value that becomes 1.0 (a 12-bit sensor's 4095); unset: 8-bit images stay uint8 (the
            model scales them), deeper ones are divided by their type's largest value.
    """

    ANNOTATION_KEYS = ("train_annotations", "train_images", "val_annotations", "val_images")

    def __init__(self, train_annotations: Optional[str] = None, train_images: Optional[str] = None,
                 val_annotations: Optional[str] = None, val_images: Optional[str] = None,
                 predict_images: Optional[str] = None, batch_size: int = 2, num_workers: int = 2,
                 train_transforms: Optional[List[v2.Transform]] = None,
                 val_transforms: Optional[List[v2.Transform]] = None, horizontal_flip: Optional[float] = None,
                 skip_missing_images: bool = False, skip_corrupt_images: bool = False,
                 masks: Optional[bool] = None, format: Optional[str] = None,
                 classes: Optional[List[str]] = None, repeat_threshold: Optional[float] = None,
                 channels: int = 3, max_value: Optional[float] = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt_images=skip_corrupt_images)
        if train_transforms is not None and horizontal_flip is not None:
            raise ValueError("data.horizontal_flip sets the default augmentation, which data.train_transforms "
                             "replaces: put a RandomHorizontalFlip in train_transforms instead")
        self.predict_images = predict_images
        self.train_transform_list, self.val_transform_list = train_transforms, val_transforms
        self.horizontal_flip = 0.5 if horizontal_flip is None else horizontal_flip
        self.skip_missing_images = skip_missing_images
        self.format, self.classes = format, classes
        self.read = image_reader(channels, max_value)
        if repeat_threshold is not None:
            lvis_repeat_factors([], repeat_threshold)  # checks it now, not when training starts
        self.repeat_threshold = repeat_threshold
        self.masks, self.empty_masks = masks, DropEmptyMasks()
        self.train_index: Optional[CocoIndex] = None
        self.val_index: Optional[CocoIndex] = None
        paths = [train_annotations, train_images, val_annotations, val_images]
        if all(p is None for p in paths):
            if predict_images is not None:
                return  # unlabeled images only: nothing to train or evaluate on
            from .shapes import shapes_detection

            paths = shapes_detection()
            log.info("using the embedded shapes detection set in %s", Path(paths[0]).parent)
        elif any(p is None for p in paths):
            raise ValueError("give all of train_annotations, train_images, val_annotations, val_images, or none of "
                             "them for the embedded shapes set (or, with predict_images, for no labelled data)")
        for key, p in zip(self.ANNOTATION_KEYS, paths, strict=True):
            if not Path(p).exists():
                raise FileNotFoundError(f"data.{key}: {str(p)!r} does not exist")
        self.train_annotations, self.train_images, self.val_annotations, self.val_images = map(str, paths)
        # unset masks: the segmentations are read where the file has them; setup knows whether the model needs them
        self.val_index = self._index(self.val_annotations, self.val_images, "val_images", masks)
        self.label_map = self.val_index.label_map

    def _index(self, annotations: str, images: str, key: str, masks: Optional[bool]) -> CocoIndex:
        from .label_formats import read_index

        index = read_index(annotations, images, self.format, masks, self.classes, self.skip_missing_images,
                           f"data.{key.replace('images', 'annotations')}")
        return check_image_files(index, images, key, self.skip_missing_images, self.skip_corrupt_images)

    def wants_masks(self) -> bool:
        """Whether targets carry instance masks: ``masks`` if set, else whether the model (of the trainer this module
        is attached to) predicts masks."""
        if self.masks is not None:
            return self.masks
        return _predicts_masks(self.trainer)

    @property
    def label_source(self) -> str:
        """Where the categories come from, as messages name it."""
        return f"data.val_annotations ({self.val_annotations})"

    @property
    def predicts_unlabeled(self) -> bool:
        """Whether ``predict`` reads images without annotations (``predict_images``), so that the data's categories
        have no say in the model's classes there."""
        return self.predict_images is not None

    def _require_labels(self, stage: str) -> None:
        if self.val_index is None:
            raise ValueError(f"data: {stage} needs annotated data, and only predict_images is set; give "
                             f"{', '.join(self.ANNOTATION_KEYS)}")

    def setup(self, stage: str) -> None:
        if self.masks is False and _predicts_masks(self.trainer):
            raise ValueError("the model predicts instance masks, and learns and is evaluated on them, but data.masks "
                             "is false; set it true, or leave it unset to follow the model")
        masks = self.wants_masks()
        if masks and self.val_index is not None and self.val_index.segmentations is None:
            # read again, to fail naming the annotation without a usable segmentation
            self.val_index = self._index(self.val_annotations, self.val_images, "val_images", True)
        if stage == "fit" and self.train_index is None:
            self._require_labels("fit")
            self.train_index = self._index(self.train_annotations, self.train_images, "train_images", masks)
            train_ids, val_ids = self.train_index.label_map.category_ids, self.label_map.category_ids
            if train_ids != val_ids:
                raise ValueError(f"{self.train_annotations} and {self.val_annotations} list different categories "
                                 f"({list(train_ids)} vs {list(val_ids)})")

    # Images stay uint8 until the model (ObjectDetector scales them on its device): a quarter of the bytes to pass
    # between processes and to the GPU, and no float conversion in the workers.
    def train_transforms(self) -> v2.Transform:
        """The training augmentation, then the project's box clean-up: every box the model sees lies inside its
        image and has an area."""
        return detection_pipeline(configured_or_default(self.train_transform_list,
                                         lambda: [v2.RandomHorizontalFlip(self.horizontal_flip)]), self.empty_masks)

    def eval_transforms(self) -> Optional[v2.Transform]:
        return None if self.val_transform_list is None else detection_pipeline(self.val_transform_list,
                                                                                self.empty_masks)

    def repeat_factors(self) -> np.ndarray:
        """``r(I)`` of every training image, in index order (all 1 without ``repeat_threshold``); crowd boxes
        (never trained on) do not count."""
        if self.train_index is None:
            self.setup("fit")
        index = self.train_index
        if self.repeat_threshold is None:
            return np.ones(len(index))
        labels = [index.labels[a:b][index.iscrowd[a:b] == 0] for a, b in zip(index.offsets[:-1], index.offsets[1:],
                                                                               strict=True)]
        return lvis_repeat_factors(labels, self.repeat_threshold)

    def training_sampler(self, dataset):
        if self.repeat_threshold is None:
            return super().training_sampler(dataset)
        return RepeatFactorSampler(dataset, self.seed, self.repeat_factors())

    def train_dataloader(self):
        self._require_labels("fit")
        dataset = CocoDetection(self.train_index, self.train_images, self.train_transforms(),
                                masks=self.wants_masks(), read=self.read)
        return self.loader(dataset, train=True, collate_fn=collate)

    def val_dataloader(self):
        self._require_labels("validation")
        dataset = CocoDetection(self.val_index, self.val_images, self.eval_transforms(), keep_crowd=True,
                                masks=self.wants_masks(), read=self.read)
        return self.loader(dataset, train=False, collate_fn=collate)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        """The images of ``predict_images`` (ids 1..N in path order), or else of the validation set (its ids), as
        they are: no transforms, unreadable files skipped."""
        if self.predict_images is not None:
            dataset = ImageFiles(list_images(self.predict_images, "data.predict_images"), read=self.read)
        else:
            self._require_labels("predict without predict_images")
            dataset = ImageFiles(ImageList(Path(self.val_images), list(self.val_index.file_names)),
                                 image_ids=self.val_index.image_ids.tolist(), read=self.read)
        return self.loader(dataset, train=False, collate_fn=collate, skip_corrupt=True)

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if self.empty_masks.dropped:
            log.warning("dropped %d instances whose mask was empty after augmentation (with their boxes) in all",
                        self.empty_masks.dropped)


def _predicts_masks(trainer) -> bool:
    """Whether the model of ``trainer`` (if any) predicts instance masks."""
    model = getattr(trainer, "lightning_module", None) if trainer is not None else None
    return bool(getattr(model, "predicts_masks", False))
