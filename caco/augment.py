"""CaCo's asymmetric two-view and multi-crop augmentations (caco.md §6).

The parameters live in :class:`ViewAug` records. Training splits each view in two stages built
from the same record, whichever loader runs:

- the host stage, geometry only: decode, random-resized-crop, flip -> uint8 CHW
  (:class:`GeometricViews` per image on the torchvision path; FFCV's decoder pipeline on the
  FFCV path);
- the device stage, colour: jitter, grayscale, blur, solarize, normalise, per sample but
  batched, on the training device (:class:`caco.device_augment.DeviceAugment`).

:class:`MultiViewAugment` is the whole per-image torchvision pipeline of the reference
implementation; the tests hold the device stage to it. All host-side randomness comes from
torch's RNG, so seeding torch per sample makes a view reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewAug:
    """Everything that defines one view's augmentation."""

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # b, c, s, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    flip_p: float = 0.5


def caco_two_views(size: int = 224, scale: tuple[float, float] = (0.2, 1.0),
                   blur: bool = True) -> list[ViewAug]:
    """View 1: blur always; view 2: blur p 0.1 and solarize p 0.2 (the reference's asymmetry).

    ``blur=False`` drops the Gaussian blur, as small-image (32 px) recipes do: a sigma of up
    to 2 px, meant for 224 px crops, erases most of a 32 px image.
    """
    view1 = ViewAug(size=size, scale=tuple(scale), blur_p=1.0 if blur else 0.0, solarize_p=0.0)
    view2 = ViewAug(size=size, scale=tuple(scale), blur_p=0.1 if blur else 0.0, solarize_p=0.2)
    return [view1, view2]


def caco_multi_crop(
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 6,
    global_scale: tuple[float, float] = (0.14, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.14),
) -> list[ViewAug]:
    """2 global + ``n_local`` local crops; stronger saturation jitter, blur p 0.5, no solarize."""
    common = dict(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5, solarize_p=0.0)
    glob = ViewAug(size=global_size, scale=tuple(global_scale), **common)
    loc = ViewAug(size=local_size, scale=tuple(local_scale), **common)
    return [glob, glob] + [loc] * n_local


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U[lo, hi] (the reference's blur, not a fixed kernel)."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def build_view_transform(
    aug: ViewAug,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    geometric: bool = True,
):
    """The torchvision pipeline for one view: PIL image -> normalised float tensor.
    ``geometric=False``: its colour part alone (no crop, no flip), e.g. to time it."""
    from torchvision import transforms as T

    steps = [
        T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_p),
        T.RandomGrayscale(p=aug.gray_p),
    ]
    if aug.blur_p > 0:
        steps.append(T.RandomApply([RandomGaussianBlur(aug.blur_sigma)], p=aug.blur_p))
    if aug.solarize_p > 0:
        steps.append(T.RandomSolarize(aug.solarize_threshold, p=aug.solarize_p))
    if geometric:
        steps = [T.RandomResizedCrop(aug.size, scale=aug.scale), *steps,
                 T.RandomHorizontalFlip(p=aug.flip_p)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class _ViewPipelines:
    """PIL image -> one tensor per :class:`ViewAug`, each through its own pipeline."""

    def __init__(self, views: Sequence[ViewAug], build) -> None:
        if len(views) < 2:
            raise ValueError(f"CaCo needs at least two views, got {len(views)}")
        self.views = list(views)
        self.transforms = [build(v) for v in self.views]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.views)} views: {self.views})"


def _geometric_transform(aug: ViewAug):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(aug.size, scale=aug.scale),
                      T.RandomHorizontalFlip(p=aug.flip_p), T.PILToTensor()])


class GeometricViews(_ViewPipelines):
    """PIL image -> one uint8 CHW tensor per view: random-resized-crop + flip (the host stage)."""

    def __init__(self, views: Sequence[ViewAug]) -> None:
        super().__init__(views, _geometric_transform)


class MultiViewAugment(_ViewPipelines):
    """PIL image -> list of augmented views, one per :class:`ViewAug` (two-view or multi-crop)."""

    def __init__(
        self,
        views: Sequence[ViewAug],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(views, lambda v: build_view_transform(v, mean, std))
