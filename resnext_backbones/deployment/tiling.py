"""Tiled prediction on images larger than a detector's input: :func:`tiled_detections`.

A large image resized to a detector's input shrinks its small objects below what the detector sees. Tiling cuts the
image into overlapping tiles at the detector's own input size (:func:`tile_grid`, the grid SAHI cuts for the same
size and overlap), runs the tiles through the detector a batch at a time (one forward per batch: the tiles are views
of the image, not copies handed over one by one), shifts each tile's boxes and masks back into the image, and merges
the detections that tiles share (:func:`merge_detections`): greedy NMS, or SAHI's non-maximum merging (NMM: the
union box, the highest score, the union mask), class by class. An optional whole-image pass joins the merge, for
objects larger than a tile.

Merging is across sources only: a detection is matched with detections of other tiles (or of the whole-image pass),
never of its own tile, whose duplicates the detector's own NMS has already settled. So an image that is one tile
gives the detector's detections unchanged, and a merge threshold below the detector's NMS threshold does not thin a
tile's crowd of objects. (``torchvision.ops.batched_nms`` cannot leave a tile's own pairs out, hence the greedy pass
over a match matrix here.) Matching is by IoU or by IoS, the intersection over the smaller box (SAHI's default): a
tile that sees only part of an object cut by its edge finds a box inside the whole one, with a low IoU but an IoS of
one, so IoS takes the part for the object it is.

Pure PyTorch: any torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) in eval mode, on our trunks or
not, takes it; :class:`tasks.ObjectDetector` runs it at validate, test and predict where ``model.tile`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

__all__ = ["MATCHES", "MERGES", "Tiling", "merge_detections", "tile_grid", "tile_starts", "tiled_detections",
           "union_boxes"]

MERGES = ("nms", "nmm")  # drop the lower-scoring match | merge the matches into the highest-scoring one
MATCHES = ("iou", "ios")  # intersection over union | over the smaller box's area


@dataclass(frozen=True)
class Tiling:
    """How to tile: the settings of ``model.tile`` (checked here; errors name ``key``'s entries).

    Args:
        size: tile side in pixels; ``None``: the detector's own input size (torchvision's ``transform.min_size``,
            the size it resizes to at inference), so that tiles reach the network unresized.
        overlap: pixels that neighbouring tiles share, below ``size``; at least the side of the largest object that
            should be whole in some tile. The last tile of a row or column is moved back to end at the image's
            edge, so it shares more.
        merge: ``nms`` (keep the highest-scoring of matching detections) | ``nmm`` (merge them into it: union box,
            its score and label, union mask).
        iou: match threshold: detections of one class, from different tiles, whose ``match`` exceeds it are one
            object.
        match: ``iou`` | ``ios`` (intersection over the smaller box: a part of an object cut by a tile edge matches
            the whole object another tile sees).
        full_image: also run the detector on the whole image (resized as without tiling) and merge its detections
            with the tiles', for objects larger than a tile.
        batch: tiles per forward of the detector.
        key: the name of these settings in error messages.
    """

    size: Optional[int] = None
    overlap: int = 0
    merge: str = "nms"
    iou: float = 0.5
    match: str = "ios"
    full_image: bool = False
    batch: int = 8
    key: str = field(default="tile", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        if self.size is not None and (not _is_int(self.size) or self.size < 1):
            raise ValueError(f"{k}.size={self.size!r} must be a positive number of pixels, or null for the "
                             "detector's input size")
        if not _is_int(self.overlap) or self.overlap < 0:
            raise ValueError(f"{k}.overlap={self.overlap!r} must be a non-negative number of pixels")
        if self.size is not None and self.overlap >= self.size:
            raise ValueError(f"{k}.overlap={self.overlap} must be below {k}.size={self.size}: tiles that share all "
                             f"their pixels never advance; a common choice is a fifth of the size "
                             f"({self.size // 5})")
        if self.merge not in MERGES:
            raise ValueError(f"{k}.merge={self.merge!r} is not supported; choose one of {list(MERGES)}")
        if self.match not in MATCHES:
            raise ValueError(f"{k}.match={self.match!r} is not supported; choose one of {list(MATCHES)}")
        if isinstance(self.iou, bool) or not isinstance(self.iou, (int, float)) or not 0 <= self.iou < 1:
            raise ValueError(f"{k}.iou={self.iou!r} must be a number in [0, 1): detections whose {self.match} "
                             "exceeds it are merged")
        if not isinstance(self.full_image, bool):
            raise ValueError(f"{k}.full_image={self.full_image!r} must be true or false")
        if not _is_int(self.batch) or self.batch < 1:
            raise ValueError(f"{k}.batch={self.batch!r} must be a positive number of tiles per forward")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str = "tile") -> Tiling:
        """The settings of a config mapping (YAML's ``tile: {size: 512, overlap: 64}``); an unknown entry is an error
        naming it and the known ones."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{key}={config!r} must be a mapping such as {{size: 512, overlap: 64}}")
        known = [f for f in cls.__dataclass_fields__ if f != "key"]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"{key} has unknown entries {unknown}; the entries are {known}")
        return cls(**config, key=key)

    def tile_size(self, model: Any) -> int:
        """``size``, or the input size of ``model`` (a torchvision detector's ``transform.min_size`` at inference)."""
        if self.size is not None:
            return self.size
        min_size = getattr(getattr(model, "transform", None), "min_size", None)
        if not min_size:
            raise ValueError(f"{self.key}.size is unset and the model ({type(model).__name__}) has no "
                             "transform.min_size to take it from; set it")
        return int(min_size[-1])  # what torchvision resizes to in eval mode


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tile_starts(length: int, size: int, overlap: int) -> List[int]:
    """Where the tiles along one side of ``length`` pixels start: every ``size - overlap`` pixels from 0, and the last
    one moved back to end at ``length`` (one tile, at 0, where ``length <= size``)."""
    if length <= size:
        return [0]
    return list(range(0, length - size, size - overlap)) + [length - size]


def tile_grid(height: int, width: int, size: int, overlap: int) -> Tensor:
    """The tiles of a ``height`` x ``width`` image, ``(T, 4)`` int64 xyxy boxes, row by row: ``size`` square, or the
    whole side where the image is smaller."""
    ys, xs = tile_starts(height, size, overlap), tile_starts(width, size, overlap)
    return torch.tensor([(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs],
                        dtype=torch.int64).reshape(-1, 4)


def tiled_detections(model: Callable[[List[Tensor]], List[Dict[str, Tensor]]], images: Sequence[Tensor],
                     tiling: Tiling) -> List[Dict[str, Tensor]]:
    """Detections on each of ``images`` (``(C, H, W)`` float tensors, as ``model`` takes them) by tiles, in the
    ``model``'s own output format, in image pixels: ``boxes`` (xyxy), ``scores``, ``labels`` (the model's), and, where
    the model gives ``masks`` (Mask R-CNN: ``(N, 1, H, W)`` probabilities), masks of the image's size (a merged mask
    is the pixelwise maximum of its parts: the union of them at any threshold). Detections are ordered by score.

    ``model`` is a torchvision detector in eval mode (any callable from a list of images to a list of detection
    dicts). The tiles of all ``images`` go through it ``tiling.batch`` at a time."""
    size = tiling.tile_size(model)
    grids = [tile_grid(int(image.shape[-2]), int(image.shape[-1]), size, tiling.overlap) for image in images]
    crops = [(i, x0, y0, image[..., y0:y1, x0:x1])  # views of the image
             for i, (image, grid) in enumerate(zip(images, grids, strict=True)) for x0, y0, x1, y1 in grid.tolist()]
    outputs: List[Dict[str, Tensor]] = []
    for start in range(0, len(crops), tiling.batch):
        outputs += model([crop for _, _, _, crop in crops[start:start + tiling.batch]])
    parts: List[List[Tuple[Dict[str, Tensor], int, int]]] = [[] for _ in images]
    for (i, x0, y0, _), output in zip(crops, outputs, strict=True):
        parts[i].append((output, x0, y0))
    # the whole-image pass, where it adds something: an image of one tile is its own whole image
    whole = [i for i, grid in enumerate(grids) if tiling.full_image and len(grid) > 1]
    for start in range(0, len(whole), tiling.batch):
        chunk = whole[start:start + tiling.batch]
        for i, output in zip(chunk, model([images[i] for i in chunk]), strict=True):
            parts[i].append((output, 0, 0))
    return [_merged(image_parts, tuple(image.shape[-2:]), tiling)
            for image_parts, image in zip(parts, images, strict=True)]


def _merged(parts: List[Tuple[Dict[str, Tensor], int, int]], image_size: Tuple[int, int], tiling: Tiling
            ) -> Dict[str, Tensor]:
    """One image's detections from its parts: each tile's (or the whole-image pass's) detections, and where the tile
    starts."""
    if len(parts) == 1:  # one tile, the whole image: the detector's own detections
        return dict(parts[0][0])
    boxes = torch.cat([p["boxes"] + p["boxes"].new_tensor([x0, y0, x0, y0]) for p, x0, y0 in parts])
    scores = torch.cat([p["scores"] for p, _, _ in parts])
    labels = torch.cat([p["labels"] for p, _, _ in parts])
    sources = torch.cat([torch.full((len(p["boxes"]),), s, dtype=torch.int64, device=boxes.device)
                         for s, (p, _, _) in enumerate(parts)])
    keepers, keeper_of = merge_detections(boxes, scores, labels, sources, tiling.iou, tiling.match)
    if tiling.merge == "nmm":
        boxes = union_boxes(boxes, keeper_of)
    result = {"boxes": boxes[keepers], "scores": scores[keepers], "labels": labels[keepers]}
    if "masks" in parts[0][0]:
        result["masks"] = _pasted_masks(parts, keepers, keeper_of if tiling.merge == "nmm" else None, image_size)
    return result


def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, sources: Tensor, threshold: float = 0.5,
                     match: str = "ios") -> Tuple[Tensor, Tensor]:
    """Which detections stay, and which each stands for: ``(keepers, keeper_of)``, the indices of the kept
    detections in descending score order, and for every detection the index of the kept one it goes into (a kept
    detection's is its own).

    Greedy, highest score first, class by class: a detection whose ``match`` (``iou`` | ``ios``) with a kept
    detection of another source exceeds ``threshold`` goes into it. NMS keeps the keepers as they are; NMM (SAHI's
    greedy NMM) grows each to the union of the boxes that went into it (:func:`union_boxes`): those that match the
    keeper's own box, not the growing union, so both merges keep the same detections. Detections of the same
    ``source`` never match. ``boxes`` xyxy ``(N, 4)``; ``scores``, ``labels``, ``sources`` ``(N,)``."""
    order = scores.argsort(descending=True, stable=True)
    keeper_of = torch.arange(len(scores), device=scores.device)
    for label in labels.unique().tolist():
        rows = order[labels[order] == label]  # this class, best first
        matches = _match_matrix(boxes[rows], match) > threshold
        matches &= sources[rows][:, None] != sources[rows][None, :]
        matches.triu_(1)  # a detection is matched only by higher-scoring ones
        taken = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for i in matches.any(1).nonzero().flatten().tolist():
            if not taken[i]:  # kept: it takes the matches that no higher-scoring keeper took
                newly = matches[i] & ~taken
                taken |= newly
                keeper_of[rows[newly]] = rows[i]
    kept = keeper_of == torch.arange(len(scores), device=scores.device)
    return order[kept[order]], keeper_of


def union_boxes(boxes: Tensor, keeper_of: Tensor) -> Tensor:
    """Each kept detection's box grown to the union of the boxes merged into it (``keeper_of`` from
    :func:`merge_detections`); rows of detections merged away are left as they are."""
    index = keeper_of[:, None].expand(-1, 2)
    low = boxes[:, :2].scatter_reduce(0, index, boxes[:, :2], "amin")
    high = boxes[:, 2:].scatter_reduce(0, index, boxes[:, 2:], "amax")
    return torch.cat([low, high], 1)


def _match_matrix(boxes: Tensor, match: str) -> Tensor:
    if match == "iou":
        return box_iou(boxes, boxes)
    if match != "ios":
        raise ValueError(f"match={match!r} is not supported; choose one of {list(MATCHES)}")
    corners_min = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    corners_max = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    intersection = (corners_max - corners_min).clamp(min=0).prod(-1)
    area = box_area(boxes)
    return intersection / torch.minimum(area[:, None], area[None, :]).clamp(min=torch.finfo(boxes.dtype).tiny)


def _pasted_masks(parts, keepers: Tensor, keeper_of: Optional[Tensor], image_size: Tuple[int, int]) -> Tensor:
    """The kept detections' masks in the image's pixels: each tile's mask pasted where its tile lies; with
    ``keeper_of`` (NMM), a kept detection's is the maximum of those merged into it."""
    where = [(p, x0, y0, row) for p, x0, y0 in parts for row in range(len(p["boxes"]))]  # detection -> its tile
    masks = parts[0][0]["masks"].new_zeros((len(keepers), 1, *image_size))
    slot = {keeper: k for k, keeper in enumerate(keepers.tolist())}
    indices = range(len(where)) if keeper_of is not None else keepers.tolist()
    for index in indices:
        k = slot.get(int(keeper_of[index]) if keeper_of is not None else index)
        if k is None:
            continue
        part, x0, y0, row = where[index]
        mask = part["masks"][row]
        region = masks[k, :, y0:y0 + mask.shape[-2], x0:x0 + mask.shape[-1]]
        torch.maximum(region, mask, out=region)
    return masks
