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


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of a turn, per sample) in HSV space, as
    torchvision's ``adjust_hue``. Back to RGB by the sector-free form ``c_n = v - v*s*
    clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6`` for n = 5, 3, 1: a few whole-tensor
    ops instead of a gather per pixel."""
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(maxc == 0, 1.0, maxc)
    rc, gc, bc = ((maxc - x) / torch.where(flat, 1.0, delta)).unbind(1)
    r, g, _ = x.unbind(1)
    v = maxc[:, 0]
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat[:, 0], 0.0, (h / 6.0) % 1.0)
    h6 = ((h + shift.view(-1, 1, 1)) % 1.0).mul_(6.0).unsqueeze(1)
    # n = 5, 3, 1 made on the device (a copy from host memory would wait)
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (h6 + n).remainder_(6.0)
    k = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return maxc - maxc * s * k


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
_HUE = _JITTER_OPS.index(adjust_hue)


def blend_round(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One jitter round of the blends, each sample its own: ``op`` 0 brightness, 1 contrast,
    2 saturation, anything else none, with factor ``f``. All three are ``a*x + b*mean(gray)
    + c*gray``; unused terms get coefficient 0, so a sample gets bit for bit what its op alone
    computes, and the batch pays for one op instead of three."""
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    a = _per_sample(torch.where((op >= 0) & (op < _HUE), f, one))
    b = _per_sample(torch.where(op == 1, 1 - f, zero))
    c = _per_sample(torch.where(op == 2, 1 - f, zero))
    g = gray(x)
    plane = c * g  # (b*mean + c*g): one plane, and exact, as one of b, c is 0 in every sample
    plane += b * g.mean(dim=(1, 2, 3), keepdim=True)
    y = a * x
    y += plane
    return y.clamp_(0, 1)


def color_jitter(x: torch.Tensor, selected: torch.Tensor, order: torch.Tensor,
                 factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` per sample (``order``: a permutation of the four ops per
    sample, ``factors``: their factors), for the ``selected`` samples, branch-free.

    Hue, the one costly op, runs once on the whole batch: the blends a sample does before its
    hue run first (rounds 0-2, as far as its hue's position), then hue, then its blends after
    it (rounds 1-3)."""
    fac = factors.gather(1, order)  # each round's factor
    op = torch.where(selected.view(-1, 1), order, -1)
    hue_at = (order == _HUE).to(torch.int64).argmax(dim=1)
    for r in range(3):
        x = blend_round(x, torch.where(hue_at > r, op[:, r], -1), fac[:, r])
    x = torch.where(_per_sample(selected), adjust_hue(x, factors[:, _HUE]), x)
    for r in range(1, 4):
        x = blend_round(x, torch.where(hue_at < r, op[:, r], -1), fac[:, r])
    return x


class ViewColorAugment:
    """The device stage of one view: uint8 (B, 3, H, W) -> normalised float (B, 3, H, W)."""

    def __init__(self, aug: ViewAug, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.aug = aug
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.blur_radius = math.ceil(3 * aug.blur_sigma[1])
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._run = self._stage

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
        op's identity (coefficient 1 and 0s for the blends, a delta kernel for the blur) or
        keeps its pixels through ``torch.where`` (hue, grayscale, solarize).
        Nothing depends on the data's values, so nothing waits for the device and the stage
        can be compiled; a selected sample gets exactly what the op computes for it alone."""
        return self._colour(x, _on(params, x.device))

    def _colour(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        a = self.aug
        if a.jitter_p > 0:
            x = color_jitter(x, params["jitter"], params["order"], params["factors"])
        if a.gray_p > 0:
            x = torch.where(_per_sample(params["gray"]), gray(x).expand(-1, 3, -1, -1), x)
        if a.blur_p > 0:
            x = gaussian_blur(x, params["sigma"], self.blur_radius, params["blur"])
        if a.solarize_p > 0:
            flip = _per_sample(params["solarize"]) & (x >= a.solarize_threshold / 255.0)
            x = torch.where(flip, 1.0 - x, x)
        return x

    def _stage(self, views: torch.Tensor, params: dict[str, torch.Tensor], mean: torch.Tensor,
               std: torch.Tensor) -> torch.Tensor:
        """uint8 views -> normalised floats, on the views' device (what :meth:`compile`
        compiles)."""
        return (self._colour(views.float().div_(255.0), params) - mean) / std

    def compile(self) -> None:
        """Run the stage as one compiled graph (``compile=true``): no graph break (it has no
        data-dependent branch or shape), one graph per view size."""
        self._run = torch.compile(self._stage, fullgraph=True, dynamic=False)

    def __call__(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) views, got {views.dtype} "
                             f"{tuple(views.shape)}")
        params = _on(self.sample_params(views.shape[0], generator), views.device)
        if views.device not in self._norm:  # once per device (a copy from pageable memory waits)
            self._norm[views.device] = (self.mean.to(views.device), self.std.to(views.device))
        return self._run(views, params, *self._norm[views.device])


def _on(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The parameters (drawn on the CPU) on ``device``, without waiting for it: asynchronous
    copies from pinned memory on CUDA."""
    if device.type == "cuda":
        params = {k: v.pin_memory() for k, v in params.items()}
    return {k: v.to(device, non_blocking=True) for k, v in params.items()}


class DeviceAugment:
    """All views of a batch: list of uint8 (B, 3, H_v, W_v) -> list of normalised floats."""

    def __init__(self, views: Sequence[ViewAug], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        stages: dict[ViewAug, ViewColorAugment] = {}  # views alike share one (one graph)
        self.views = [stages.setdefault(v, ViewColorAugment(v, mean, std)) for v in views]

    def compile(self) -> None:
        """Compile each distinct view's stage (``compile=true``; see ViewColorAugment)."""
        for stage in {id(v): v for v in self.views}.values():
            stage.compile()

    def __call__(self, batch: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
        if len(batch) != len(self.views):
            raise ValueError(f"got {len(batch)} views, the augmentation defines "
                             f"{len(self.views)}")
        generator = torch.Generator().manual_seed(seed)
        return [aug(v, generator) for aug, v in zip(self.views, batch)]
