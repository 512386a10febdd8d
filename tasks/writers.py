"""Writer callbacks for ``predict``: results reach disk as batches finish, so memory stays flat on any number of
images (the shipped configs hold them in ``trainer.callbacks``)."""

from __future__ import annotations

import contextlib
import csv
import heapq
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from resnext_backbones.files import atomic_write

from .classification import ImageClassifier
from .data.masks import EncodedMasks, coco_segmentation
from .detection import ObjectDetector
from .pictures import detections_picture, segmentation_picture, side_by_side, write_png
from .segmentation import SemanticSegmenter

log = logging.getLogger("tasks")


@contextlib.contextmanager
def atomic_text_file(path: Path, newline: Optional[str] = None):
    """``path`` open for writing text, through :func:`resnext_backbones.files.atomic_write`: it appears only once
    it is complete, so a run stopped half-way leaves no truncated file that looks like a result."""
    with atomic_write(path) as temporary, open(temporary, "w", newline=newline) as f:
        yield f


def merged_parts(paths: Sequence[Path]) -> Iterator[dict]:
    """The rows (JSON lines) of the part files, merged in ``image_id`` order; each part is in that order already (the
    predict loaders list images by ascending id, and a process reads an ascending share of them), so one row per part
    is in memory at a time."""
    def rows(path: Path) -> Iterator[dict]:
        with open(path) as f:
            for line in f:
                yield json.loads(line)

    return heapq.merge(*(rows(p) for p in paths), key=lambda row: row["image_id"])


class StreamingWriter(BasePredictionWriter):
    """Base of the writers here: each process appends the rows of its batches (one JSON line per image, with its
    ``image_id``) to a part file of its own as the batches finish; at the end, process 0 merges the parts in image
    order into the outputs (:meth:`assemble`) and removes them.

    Subclasses say which model they take (``model_class``), what a batch gives (:meth:`rows`) and what the outputs are.
    """

    model_class: type = object
    default_name = "predictions"

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._part = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict" and not isinstance(pl_module, self.model_class):
            raise TypeError(f"{type(self).__name__} writes the predictions of {self.model_class.__name__} models, but "
                            f"the model is {type(pl_module).__name__}; put the writer of its task in trainer.callbacks "
                            "(tasks.CocoResultsWriter for detection, tasks.ClassificationResultsWriter for "
                            "classification, tasks.SegmentationWriter for semantic segmentation)")

    def output_path(self, trainer) -> Path:
        """``output``, or ``<log_dir>/<default_name>``."""
        return Path(self.output) if self.output else Path(trainer.log_dir or ".") / self.default_name

    def part_path(self, rank: int) -> Path:
        return self.path.with_name(f".{self.path.name}.part{rank}")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = self.output_path(trainer)  # every process asks: trainer.log_dir is a collective under DDP
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._part = open(self.part_path(trainer.global_rank), "w")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if batch is None:  # every image of the batch was unreadable (reported by the loader)
            return
        for row in self.rows(pl_module, prediction, batch):
            self._part.write(json.dumps(row) + "\n")
        self._part.flush()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._part.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [self.part_path(rank) for rank in range(trainer.world_size)]
            self.assemble(merged_parts(parts), pl_module)
            for part in parts:
                part.unlink()
        trainer.strategy.barrier()

    def rows(self, pl_module, prediction, batch) -> Iterable[dict]:
        """One JSON-ready dict per image of the batch, with its ``image_id``."""
        raise NotImplementedError

    def assemble(self, rows: Iterator[dict], pl_module) -> None:
        """Write the outputs from every image's row, in image order."""
        raise NotImplementedError


class CocoResultsWriter(StreamingWriter):
    """On ``predict``, write the detector's results as a COCO results JSON (dataset category ids, xywh boxes in the
    original image's pixels; for a model that predicts masks, each mask as a compressed RLE ``segmentation``, which
    pycocotools' ``loadRes`` and segm evaluation read), whose entries also carry the image's ``file_name``; beside it,
    the images (``id``, ``file_name``, ``width``, ``height``) and the categories, so that
    ``COCO(images).loadRes(predictions)`` turns the two into a COCO dataset. Both are written as batches finish
    (parts per process, merged at the end).

    Args:
        output: the results file; default ``<log_dir>/predictions.json``.
        images_output: the images file; default beside ``output``, named ``<output stem>_images.json``.
        draw_dir: if set, also write each image as PNG here (under its ``file_name`` + ``.png``), with the boxes
            (and masks) scoring at least ``draw_threshold`` labelled with category name and score; images smaller
            than 320 pixels are enlarged so that the labels stay legible.
        draw_threshold: lowest score drawn.
    """

    model_class = ObjectDetector
    default_name = "predictions.json"

    def __init__(self, output: Optional[str] = None, images_output: Optional[str] = None,
                 draw_dir: Optional[str] = None, draw_threshold: float = 0.3) -> None:
        super().__init__(output)
        self.images_output, self.draw_dir, self.draw_threshold = images_output, draw_dir, draw_threshold

    def images_path(self) -> Path:
        if self.images_output:
            return Path(self.images_output)
        return self.path.with_name(f"{self.path.stem}_images.json")

    def rows(self, pl_module, prediction: List[Dict], batch) -> Iterator[dict]:
        images, infos = batch
        for image, info, detections in zip(images, infos, prediction, strict=True):
            order = detections["scores"].argsort(descending=True, stable=True)
            xywh = detections["boxes"][order].clone()
            xywh[:, 2:] -= xywh[:, :2]
            results = [{"category_id": c, "bbox": b, "score": s} for b, c, s in zip(
                xywh.tolist(), detections["labels"][order].tolist(), detections["scores"][order].tolist(), strict=True)]
            if pl_module.predicts_masks:
                for result, rle in zip(results, EncodedMasks.of(detections["masks"][order]).rles, strict=True):
                    result["segmentation"] = coco_segmentation(rle)
            yield {"image_id": int(info["image_id"]), "file_name": info["file_name"], "width": info["width"],
                   "height": info["height"], "detections": results}
            if self.draw_dir:
                picture = detections_picture(image, detections, pl_module.categories, self.draw_threshold)
                write_png(picture, self.picture_path(info))

    def picture_path(self, info: dict) -> Path:
        """``draw_dir/<file_name>.png``; a file name outside the image folder gets a flat one with its image id."""
        name = Path(info["file_name"])
        if name.is_absolute() or ".." in name.parts:
            name = Path(f"{info['image_id']}_{name.name}")
        return Path(self.draw_dir) / f"{name}.png"

    def assemble(self, rows: Iterator[dict], pl_module) -> None:
        images_path, count, detections = self.images_path(), 0, 0
        with atomic_text_file(self.path) as results, atomic_text_file(images_path) as images:
            results.write("[")
            images.write('{"images": [')
            for row in rows:
                images.write(("," if count else "") + "\n" + json.dumps(
                    {"id": row["image_id"], "file_name": row["file_name"], "width": row["width"],
                     "height": row["height"]}))
                for d in row["detections"]:
                    results.write(("," if detections else "") + "\n" + json.dumps(
                        {"image_id": row["image_id"], "file_name": row["file_name"], **d}))
                    detections += 1
                count += 1
            results.write("\n]\n")
            categories = [{"id": i, "name": name} for i, name in pl_module.categories.items()]
            images.write(f'\n], "categories": {json.dumps(categories)}}}\n')
        log.info("wrote %d detections on %d images to %s (images and categories: %s)%s", detections, count, self.path,
                 images_path, f"; pictures in {self.draw_dir}" if self.draw_dir else "")


class ClassificationResultsWriter(StreamingWriter):
    """On ``predict``, write a CSV with one row per image: its ``path``, then the ``top_k`` most probable class names
    and their probabilities (``class_1``, ``probability_1``, ...). Written as batches finish (parts per process,
    merged at the end).

    Args:
        output: the CSV file; default ``<log_dir>/predictions.csv``.
        top_k: classes per image (at most the model's number of classes).
    """

    model_class = ImageClassifier
    default_name = "predictions.csv"

    def __init__(self, output: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(output)
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"ClassificationResultsWriter top_k={top_k!r} must be a positive integer")
        self.top_k = top_k

    def rows(self, pl_module, prediction, batch) -> Iterator[dict]:
        _, info = batch
        names = pl_module.label_map.names
        top = prediction.float().topk(min(self.top_k, prediction.shape[-1]), dim=-1)
        for i, (indices, values) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
            yield {"image_id": int(info["image_id"][i]), "path": info["path"][i],
                   "top": [[names[j], p] for j, p in zip(indices, values, strict=True)]}

    def assemble(self, rows: Iterator[dict], pl_module) -> None:
        k, count = min(self.top_k, len(pl_module.label_map)), 0
        with atomic_text_file(self.path, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("class", "probability")])
            for row in rows:
                writer.writerow([row["path"]] + [v for name, p in row["top"] for v in (name, f"{p:.6f}")])
                count += 1
        log.info("wrote the top %d classes of %d images to %s", k, count, self.path)


class SegmentationWriter(StreamingWriter):
    """On ``predict``, write each image's labels as an index PNG at the image's own size, ``<output>/<file_name
    without its extension>.png`` (pixel value = class index in the model's class order, uint8; 16-bit beyond 256
    classes), as the batches finish, and ``<output>/classes.json`` (the class names, index order) at the end.

    Args:
        output: the folder; default ``<log_dir>/predictions``.
        draw_dir: if set, also write each image beside its prediction overlaid in the classes' colours, as PNG under
            its ``file_name`` + ``.png`` (small images enlarged).
    """

    model_class = SemanticSegmenter
    default_name = "predictions"

    def __init__(self, output: Optional[str] = None, draw_dir: Optional[str] = None) -> None:
        super().__init__(output)
        self.draw_dir = draw_dir

    def mask_path(self, file_name: str, image_id: int) -> Path:
        """``output/<file_name>`` with ``.png`` for its extension; a name outside the image folder gets a flat one
        with its image id."""
        name = Path(file_name)
        if name.is_absolute() or ".." in name.parts:
            name = Path(f"{image_id}_{name.name}")
        return self.path / name.with_suffix(".png")

    def rows(self, pl_module, prediction: List, batch) -> Iterator[dict]:
        images, infos = batch
        for image, info, labels in zip(images, infos, prediction, strict=True):
            path = self.mask_path(info["file_name"], int(info["image_id"]))
            write_index_png(labels, path)
            if self.draw_dir:
                image = image[:, :info["height"], :info["width"]]
                picture = side_by_side(segmentation_picture(image, None),
                                       segmentation_picture(image, labels, ignore_index=-1))
                write_png(picture, Path(self.draw_dir) / f"{path.relative_to(self.path).with_suffix('')}.png")
            yield {"image_id": int(info["image_id"]), "file_name": info["file_name"]}

    def assemble(self, rows: Iterator[dict], pl_module) -> None:
        count = sum(1 for _ in rows)
        with atomic_text_file(self.path / "classes.json") as f:
            json.dump(list(pl_module.label_map.names), f, indent=1)
        log.info("wrote the labels of %d images as index PNGs to %s (class names: classes.json)%s", count, self.path,
                 f"; pictures in {self.draw_dir}" if self.draw_dir else "")


def write_index_png(labels, path: Path) -> None:
    """``labels`` (H x W) as a single-channel PNG: 8-bit for uint8 labels, else 16-bit; atomically."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = labels.numpy()
    image = Image.fromarray(array if array.dtype == np.uint8 else array.astype(np.uint16))
    with atomic_write(path) as temporary:
        image.save(temporary, format="PNG")
