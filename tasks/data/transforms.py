"""Augmentations chosen in the config (lists of ``torchvision.transforms.v2`` transforms), and the steps the project
adds after them so that what reaches the model is always valid."""

from __future__ import annotations

import multiprocessing
from typing import Callable, List, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

BOX_FIELDS = ("labels", "iscrowd", "area")  # per-box tensors of a detection target, kept in step with its boxes


def per_box_fields(inputs) -> tuple:
    """``SanitizeBoundingBoxes``' labels getter: every per-box tensor of the target, so that dropping a box drops its
    label, crowd flag and area with it."""
    target = inputs[1]
    return tuple(target[key] for key in BOX_FIELDS if key in target)


def clean_boxes() -> List[v2.Transform]:
    """The project's step after any detection augmentation: boxes back in XYXY, clamped to the image, and those
    left with a side under 1 pixel (or not finite) dropped with their labels."""
    return [v2.ConvertBoundingBoxFormat("XYXY"), v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=per_box_fields)]


class DropEmptyMasks:
    """The step after :func:`clean_boxes` where targets have instance ``masks``: an instance whose mask has no pixel
    left (a crop can keep part of a box but none of its shape) is dropped with its box, label, crowd flag and area,
    and counted in :attr:`dropped` (shared with the data-loader workers)."""

    def __init__(self) -> None:
        self._dropped = multiprocessing.Value("l", 0)

    @property
    def dropped(self) -> int:
        return self._dropped.value

    def __call__(self, image, target):
        masks = target.get("masks")
        if masks is None:
            return image, target
        keep = masks.flatten(1).bool().any(1)
        if bool(keep.all()):
            return image, target
        target = dict(target)
        for key in ("boxes", "masks", *BOX_FIELDS):
            if key in target:
                value = target[key]
                target[key] = tv_tensors.wrap(value[keep], like=value) if isinstance(value, tv_tensors.TVTensor) \
                    else value[keep]
        with self._dropped.get_lock():
            self._dropped.value += int((~keep).sum())
        return image, target


def detection_pipeline(transforms: Sequence[Callable], empty_masks: Optional[DropEmptyMasks] = None) -> v2.Compose:
    """``transforms`` (box-aware v2 transforms on a uint8 image and its target: masks move with the boxes), then
    :func:`clean_boxes`, then ``empty_masks`` (a :class:`DropEmptyMasks`, which counts what it drops)."""
    return v2.Compose([*transforms, *clean_boxes(), empty_masks or DropEmptyMasks()])


class RequireSize:
    """Fail naming the setting when a classification pipeline does not end in ``size`` x ``size`` images (which a
    batch needs), rather than with a stacking error somewhere in the loader."""

    def __init__(self, size: int, key: str) -> None:
        self.size, self.key = size, key

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"{self.key} gave an image of {image.shape[-2]}x{image.shape[-1]} pixels, but "
                             f"data.image_size is {self.size}: end the list with a transform that gives "
                             f"{self.size}x{self.size} (RandomResizedCrop({self.size}), or Resize and CenterCrop)")
        return image


def classification_pipeline(transforms: Sequence[Callable], image_size: int, key: str) -> v2.Compose:
    """``transforms`` on the uint8 image, then the project's steps: float in [0, 1], and the size check."""
    return v2.Compose([*transforms, v2.ToDtype(torch.float32, scale=True), RequireSize(image_size, key)])


def configured_or_default(transforms: Optional[Sequence[Callable]],
                          default: Callable[[], List[Callable]]) -> List[Callable]:
    """The transforms of the config, or (``None``) the data module's default list."""
    return default() if transforms is None else list(transforms)
