"""The FFCV path (``data.loader=ffcv``): .beton files -> uint8 views, labels.

One FFCV ``Loader`` produces every view of a sample: the stored ``image`` field feeds one
pipeline per view (random-resized-crop in the decoder at that view's size and scale, then
flip), so decoding, cropping and flipping run in FFCV's compiled workers. Colour, blur,
solarize and normalisation are the device stage (:mod:`caco.device_augment`), shared with the
torchvision path.

The sample order is :class:`caco.data.sampling.EpochShardSampler`'s, the same as on the
torchvision path: a disjoint shard per rank, reshuffled per epoch from (seed, epoch),
whole batches only, and able to start part-way through an epoch. FFCV's crops draw from its
own unseeded RNG, so a resumed FFCV run sees the same samples in the same order but not the
same crops (the torchvision path is bit-exact).

FFCV compiles every new ``Loader`` (tens of seconds on 2 cores) and its batches live in
buffers it reuses: :func:`_cached_loader` keeps compiled loaders for the life of the process
(a second trainer or test asking for the same pipeline reuses it), and every batch handed out
here is a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from caco.augment import ViewAug
from caco.data.beton import beton_path
from caco.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "data.loader=ffcv needs the ffcv extra: bash launch/setup.sh --ffcv (installs "
    "pkg-config libopencv-dev libturbojpeg0-dev with apt, then pip install -e '.[ffcv]'); "
    "or use data.loader=torch")

_LOADERS: dict[tuple, object] = {}


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} ({e})") from None


def existing_beton(data: DictConfig, split: str) -> Path:
    path = beton_path(data, split)
    if not path.exists():
        raise DataError(
            f"{path} does not exist: convert the data first with python launch/prepare_data.py "
            f"data={data.get('name')} (same data.* overrides), or use data.loader=torch")
    return path


def _make_order(sampler):
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        """FFCV traversal order that asks an EpochShardSampler (FFCV's epoch count ignored)."""

        def __init__(self, sampler) -> None:  # no loader yet: bound in __call__
            self.sampler = sampler

        def __call__(self, loader):  # ffcv 1.0.2 calls an order *instance* with the loader
            self.loader, self.indices = loader, loader.indices
            self.seed, self.distributed = loader.seed, loader.distributed
            return self

        def sample_order(self, epoch: int) -> Sequence[int]:
            positions = np.fromiter(iter(self.sampler), dtype=np.int64)
            return np.asarray(self.indices)[positions]  # positions in the subset -> sample ids

    return ShardOrder(sampler)


def _to_device(device: str | None) -> list:
    """FFCV's own asynchronous copy from its pinned buffers (CUDA only; none on CPU)."""
    if device is None or not device.startswith("cuda"):
        return []
    from ffcv.transforms import ToDevice

    return [ToDevice(torch.device(device), non_blocking=True)]


def _view_pipeline(view: ViewAug, device: str | None = None):
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    return [RandomResizedCropRGBImageDecoder((view.size, view.size), scale=tuple(view.scale)),
            RandomHorizontalFlip(flip_prob=view.flip_p), ToTensor(), *_to_device(device),
            ToTorchImage()]


def _label_pipeline(device: str | None = None):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)]


def _cached_loader(key: tuple, build):
    loader = _LOADERS.get(key)
    if loader is None:
        loader = _LOADERS[key] = build()
    return loader


def _loader(path: Path, batch_size: int, workers: int, pipelines: dict, *, order,
            drop_last: bool, indices=None, ffcv_cfg=None, seed: int = 0):
    from ffcv.loader import Loader

    ffcv_cfg = ffcv_cfg or {}
    threads = torch.get_num_threads()
    try:
        return Loader(str(path), batch_size=batch_size, num_workers=max(1, workers),
                      order=order, drop_last=drop_last, pipelines=pipelines, indices=indices,
                      os_cache=bool(ffcv_cfg.get("os_cache", True)), seed=seed,
                      batches_ahead=int(ffcv_cfg.get("batches_ahead", 3)))
    except (OSError, ValueError, AssertionError) as e:
        raise DataError(f"cannot open {path} as an FFCV dataset ({type(e).__name__}: {e}); "
                        "re-create it with launch/prepare_data.py") from None
    finally:
        # Loader sets torch's intra-op threads to its worker count for the whole process.
        torch.set_num_threads(threads)


class FFCVPretrainLoader:
    """Iterates ``(views, labels)``: uint8 (B, 3, S_v, S_v) per view, int64 labels, copies
    (FFCV reuses its buffers). With a CUDA ``device`` they are already there: FFCV copies
    from pinned memory on its own streams, the copies are cloned on the device."""

    def __init__(self, data: DictConfig, views: Sequence[ViewAug], per_rank_batch: int, *,
                 rank: int = 0, world: int = 1, seed: int = 0,
                 device: str | None = None) -> None:
        from caco.data.sampling import EpochShardSampler

        require_ffcv()
        path = existing_beton(data, "train")
        self.views = list(views)
        n = _num_samples(path)
        indices = _subset(n, data.get("train_subset"))
        self.sampler = EpochShardSampler(n if indices is None else len(indices), per_rank_batch,
                                         rank=rank, world=world, seed=seed)
        self._indices = indices
        key = ("pretrain", str(path), path.stat().st_mtime_ns, tuple(self.views),
               per_rank_batch, int(data.num_workers), None if indices is None else len(indices),
               _config_key(data.get("ffcv")), device if _to_device(device) else None)

        def build():
            from ffcv.pipeline import PipelineSpec

            pipelines = {"image": _view_pipeline(self.views[0], device),
                         "label": _label_pipeline(device)}
            for v, view in enumerate(self.views[1:], start=1):
                pipeline = _view_pipeline(view, device)
                pipelines[f"image_{v}"] = PipelineSpec("image", decoder=pipeline[0],
                                                       transforms=pipeline[1:])
            return _loader(path, per_rank_batch, int(data.num_workers), pipelines,
                           order=_make_order(self.sampler), drop_last=True, indices=indices,
                           ffcv_cfg=data.get("ffcv"), seed=seed)

        self.loader = _cached_loader(key, build)
        self._bind()

    def _bind(self) -> None:
        # A cached Loader may have served another sampler (rank, world, seed); FFCV sizes its
        # epochs from the order it saw first, so show it this one's full epoch.
        self.loader.traversal_order.sampler = self.sampler
        epoch, start = self.sampler.epoch, self.sampler.start_step
        self.sampler.set_epoch(epoch, 0)
        self.loader.first_traversal_order = self.loader.next_traversal_order()
        self.sampler.set_epoch(epoch, start)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.sampler.start_step

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._bind()
        for batch in self.loader:
            image, label, *more = batch
            yield [image.clone(), *(m.clone() for m in more)], label.clone()


class FFCVEvalLoader:
    """Resize + center crop (or the linear probe's random crop + flip), normalised floats."""

    def __init__(self, data: DictConfig, split: str, batch_size: int, *,
                 subset: int | None = None, train_augment: bool = False, seed: int = 0,
                 shard: tuple[int, int] | None = None) -> None:
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        require_ffcv()
        path = existing_beton(data, split)
        size = int(data.image_size)
        n = _num_samples(path)
        if n == 0:
            raise DataError(f"{path} holds no samples (the {split} split is empty)")
        indices = _subset(n, subset)
        if shard is not None and shard[1] > 1:  # this rank's share: every world-th sample
            indices = (np.arange(n) if indices is None else indices)[shard[0]::shard[1]]
        if train_augment:
            image = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
        else:
            image = [CenterCropRGBImageDecoder((size, size),
                                               ratio=size / float(data.eval_resize))]
        image += [ToTensor(), ToTorchImage()]
        order = OrderOption.RANDOM if train_augment else OrderOption.SEQUENTIAL
        key = ("eval", str(path), path.stat().st_mtime_ns, size, float(data.eval_resize),
               batch_size, int(data.num_workers), subset, train_augment, seed,
               shard if shard is not None and shard[1] > 1 else None)
        self.loader = _cached_loader(key, lambda: _loader(
            path, batch_size, int(data.num_workers), {"image": image, "label": _label_pipeline()},
            order=order, drop_last=False, indices=indices, ffcv_cfg=data.get("ffcv"), seed=seed))
        self.mean = torch.tensor(tuple(data.mean)).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(tuple(data.std)).view(1, 3, 1, 1) * 255
        self.num_samples = n if indices is None else len(indices)
        self.dataset = range(self.num_samples)  # len(loader.dataset), as on the torch path

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for image, label in self.loader:
            x = (image.float() - self.mean) / self.std
            yield x.contiguous(), label.clone()


def _config_key(cfg) -> str:
    if cfg is None:
        return ""
    from omegaconf import OmegaConf

    return repr(sorted(OmegaConf.to_container(cfg, resolve=True).items()))


def _num_samples(path: Path) -> int:
    from ffcv.reader import Reader

    try:
        return int(Reader(str(path)).num_samples)
    except Exception as e:  # the reader raises bare assertion/struct errors on bad files
        raise DataError(f"cannot read {path} as an FFCV dataset ({type(e).__name__}: {e}); "
                        "re-create it with launch/prepare_data.py") from None


def _subset(n: int, subset: int | None):
    from caco.data.sampling import subset_indices

    idx = subset_indices(n, subset)
    return None if idx is None else idx.astype(np.int64)
