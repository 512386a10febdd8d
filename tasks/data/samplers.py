"""Rare classes seen more often: repeat-factor sampling (LVIS, Gupta et al. 2019) for detection, inverse class
frequency for classification, both as per-image repeat factors drawn by one sampler."""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ResumableSampler


def lvis_repeat_factors(image_labels: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """``r(I)`` of every image: ``r(c) = max(1, sqrt(t / f(c)))``, ``f(c)`` the fraction of images holding class
    ``c``, ``r(I)`` the largest ``r(c)`` of the classes in image ``I`` (1 for an image without objects), as LVIS's
    paper and detectron2's ``repeat_factors_from_category_frequency``."""
    if not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"data.repeat_threshold={threshold!r} must be a positive fraction of the images (LVIS: "
                         "0.001)")
    classes = [np.unique(labels) for labels in image_labels]
    counts = np.bincount(np.concatenate(classes).astype(np.int64), minlength=1) if classes else np.zeros(1)
    frequency = counts / max(len(image_labels), 1)
    with np.errstate(divide="ignore"):
        per_class = np.maximum(1.0, np.sqrt(threshold / frequency))
    return np.asarray([per_class[c].max() if len(c) else 1.0 for c in classes], dtype=np.float64)


def balanced_repeat_factors(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Per image ``N / (K n(c))``: every class drawn ``N / K`` times an epoch in expectation (inverse-frequency
    sampling), the epoch as long as the data set (``N`` images, ``K`` classes with images, ``n(c)`` of class ``c``)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    present = int((counts > 0).sum())
    return len(labels) / (present * counts[labels].astype(np.float64))


class RepeatFactorSampler(ResumableSampler):
    """Each epoch, every image ``floor(r) + Bernoulli(frac(r))`` times, the coins tossed from ``seed + epoch`` (as
    detectron2's ``RepeatFactorTrainingSampler`` rounds, reseeded each epoch), shuffled.

    Lightning needs a fixed epoch length, which detectron2's endless stream has not: an epoch is the expected
    number of samples, ``sum r(I)``, rounded down to a multiple of the processes; a draw longer than that is cut, a
    shorter one is topped up from its own start. Process ``k`` of ``W`` takes every ``W``-th sample from position
    ``k``: together they see the epoch's samples exactly once (no padding). Resumes mid-epoch as
    :class:`~tasks.data.base.ResumableSampler` does; repeats of an image within an epoch are augmented differently.
    """

    def __init__(self, dataset: Dataset, seed: int, repeat_factors: np.ndarray) -> None:
        super().__init__(dataset, seed)
        self.repeat_factors = np.asarray(repeat_factors, dtype=np.float64)
        if len(self.repeat_factors) != len(dataset):
            raise ValueError(f"{len(self.repeat_factors)} repeat factors for {len(dataset)} images")
        self.num_samples = int(self.repeat_factors.sum() + 1e-9) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas
        if self.num_samples == 0:
            raise ValueError(f"repeat factors summing to {self.repeat_factors.sum():.1f} leave no sample for each of "
                             f"{self.num_replicas} processes")

    def epoch_draw(self) -> List[int]:
        """The whole epoch's samples (every process's), in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        whole = np.floor(self.repeat_factors)
        coins = torch.rand(len(whole), generator=generator, dtype=torch.float64).numpy()
        copies = (whole + (coins < self.repeat_factors - whole)).astype(np.int64)
        drawn = torch.from_numpy(np.repeat(np.arange(len(whole)), copies))
        drawn = drawn[torch.randperm(len(drawn), generator=generator)].tolist()
        repeats = math.ceil(self.total_size / max(len(drawn), 1))
        return (drawn * repeats)[: self.total_size]

    def epoch_indices(self) -> List[int]:
        return self.epoch_draw()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples
