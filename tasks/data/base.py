"""What every data module here shares: loaders that resume exactly mid-epoch, skip corrupt images on request,
and evaluate without padding."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from .images import CorruptImageError
from .labels import LabelMap

log = logging.getLogger("tasks")


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def eval_sampler(dataset: Dataset) -> Optional[Sampler]:
    """Under DDP, split evaluation data without padding, so no image is counted twice in the metrics
    (Lightning's default sampler repeats samples to even out the processes)."""
    if _world()[0] > 1:
        return UnrepeatedDistributedSampler(dataset, shuffle=False)
    return None


class ResumableSampler(DistributedSampler):
    """The training order of :class:`~torch.utils.data.DistributedSampler` (a permutation drawn from ``seed +
    epoch``, split across the processes), yielding ``(index, sample_seed)`` keys for :class:`Samples`, and able to
    start its epoch ``resume_at = (epoch, samples already seen by this process)``: a resumed run sees exactly the
    samples, in the order and with the augmentations, that the interrupted run would have seen."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        world, rank = _world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.resume_at: Optional[tuple] = None  # set by ResumableLoader.load_state_dict

    def epoch_indices(self) -> List[int]:
        """This process's dataset indices for the current epoch, in order (a subclass draws them otherwise:
        :class:`~tasks.data.samplers.RepeatFactorSampler`)."""
        return list(super().__iter__())

    def __iter__(self):
        start = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == self.epoch else 0
        indices, copies, seen = self.epoch_indices(), [], {}
        for index in indices:  # the copy number: repeats of an image in one epoch are augmented differently
            copies.append(seen.get(index, 0))
            seen[index] = copies[-1] + 1
        for index, copy in zip(indices[start:], copies[start:], strict=True):
            key = index + copy * len(self.dataset)
            yield index, ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + key) % 2**63


class Samples(Dataset):
    """``dataset`` as the loaders here read it. A key ``(index, seed)`` (from :class:`ResumableSampler`) seeds the
    torch RNG while that sample is loaded and augmented, so its augmentation depends on the run's seed, the epoch
    and the index, not on which worker loads it or whether the run was resumed. With ``skip_corrupt``, a sample
    whose image cannot be decoded is ``None`` (left out of its batch by :class:`SkipNone`) and counted."""

    def __init__(self, dataset: Dataset, skip_corrupt: bool = False,
                 skip_reason: str = "data.skip_corrupt_images") -> None:
        self.dataset, self.skip_corrupt, self.skip_reason = dataset, skip_corrupt, skip_reason
        self._skipped = multiprocessing.Value("l", 0)  # shared with the loader's worker processes

    @property
    def skipped(self) -> int:
        """Samples skipped so far as corrupt, by all worker processes together."""
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            if seed is None:
                return self.dataset[index]
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: transforms run on the CPU
                torch.default_generator.manual_seed(seed)  # (torch.manual_seed would also queue CUDA seeding)
                return self.dataset[index]
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise CorruptImageError(f"{e}. Replace or remove the file, or set data.skip_corrupt_images: true "
                                        "to skip such images") from None
            with self._skipped.get_lock():
                self._skipped.value += 1
                count = self._skipped.value
            log.warning("%s; skipped (%s), %d so far", e, self.skip_reason, count)
            return None


class SkipNone:
    """A collate function that leaves out skipped (``None``) samples; a batch of nothing but those is ``None``."""

    def __init__(self, collate: Optional[Callable] = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, batch: List) -> Any:
        batch = [sample for sample in batch if sample is not None]
        return self.collate(batch) if batch else None


class ResumableLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` whose position Lightning keeps in the checkpoint
    (``state_dict``), so that ``--ckpt_path last`` after a kill mid-epoch goes on with the very next batch.

    ``batches_done()`` tells how many batches of the current epoch training has finished: Lightning's count, since
    the loader itself has already been asked for batches ahead of that.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch,
                "samples_seen": self.batches_done() * self.batch_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # the epoch too: Lightning creates the first iterator of a resumed run before it sets the sampler's epoch
        self.sampler.seed, self.sampler.resume_at = state["seed"], (state["epoch"], state["samples_seen"])
        self.sampler.set_epoch(state["epoch"])


class BaseDataModule(LightningDataModule):
    """Loaders with sensible defaults: the training loader resumes mid-epoch (:class:`ResumableLoader`), evaluation
    loaders split without padding under DDP, and no loader draws from the global RNG (the model's)."""

    def __init__(self, batch_size: int, num_workers: int, skip_corrupt_images: bool = False) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size!r} must be a positive integer")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be a non-negative integer")
        self.batch_size, self.num_workers, self.skip_corrupt_images = batch_size, num_workers, skip_corrupt_images
        self.seed = torch.initial_seed() % 2**31  # set by seed_everything before the CLI builds this module
        self._samples: List[Samples] = []
        self.label_map: Optional[LabelMap] = None  # set by each data module from its labelled data

    @property
    def categories(self) -> Optional[Dict[int, str]]:
        """``{category id: name}`` of the labelled data (an image folder's class index is its id; ``None`` without
        labelled data): the model is told these (``lightning`` links them, unless the checkpoint of an unlabeled
        ``predict`` decides)."""
        return None if self.label_map is None else self.label_map.categories

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.label_map is None else len(self.label_map)

    def loader(self, dataset: Dataset, *, train: bool, collate_fn: Optional[Callable] = None,
               drop_last: bool = False, skip_corrupt: bool = False) -> DataLoader:
        """A loader over ``dataset``; ``skip_corrupt`` skips unreadable images whatever ``skip_corrupt_images`` says
        (``predict`` reports them and goes on)."""
        samples = Samples(dataset, self.skip_corrupt_images or skip_corrupt,
                          "data.skip_corrupt_images" if self.skip_corrupt_images else "predict goes on without it")
        self._samples.append(samples)
        # the loader's own generator: creating its iterators leaves the global RNG (the model's) untouched
        kwargs = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=SkipNone(collate_fn),
                      drop_last=drop_last, generator=torch.Generator().manual_seed(self.seed),
                      pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)
        if train:
            return ResumableLoader(samples, sampler=self.training_sampler(dataset),
                                   batches_done=self._batches_done, **kwargs)
        return DataLoader(samples, sampler=eval_sampler(dataset), **kwargs)

    def training_sampler(self, dataset: Dataset) -> ResumableSampler:
        """The training order: every image once an epoch, shuffled (a data module that samples rare classes more
        often gives a :class:`~tasks.data.samplers.RepeatFactorSampler`)."""
        return ResumableSampler(dataset, self.seed)

    def _batches_done(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0

    @property
    def skipped_images(self) -> int:
        """Images skipped as corrupt (``skip_corrupt_images``) by every loader of this module so far."""
        return sum(samples.skipped for samples in self._samples)

    def teardown(self, stage: str) -> None:
        if self.skipped_images:
            log.warning("skipped %d unreadable images in all", self.skipped_images)
