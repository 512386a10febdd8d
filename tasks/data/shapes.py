"""The embedded default data: a small deterministic set of coloured shapes, generated once into a cache folder in
COCO (detection), image-folder (classification) and index-mask (semantic segmentation) formats, so the shipped
configs exercise the real loaders with no download.

The cache folder is ``$RESNEXT_BACKBONES_DATA`` or ``~/.cache/resnext_backbones``. Category ids are sparse on
purpose (3, 5, 9): the loaders must map them to contiguous labels and back. Each detection annotation also has
the shape's exact mask as its ``segmentation`` (the pixels that show the shape): a polygon along the pixel edges
for squares and triangles, which pycocotools rasterises to exactly those pixels, and a compressed RLE for disks
(and for any shape that a later one cuts in two), so that Mask R-CNN trains on both forms COCO uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

from resnext_backbones.files import atomic_write

from .masks import coco_segmentation

VERSION = "v3"  # v2: segmentations added (images and boxes as in v1); v3: 200 classification validation images
# per class, was 25 (one image was 1.3 accuracy points); the detection set as in v2
CATEGORIES = {3: "square", 5: "disk", 9: "triangle"}


def cache_root() -> Path:
    return Path(os.environ.get("RESNEXT_BACKBONES_DATA", Path.home() / ".cache" / "resnext_backbones"))


def _shape_mask(kind: str, h: int, w: int, box: Tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "square":
        return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "disk":
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    # triangle, apex up: inside when the half-width at this row covers the column
    t = (yy - y0 + 0.5) / (y1 - y0)
    return (yy >= y0) & (yy < y1) & (np.abs(xx - cx) <= t * rx)


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def draw(rng: np.random.Generator, h: int, w: int, kinds: List[str], min_size: int, max_size: int):
    """An HxWx3 uint8 image with the given shapes, and their tight xyxy boxes."""
    image, boxes, _ = draw_instances(rng, h, w, kinds, min_size, max_size)
    return image, boxes


def draw_instances(rng: np.random.Generator, h: int, w: int, kinds: List[str], min_size: int, max_size: int):
    """An HxWx3 uint8 image with the given shapes, their tight xyxy boxes (of the whole shape) and their masks (HxW
    bool: the pixels that show the shape, less what later shapes cover)."""
    image = rng.integers(0, 256, 3) * 0.5 + rng.normal(0, 12, (h, w, 3))
    boxes: List[Tuple[int, int, int, int]] = []
    masks: List[np.ndarray] = []
    for kind in kinds:
        for _ in range(20):  # a few tries at a place that does not hide an earlier shape
            bw, bh = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
            bw, bh = min(bw, w - 2), min(bh, h - 2)
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_iou(box, b) < 0.2 for b in boxes):
                break
        mask = _shape_mask(kind, h, w, box)
        image[mask] = rng.integers(128, 256, 3) * rng.permutation([1.0, 0.6, 0.2])
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        masks = [m & ~mask for m in masks] + [mask]
    return np.clip(image, 0, 255).astype(np.uint8), boxes, masks


def draw_scene(rng: np.random.Generator, h: int, w: int, count: int, min_size: int, max_size: int):
    """An HxWx3 uint8 image of ``count`` shapes of random kinds, with their tight xyxy boxes and category ids: the
    shapes of :func:`draw_instances`, each drawn within its own box, so that a large image of many small objects (the
    tiled-prediction benchmark's) costs its objects' area rather than the image's once per shape. Later shapes may
    cover a little of earlier ones (their boxes overlap by an IoU under 0.2); boxes are of the whole shape."""
    image = rng.integers(0, 256, 3) * 0.5 + rng.normal(0, 12, (h, w, 3))
    ids = list(CATEGORIES)
    boxes: List[Tuple[int, int, int, int]] = []
    labels: List[int] = []
    for _ in range(count):
        category = ids[int(rng.integers(0, len(ids)))]
        for _ in range(20):  # a few tries at a place that does not hide an earlier shape
            bw, bh = (min(int(v), side - 2) for v, side in zip(rng.integers(min_size, max_size + 1, 2), (w, h),
                                                               strict=True))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(_iou(box, b) < 0.2 for b in boxes):
                break
        mask = _shape_mask(CATEGORIES[category], bh, bw, (0, 0, bw, bh))
        image[y0:y0 + bh, x0:x0 + bw][mask] = rng.integers(128, 256, 3) * rng.permutation([1.0, 0.6, 0.2])
        ys, xs = np.nonzero(mask)
        boxes.append((x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1))
        labels.append(category)
    return np.clip(image, 0, 255).astype(np.uint8), boxes, labels


def pixel_outline(mask: np.ndarray):
    """The polygon along the pixel edges of ``mask`` (x, y, x, y, ...), if each of its rows is one run and the rows are
    consecutive (squares, triangles, disks); else ``None``. pycocotools rasterises it to exactly ``mask``."""
    rows = np.flatnonzero(mask.any(1))
    if len(rows) == 0 or rows[-1] - rows[0] + 1 != len(rows):
        return None
    right, left = [], []
    for y in rows:
        xs = np.flatnonzero(mask[y])
        if xs[-1] - xs[0] + 1 != len(xs):
            return None
        right += [(xs[-1] + 1, y), (xs[-1] + 1, y + 1)]
        left = [(xs[0], y + 1), (xs[0], y)] + left
    points = right + left
    # drop the corners that lie on a straight edge (a square keeps its 4)
    corners = [p for i, p in enumerate(points) if not _on_a_line(points[i - 1], p, points[(i + 1) % len(points)])]
    return [float(v) for p in corners for v in p]


def _on_a_line(a, b, c) -> bool:
    return (a[0] == b[0] == c[0]) or (a[1] == b[1] == c[1])


def segmentation(kind: str, mask: np.ndarray):
    """The COCO ``segmentation`` of ``mask``: a polygon (squares, triangles) or a compressed RLE (disks, and shapes
    that are no longer one run per row)."""
    outline = pixel_outline(mask) if kind != "disk" else None
    if outline is not None:
        return [outline]
    return coco_segmentation(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def _write(image: np.ndarray, path: Path) -> None:
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    write_file(str(path), encode_jpeg(chw, quality=92) if path.suffix == ".jpg" else encode_png(chw))


def _generate_detection(out: Path, split: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True)
    names = list(CATEGORIES.values())
    ids = {v: k for k, v in CATEGORIES.items()}
    images, annotations = [], []
    for i in range(count):
        h, w = int(rng.choice([112, 128, 144])), int(rng.choice([112, 128, 144]))
        n = 0 if i % 20 == 7 else int(rng.integers(1, 4))  # every 20th image has no object
        kinds = [names[k] for k in rng.integers(0, len(names), n)]
        image, boxes, masks = draw_instances(rng, h, w, kinds, min_size=20, max_size=56)
        file_name = f"{i:05d}.jpg"
        _write(image, out / split / file_name)
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for kind, (x0, y0, x1, y1), mask in zip(kinds, boxes, masks, strict=True):
            # area stays the box's, as in v1: the box mAP of the detection quick start is unchanged
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[kind],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "segmentation": segmentation(kind, mask)})
    categories = [{"id": k, "name": v} for k, v in CATEGORIES.items()]
    (out / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))


def _generate_segmentation(out: Path, split: str, count: int, seed: int) -> None:
    """``split/images/NNNNN.jpg`` and ``split/masks/NNNNN.png``: the detection set's kind of images, each pixel labelled
    by the shape it shows (square 1, disk 2, triangle 3; background 0) in a palette PNG, as VOC stores masks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(CATEGORIES.values())
    (out / split / "images").mkdir(parents=True)
    (out / split / "masks").mkdir(parents=True)
    palette = [0, 0, 0, 255, 99, 71, 50, 205, 50, 30, 144, 255]
    for i in range(count):
        h, w = int(rng.choice([112, 128, 144])), int(rng.choice([112, 128, 144]))
        n = 0 if i % 20 == 7 else int(rng.integers(1, 4))
        kinds = [names[k] for k in rng.integers(0, len(names), n)]
        image, _, masks = draw_instances(rng, h, w, kinds, min_size=20, max_size=56)
        labels = np.zeros((h, w), dtype=np.uint8)
        for kind, mask in zip(kinds, masks, strict=True):
            labels[mask] = names.index(kind) + 1
        _write(image, out / split / "images" / f"{i:05d}.jpg")
        mask_image = Image.fromarray(labels, mode="P")
        mask_image.putpalette(palette)
        mask_image.save(out / split / "masks" / f"{i:05d}.png")


def _generate_classification(out: Path, split: str, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in CATEGORIES.values():
        (out / split / name).mkdir(parents=True)
        for i in range(per_class):
            image, _ = draw(rng, 64, 64, [name], min_size=24, max_size=52)
            _write(image, out / split / name / f"{i:04d}.png")


def _ensure(name: str, build) -> Path:
    """The folder ``name`` under the cache, built atomically on first use (safe with several processes)."""
    final = cache_root() / f"shapes-{VERSION}" / name
    if final.is_dir():
        return final
    try:
        with atomic_write(final, folder=True) as tmp:
            build(tmp)
    except OSError:
        if not final.is_dir():  # someone else won the race only if the folder is now there
            raise
    return final


def shapes_detection() -> List[str]:
    """``[train_annotations, train_images, val_annotations, val_images]`` of the embedded detection set:
    240 training and 61 validation images (an odd count, on purpose) of 1-3 shapes, some with none."""
    def build(out: Path) -> None:
        _generate_detection(out, "train", 240, seed=0)
        _generate_detection(out, "val", 61, seed=1)

    root = _ensure("detection", build)
    return [str(root / "train.json"), str(root / "train"), str(root / "val.json"), str(root / "val")]


def shapes_classification() -> List[str]:
    """``[train_dir, val_dir]`` of the embedded classification set: 3 classes, 100 training and 200 validation
    images each (600 to validate on: an image is 0.17 accuracy points)."""
    def build(out: Path) -> None:
        _generate_classification(out, "train", 100, seed=2)
        _generate_classification(out, "val", 200, seed=3)

    root = _ensure("classification", build)
    return [str(root / "train"), str(root / "val")]


SEGMENTATION_CLASSES = ["background", *CATEGORIES.values()]


def shapes_segmentation() -> List:
    """``[train_images, train_masks, val_images, val_masks, classes file]`` of the embedded semantic segmentation set:
    240 training and 61 validation images of 0-3 shapes, masks of class indices (background 0, then the shapes in
    category id order) as palette PNGs."""
    def build(out: Path) -> None:
        _generate_segmentation(out, "train", 240, seed=4)
        _generate_segmentation(out, "val", 61, seed=5)
        (out / "classes.json").write_text(json.dumps(SEGMENTATION_CLASSES))

    root = _ensure("segmentation", build)
    return [str(root / "train" / "images"), str(root / "train" / "masks"), str(root / "val" / "images"),
            str(root / "val" / "masks"), str(root / "classes.json")]
