"""What every data module here shares: loaders with sensible defaults and an evaluation sampler without padding."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler


def eval_sampler(dataset: Dataset) -> Optional[Sampler]:
    """Under DDP, split evaluation data without padding, so no image is counted twice in the metrics
    (Lightning's default sampler repeats samples to even out the processes)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnrepeatedDistributedSampler(dataset, shuffle=False)
    return None


class BaseDataModule(LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size!r} must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be a non-negative integer")
        self.batch_size, self.num_workers = batch_size, num_workers

    def loader(self, dataset: Dataset, *, shuffle: bool, collate_fn: Optional[Callable] = None,
               sampler: Optional[Sampler] = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_fn, drop_last=drop_last,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)
