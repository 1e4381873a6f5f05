"""Pretraining and evaluation loaders; ``data.loader`` picks torchvision (``torch``) or FFCV.

The loader factories of both paths live here (the FFCV classes, in
:mod:`caco.data.ffcv_loader`, are imported only when asked for); the sample order and the
per-sample seeds in :mod:`caco.data.sampling`. Both pretraining loaders yield
``(views, labels)`` with each view uint8 (B, 3, S, S), cropped and flipped (the host stage);
the trainer applies the colour stage on its device (:class:`caco.device_augment.DeviceAugment`).
Both take the order from :class:`EpochShardSampler`. Evaluation loaders yield normalised
float images.

Exact resume on the torchvision path needs the same batches with the same augmentations after
a restart, so:
- the order comes from :class:`EpochShardSampler`, a pure function of (seed, epoch, rank)
  that can also start part-way through an epoch;
- each sample's views come from :class:`SeededViews`, which seeds torch's RNG from
  (seed, epoch, index) around the augmentation, whatever worker process runs it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from caco.augment import GeometricViews, ViewAug, caco_multi_crop, caco_two_views
from caco.data.sampling import EpochShardSampler, SeededViews, sample_seed
from caco.data.sources import labelled_split
from caco.errors import ConfigError, DataError

__all__ = ["EpochShardSampler", "SeededViews", "build_eval_loader", "build_pretrain_loader",
           "sample_seed", "view_augs"]

LOADERS = ("torch", "ffcv")


def view_augs(data: DictConfig) -> list[ViewAug]:
    """The views ``data.augment`` defines (two_view or multi_crop), shared by both loaders."""
    if data.augment == "two_view":
        return caco_two_views(size=data.image_size, scale=tuple(data.crop_scale),
                              blur=bool(data.get("blur", True)))
    if data.augment == "multi_crop":
        mc = data.multi_crop
        return caco_multi_crop(global_size=data.image_size, local_size=mc.local_size,
                               n_local=mc.n_local, global_scale=tuple(mc.global_scale),
                               local_scale=tuple(mc.local_scale))
    raise ConfigError(f"data.augment={data.augment!r}: use 'two_view' or 'multi_crop'")


def build_device_augment(data: DictConfig):
    """The colour stage for ``data``'s views, run by the trainer on its device."""
    from caco.device_augment import DeviceAugment

    return DeviceAugment(view_augs(data), tuple(data.mean), tuple(data.std))


def loader_kind(data: DictConfig) -> str:
    kind = str(data.get("loader", "torch"))
    if kind not in LOADERS:
        raise ConfigError(f"data.loader={kind!r}: use one of {list(LOADERS)}")
    return kind


def _collate_views(batch):
    views = [torch.stack([sample[0][v] for sample in batch]) for v in range(len(batch[0][0]))]
    labels = torch.tensor([sample[1] for sample in batch])
    return views, labels


class TorchPretrainLoader:
    """Iterates ``(views, labels)`` from a torchvision dataset through a DataLoader."""

    def __init__(self, data: DictConfig, views: list[ViewAug], per_rank_batch: int, *,
                 rank: int = 0, world: int = 1, seed: int = 0, pin_memory: bool = False
                 ) -> None:
        base = labelled_split(data, "train", subset=data.get("train_subset"))
        self.views = views
        self.dataset = SeededViews(base, GeometricViews(views), seed)
        workers = int(data.num_workers)
        # Workers live for the whole run (no re-spawn per epoch): the sampler hands them
        # the epoch with every index.
        self.sampler = EpochShardSampler(len(self.dataset), per_rank_batch, rank=rank,
                                         world=world, seed=seed, tag_epoch=True)
        self.loader = DataLoader(
            self.dataset, batch_size=per_rank_batch, sampler=self.sampler,
            num_workers=workers, collate_fn=_collate_views, pin_memory=pin_memory,
            drop_last=True, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def build_pretrain_loader(
    data: DictConfig, per_rank_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
    pin_memory: bool = False, device: str | None = None,
):
    """The two-view / multi-crop training loader of ``data.loader``; call ``set_epoch``."""
    views = view_augs(data)
    if loader_kind(data) == "ffcv":
        from caco.data.ffcv_loader import FFCVPretrainLoader

        return FFCVPretrainLoader(data, views, per_rank_batch, rank=rank, world=world,
                                  seed=seed, device=device)
    return TorchPretrainLoader(data, views, per_rank_batch, rank=rank, world=world, seed=seed,
                               pin_memory=pin_memory)


def eval_transform(data: DictConfig):
    """Resize + center crop + normalise: the evaluation view (kNN, linear probe)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(data.eval_resize)), T.CenterCrop(int(data.image_size)), T.ToTensor(),
        T.Normalize(tuple(data.mean), tuple(data.std)),
    ])


def build_eval_loader(data: DictConfig, split: str, batch_size: int,
                      subset: int | None = None, shard: tuple[int, int] | None = None):
    """Resize + center crop + normalise, in order: kNN and linear-probe evaluation.
    ``shard=(rank, world)``: this rank's share (every world-th sample)."""
    if loader_kind(data) == "ffcv":
        from caco.data.ffcv_loader import FFCVEvalLoader

        return FFCVEvalLoader(data, split, batch_size, subset=subset, shard=shard)
    ds = labelled_split(data, split, transform=eval_transform(data), subset=subset)
    if len(ds) == 0:
        raise DataError(f"the {split} split of data.kind={data.kind} is empty")
    if shard is not None and shard[1] > 1:
        from torch.utils.data import Subset

        ds = Subset(ds, range(shard[0], len(ds), shard[1]))
    workers = int(data.num_workers)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0)


def linear_train_loader(data: DictConfig, batch_size: int, subset: int | None = None,
                        seed: int = 0, rank: int = 0, world: int = 1):
    """RandomResizedCrop + flip + normalise: the linear probe's training view; with
    ``world`` > 1 this rank's shard (``sampler.set_epoch`` reshuffles)."""
    if loader_kind(data) == "ffcv":
        if world > 1:
            raise ConfigError("the distributed linear probe reads images with data.loader=torch;"
                              " set it on the linear node (dag.nodes.linear.data.loader=torch)")
        from caco.data.ffcv_loader import FFCVEvalLoader

        return FFCVEvalLoader(data, "train", batch_size, subset=subset, train_augment=True,
                              seed=seed)
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(int(data.image_size)), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(tuple(data.mean), tuple(data.std)),
    ])
    ds = labelled_split(data, "train", transform=transform, subset=subset)
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=False,
                          num_workers=int(data.num_workers))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=False,
                      num_workers=int(data.num_workers))
