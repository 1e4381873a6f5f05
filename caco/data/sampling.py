"""The order and the seeds of the samples, shared by the torchvision and FFCV paths.

- :class:`EpochShardSampler`: a rank's disjoint share of a per-epoch permutation, a pure
  function of (seed, epoch, rank), able to start part-way through an epoch (exact resume);
- :class:`SeededViews`: each sample's views seeded from (seed, epoch, index), whatever
  worker process makes them;
- :func:`subset_indices`: a fixed random subset, the same for every run and rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from caco.errors import DataError

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch."""
    x = (seed * 1_000_003 + epoch + 1) * _MIX + index
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


class SeededViews(Dataset):
    """``(views, label)`` where ``views = augment(image)`` is reproducible per (seed, epoch, i)."""

    def __init__(self, base: Dataset, augment, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        # (epoch, i) from an epoch-tagging sampler: persistent workers hold their own copy
        # of this dataset, which set_epoch in the main process does not reach.
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            views = self.augment(img)
        return views, label


class EpochShardSampler(Sampler[int]):
    """This rank's disjoint share of a per-epoch permutation, whole batches only (drop_last).

    The permutation is ``randperm(n)`` seeded by (seed, epoch); rank r takes every
    ``world``-th index starting at r of the first ``steps * batch * world`` entries.
    ``start_step`` skips the batches already trained when resuming mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, tag_epoch: bool = False) -> None:
        if batch_size * world > n:
            raise DataError(
                f"the dataset has {n} images, fewer than one global batch "
                f"({batch_size} x {world} ranks); lower batch_size or use more data"
            )
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.tag_epoch = seed, shuffle, tag_epoch
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 1)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        used = order[: self.steps_per_epoch * self.batch_size * self.world]
        mine = used[self.rank :: self.world][self.start_step * self.batch_size :].tolist()
        if self.tag_epoch:  # ``(epoch, index)`` for SeededViews
            return iter([(self.epoch, i) for i in mine])
        return iter(mine)


def subset_indices(n: int, subset: int | None, seed: int = 0) -> np.ndarray | None:
    """A fixed random subset (same for every run and rank), or None for all ``n``."""
    if not subset or subset >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[:subset])
