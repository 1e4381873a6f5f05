"""The device stage of CaCo's augmentations: colour ops per sample, batched, on any device.

Both loaders (torchvision and FFCV) deliver uint8 views that are already cropped and flipped;
this stage applies what :class:`caco.augment.ViewAug` says about colour, each sample with its
own random parameters, then normalises:

- colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue
  factors drawn like torchvision's ``ColorJitter``, in a random order per sample;
- grayscale with probability ``gray_p`` (torchvision's luma, replicated to 3 channels);
- Gaussian blur with probability ``blur_p``, sigma ~ U[blur_sigma] per sample, a separable
  kernel of radius ceil(3 x max sigma) with reflect padding (torchvision's tensor blur);
- solarize with probability ``solarize_p`` (pixels >= threshold inverted).

Every random number comes from one CPU ``torch.Generator`` seeded by the caller, drawn in a
fixed order and moved to the device, so a batch's augmentation is the same on CPU and GPU and
after a resume (see :func:`batch_seed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from caco.augment import IMAGENET_MEAN, IMAGENET_STD, ViewAug

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_MASK64 = (1 << 64) - 1


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A well-mixed seed for one rank's batch ``step`` of ``epoch`` (negative epochs: bank init)."""
    x = (seed * 1_000_003 + epoch * 7_919 + 104_729) & _MASK64
    for v in (step, rank):
        x = ((x ^ (v & _MASK64)) * 0x9E3779B97F4A7C15) & _MASK64
        x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f)
    return (f * x + (1 - f) * gray(x)).clamp_(0, 1)


# (r, g, b) of each of the six hue sectors, as indices into (v, q, p, t).
_HUE_SECTORS = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]])


_SECTORS_ON: dict[torch.device, torch.Tensor] = {}


def _sectors_on(device: torch.device) -> torch.Tensor:
    """The sector table on ``device``, copied once (a copy from pageable memory waits)."""
    if device not in _SECTORS_ON:
        _SECTORS_ON[device] = _HUE_SECTORS.to(device)
    return _SECTORS_ON[device]


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of a turn, per sample) in HSV space."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc,
                    torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), (h / 6.0) % 1.0)
    h = (h + shift.view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    frac = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp_(0, 1)
    q = (v * (1 - s * frac)).clamp_(0, 1)
    t = (v * (1 - s * (1 - frac))).clamp_(0, 1)
    # Sector i takes its (r, g, b) from (v, q, p, t) as _HUE_SECTORS[i] says: one gather
    # instead of a select per sector.
    planes = torch.stack((v, q, p, t), dim=1)
    index = _sectors_on(x.device)[i].permute(0, 3, 1, 2)
    return planes.gather(1, index)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int,
                  selected: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding; samples not
    ``selected`` get a delta kernel (their pixels come back unchanged)."""
    b, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    if selected is not None:
        delta = (taps == 0).to(x.dtype).expand_as(kernel)
        kernel = torch.where(selected.view(-1, 1), kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class ViewColorAugment:
    """The device stage of one view: uint8 (B, 3, H, W) -> normalised float (B, 3, H, W)."""

    def __init__(self, aug: ViewAug, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.aug = aug
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.blur_radius = math.ceil(3 * aug.blur_sigma[1])
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random choice for ``n`` samples, drawn on the CPU in a fixed order."""
        a = self.aug

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        b, c, s, h = a.jitter
        return {
            "jitter": coin(a.jitter_p),
            "order": torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
            "factors": torch.stack([uniform(max(0.0, 1 - b), 1 + b),
                                    uniform(max(0.0, 1 - c), 1 + c),
                                    uniform(max(0.0, 1 - s), 1 + s),
                                    uniform(-h, h)], dim=1),
            "gray": coin(a.gray_p),
            "blur": coin(a.blur_p),
            "sigma": uniform(*a.blur_sigma),
            "solarize": coin(a.solarize_p),
        }

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Colour ops with given ``params`` on float images in [0, 1]; returns new memory.

        Branch-free: every op runs on the whole batch, a sample it does not select gets the
        op's identity (factor 1 for brightness, contrast and saturation, a delta kernel for
        the blur) or keeps its pixels through ``torch.where`` (hue, grayscale, solarize).
        Nothing depends on the data's values, so nothing waits for the device and the stage
        can be compiled; a selected sample gets exactly what the op computes for it alone."""
        if x.device.type == "cuda":  # asynchronous only from pinned memory
            params = {k: v.pin_memory() for k, v in params.items()}
        params = {k: v.to(x.device, non_blocking=True) for k, v in params.items()}
        a = self.aug
        if a.jitter_p > 0:
            for r in range(4):
                op_now = torch.where(params["jitter"], params["order"][:, r], -1)
                for op_index, op in enumerate(_JITTER_OPS):
                    sel = op_now == op_index
                    f = params["factors"][:, op_index]
                    if op is adjust_hue:
                        x = torch.where(_per_sample(sel), op(x, f), x)
                    else:
                        x = op(x, torch.where(sel, f, torch.ones_like(f)))
        if a.gray_p > 0:
            x = torch.where(_per_sample(params["gray"]), gray(x).expand(-1, 3, -1, -1), x)
        if a.blur_p > 0:
            x = gaussian_blur(x, params["sigma"], self.blur_radius, params["blur"])
        if a.solarize_p > 0:
            flip = _per_sample(params["solarize"]) & (x >= a.solarize_threshold / 255.0)
            x = torch.where(flip, 1.0 - x, x)
        return x

    def __call__(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) views, got {views.dtype} "
                             f"{tuple(views.shape)}")
        params = self.sample_params(views.shape[0], generator)
        x = self.apply(views.float().div_(255.0), params)
        if x.device not in self._norm:  # made once per device (a copy from pageable memory waits)
            self._norm[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._norm[x.device]
        return (x - mean) / std


class DeviceAugment:
    """All views of a batch: list of uint8 (B, 3, H_v, W_v) -> list of normalised floats."""

    def __init__(self, views: Sequence[ViewAug], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.views = [ViewColorAugment(v, mean, std) for v in views]

    def __call__(self, batch: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
        if len(batch) != len(self.views):
            raise ValueError(f"got {len(batch)} views, the augmentation defines "
                             f"{len(self.views)}")
        generator = torch.Generator().manual_seed(seed)
        return [aug(v, generator) for aug, v in zip(self.views, batch)]
