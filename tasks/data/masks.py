"""Instance masks, kept compact until they are needed: the COCO ``segmentation`` fields of a data set as flat arrays
(no per-instance Python objects, so data-loader workers share their pages), decoded by pycocotools when an image
is loaded; and masks as pycocotools RLE between the model, the metric and the files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor

MASK_THRESHOLD = 0.5  # Mask R-CNN's soft masks -> binary, as torchvision's references and COCO evaluations do


def row_offsets(lengths) -> np.ndarray:
    """Where each row of a flat array starts, and the end: ``[0, cumsum(lengths)...]`` (int64)."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@dataclass
class Ragged:
    """A list of 1-d arrays as one array of values and the offsets of each: row ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[np.ndarray], dtype) -> Ragged:
        values = np.concatenate(rows).astype(dtype) if len(rows) else np.zeros(0, dtype)
        return cls(values, row_offsets([len(r) for r in rows]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def take(self, rows: np.ndarray) -> Ragged:
        """The rows ``rows`` (indices, or a boolean mask), in that order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        starts, lengths = self.offsets[:-1][rows], np.diff(self.offsets)[rows]
        offsets = row_offsets(lengths)
        return Ragged(self.values[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])], offsets)


@dataclass
class Segmentations:
    """The COCO ``segmentation`` field of each instance, in one of its three forms: polygons (their coordinates as
    float64, as the JSON has them, and the length of each polygon), or an RLE (compressed counts and its height and
    width; an uncompressed RLE, as COCO stores crowd regions, is compressed on reading). Decoded as pycocotools'
    ``COCO.annToMask`` decodes them, so that the masks a model learns and is evaluated on are the reference's."""

    coordinates: Ragged  # float64: every polygon of the instance, x y x y ..., one after the other (none: an RLE)
    polygon_lengths: Ragged  # int64: coordinates in each polygon of the instance
    rle_counts: Ragged  # uint8: the compressed RLE counts (none: polygons)
    rle_sizes: np.ndarray  # (instances, 2) int64: height, width of the RLE (0, 0: polygons)

    @classmethod
    def from_coco(cls, fields: Sequence, annotation_ids: Sequence[int], source: str) -> Segmentations:
        """From the ``segmentation`` fields of COCO annotations; an absent, empty or malformed one is an error that
        names ``source`` and the annotation."""
        coordinates, lengths, counts, sizes = [], [], [], np.zeros((len(fields), 2), dtype=np.int64)
        for i, (field, annotation) in enumerate(zip(fields, annotation_ids, strict=True)):
            polygons, rle = _parse(field, f"{source}: annotation {annotation}")
            coordinates.append(np.concatenate(polygons) if polygons else np.zeros(0))
            lengths.append(np.asarray([len(p) for p in polygons], dtype=np.int64))
            counts.append(np.frombuffer(rle["counts"], dtype=np.uint8) if rle else np.zeros(0, np.uint8))
            if rle:
                sizes[i] = rle["size"]
        return cls(Ragged.of(coordinates, np.float64), Ragged.of(lengths, np.int64), Ragged.of(counts, np.uint8),
                   sizes)

    def __len__(self) -> int:
        return len(self.rle_sizes)

    @property
    def nbytes(self) -> int:
        arrays = (self.coordinates.values, self.coordinates.offsets, self.polygon_lengths.values,
                  self.polygon_lengths.offsets, self.rle_counts.values, self.rle_counts.offsets, self.rle_sizes)
        return sum(a.nbytes for a in arrays)

    def take(self, rows: np.ndarray) -> Segmentations:
        """The instances ``rows`` (indices, or a boolean mask), in that order."""
        return Segmentations(self.coordinates.take(rows), self.polygon_lengths.take(rows), self.rle_counts.take(rows),
                             self.rle_sizes[rows])

    def rle(self, i: int, height: int, width: int) -> dict:
        """Instance ``i`` as a compressed RLE of a ``height`` x ``width`` image: polygons rasterised (and merged) by
        pycocotools at that size; an RLE of another size is an error."""
        if self.rle_sizes[i].any():
            if tuple(self.rle_sizes[i]) != (height, width):
                raise ValueError(f"an RLE segmentation of {self.rle_sizes[i][0]}x{self.rle_sizes[i][1]} pixels on an "
                                 f"image of {height}x{width}; fix the annotation's 'size' (masks are in the image's "
                                 "pixels)")
            return {"size": [height, width], "counts": self.rle_counts[i].tobytes()}
        coordinates, bounds = self.coordinates[i], row_offsets(self.polygon_lengths[i])
        polygons = [coordinates[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))

    def masks(self, rows: Sequence[int], height: int, width: int) -> np.ndarray:
        """The masks of the instances ``rows``, ``(len(rows), height, width)`` uint8 (1 inside)."""
        if len(rows) == 0:
            return np.zeros((0, height, width), dtype=np.uint8)
        decoded = mask_utils.decode([self.rle(int(i), height, width) for i in rows])  # (height, width, n)
        return np.ascontiguousarray(decoded.transpose(2, 0, 1))


def _parse(field, where: str) -> Tuple[List[np.ndarray], Optional[dict]]:
    """``(polygons, None)`` or ``([], compressed RLE)`` of one ``segmentation`` field."""
    if isinstance(field, list) and field and all(isinstance(p, list) for p in field):
        polygons = [np.asarray(p, dtype=np.float64) for p in field]
        if any(len(p) < 4 or len(p) % 2 or not np.isfinite(p).all() for p in polygons):
            raise ValueError(f"{where} has a polygon that is not a list of finite x, y pairs (at least 2); fix or "
                             "remove it")
        return polygons, None
    if isinstance(field, dict) and "counts" in field and "size" in field:
        height, width = (int(v) for v in field["size"])
        if isinstance(field["counts"], list):  # uncompressed, as COCO stores crowd regions
            return [], mask_utils.frPyObjects(field, height, width)
        counts = field["counts"].encode() if isinstance(field["counts"], str) else bytes(field["counts"])
        return [], {"size": [height, width], "counts": counts}
    raise ValueError(f"{where} has no segmentation (polygons or an RLE), which masks need; give every instance one, "
                     "or set data.masks: false to train boxes only")


@dataclass
class EncodedMasks:
    """Binary masks of one image as pycocotools RLE: what evaluation keeps per image until the end of an epoch and
    gathers from every process (an image's masks at its full size would take ``N x H x W`` bytes each)."""

    size: Tuple[int, int]  # height, width
    rles: List[dict]

    @classmethod
    def of(cls, masks: Tensor) -> EncodedMasks:
        """From ``(N, H, W)`` binary masks (bool or 0/1)."""
        array = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        return cls(tuple(masks.shape[-2:]), mask_utils.encode(array) if len(masks) else [])

    def decode(self) -> Tensor:
        """``(N, H, W)`` bool."""
        if not self.rles:
            return torch.zeros((0, *self.size), dtype=torch.bool)
        return torch.from_numpy(mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool))

    def __len__(self) -> int:
        return len(self.rles)


def binary_masks(masks: Tensor) -> Tensor:
    """Mask R-CNN's soft masks ``(N, 1, H, W)`` as ``(N, H, W)`` bool, thresholded at :data:`MASK_THRESHOLD`."""
    return masks[:, 0] > MASK_THRESHOLD


def coco_segmentation(rle: dict) -> Dict[str, Union[List[int], str]]:
    """A compressed RLE as a COCO results file holds it (``counts`` as text)."""
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
