"""Pretraining and evaluation loaders on the torchvision path (``data.loader=torch``).

Exact resume needs the same batches with the same augmentations after a restart, so:
- the order comes from :class:`EpochShardSampler`, a pure function of (seed, epoch, rank)
  that can also start part-way through an epoch;
- each sample's views come from :class:`SeededViews`, which seeds torch's RNG from
  (seed, epoch, index) around the augmentation, whatever worker process runs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from caco.augment import MultiViewAugment, caco_multi_crop, caco_two_views
from caco.data.sources import labelled_split
from caco.errors import ConfigError, DataError

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

    def __getitem__(self, i: int):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            views = self.augment(img)
        return views, label


class EpochShardSampler(Sampler[int]):
    """This rank's disjoint share of a per-epoch permutation, whole batches only (drop_last).

    The permutation is ``randperm(n)`` seeded by (seed, epoch); rank r takes every
    ``world``-th index starting at r of the first ``steps * batch * world`` entries.
    ``start_step`` skips the batches already trained when resuming mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size * world > n:
            raise DataError(
                f"the dataset has {n} images, fewer than one global batch "
                f"({batch_size} x {world} ranks); lower batch_size or use more data"
            )
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
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
        mine = used[self.rank :: self.world]
        return iter(mine[self.start_step * self.batch_size :].tolist())


def build_augment(data: DictConfig) -> MultiViewAugment:
    mean, std = tuple(data.mean), tuple(data.std)
    if data.augment == "two_view":
        views = caco_two_views(size=data.image_size, scale=tuple(data.crop_scale),
                               blur=bool(data.get("blur", True)))
    elif data.augment == "multi_crop":
        mc = data.multi_crop
        views = caco_multi_crop(global_size=data.image_size, local_size=mc.local_size,
                                n_local=mc.n_local, global_scale=tuple(mc.global_scale),
                                local_scale=tuple(mc.local_scale))
    else:
        raise ConfigError(f"data.augment={data.augment!r}: use 'two_view' or 'multi_crop'")
    return MultiViewAugment(views, mean, std)


def _collate_views(batch):
    views = [torch.stack([sample[0][v] for sample in batch]) for v in range(len(batch[0][0]))]
    labels = torch.tensor([sample[1] for sample in batch])
    return views, labels


def build_pretrain_loader(
    data: DictConfig, per_rank_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, SeededViews, EpochShardSampler]:
    """The two-view / multi-crop training loader; call ``set_epoch`` on dataset and sampler."""
    if data.get("loader", "torch") != "torch":
        raise ConfigError(
            f"data.loader={data.loader!r} is not available yet on this path; use data.loader=torch"
        )
    base = labelled_split(data, "train", subset=data.get("train_subset"))
    dataset = SeededViews(base, build_augment(data), seed)
    sampler = EpochShardSampler(len(dataset), per_rank_batch, rank=rank, world=world, seed=seed)
    workers = int(data.num_workers)
    loader = DataLoader(
        dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
        collate_fn=_collate_views, pin_memory=pin_memory, drop_last=True,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
    )
    return loader, dataset, sampler


def eval_transform(data: DictConfig):
    """Resize + center crop + normalise: the evaluation view (kNN, linear probe)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(data.eval_resize)), T.CenterCrop(int(data.image_size)), T.ToTensor(),
        T.Normalize(tuple(data.mean), tuple(data.std)),
    ])


def build_eval_loader(data: DictConfig, split: str, batch_size: int,
                      subset: int | None = None) -> DataLoader:
    ds = labelled_split(data, split, transform=eval_transform(data), subset=subset)
    if len(ds) == 0:
        raise DataError(f"the {split} split of data.kind={data.kind} is empty")
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=int(data.num_workers))



def linear_train_loader(data: DictConfig, batch_size: int, subset: int | None = None
                        ) -> DataLoader:
    """RandomResizedCrop + flip + normalise: the linear probe's training view."""
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(int(data.image_size)), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(tuple(data.mean), tuple(data.std)),
    ])
    ds = labelled_split(data, "train", transform=transform, subset=subset)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=False,
                      num_workers=int(data.num_workers))
