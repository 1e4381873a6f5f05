"""The colour stage's cost: :class:`caco.device_augment.DeviceAugment` on a two-view batch against
the reference's per-image colour pipeline (torchvision's ``ColorJitter``, ``RandomGrayscale``,
PIL Gaussian blur and ``RandomSolarize`` on each PIL image, then ``ToTensor`` and
``Normalize``: what the reference's loader workers do after the crop).

Both get the same already-cropped colour images: generated scenes (real Fashion-MNIST items on
tinted backgrounds), or smooth random images where Fashion-MNIST is not installed (a bare GPU
machine; the branch-free stage costs the same whatever the pixels); rounds alternate after a
warm-up so machine load affects both alike. ``ratio`` is reference ms / stage ms for one two-
view batch (above 1: the batched stage costs less), and ``host_syncs_per_batch`` counts the
stage's host<->device synchronisations (0: nothing waits for the device).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class AugmentBenchConfig:
    image_size: int = 64
    batch_size: int = 64
    blur: bool = True
    rounds: int = 5
    threads: int = 0  # 0: keep torch's default
    device: str = "cpu"
    compile: bool = False  # also time the compiled stage (``compile=true``)
    seed: int = 0


def run(cfg: AugmentBenchConfig) -> dict:
    from PIL import Image

    from caco.augment import build_view_transform, caco_two_views
    from caco.device_augment import DeviceAugment
    from caco.host_sync import HostSyncCounter
    from caco.runtime import resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    views = caco_two_views(size=cfg.image_size, blur=cfg.blur)
    pixels, kind = _images(cfg.batch_size, cfg.image_size, cfg.seed)
    pil = [Image.fromarray(p) for p in pixels]
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    on_device = [batch.to(device) for _ in views]
    stage = DeviceAugment(views)
    reference = [build_view_transform(v, geometric=False) for v in views]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def device_stage(i: int) -> None:
        stage(on_device, i)
        sync()

    def per_image(i: int) -> None:
        torch.manual_seed(i)
        for t in reference:
            torch.stack([t(img) for img in pil])

    def timed(fn, i: int) -> float:
        t0 = time.perf_counter()
        fn(i)
        return (time.perf_counter() - t0) * 1000

    device_stage(-1), per_image(-1)  # warm-up
    stage_ms, reference_ms = [], []
    for i in range(cfg.rounds):
        stage_ms.append(timed(device_stage, i))
        reference_ms.append(timed(per_image, i))
        log.info("round %d: stage %.1f ms, reference %.1f ms", i, stage_ms[-1],
                 reference_ms[-1])
    with HostSyncCounter() as counter:
        stage(on_device, cfg.rounds)
    s, r = statistics.median(stage_ms), statistics.median(reference_ms)
    result = {"device": str(device), "images": kind, "image_size": cfg.image_size,
              "batch_size": cfg.batch_size, "blur": cfg.blur, "threads": torch.get_num_threads(),
              "stage_ms_per_batch": round(s, 2), "reference_ms_per_batch": round(r, 2),
              "ratio": round(r / s, 2), "host_syncs_per_batch": counter.total}
    if cfg.compile:
        compiled = DeviceAugment(views)
        compiled.compile()
        t0 = time.perf_counter()
        compiled(on_device, -1)
        sync()
        result["compile_s"] = round(time.perf_counter() - t0, 1)
        ms = statistics.median(timed(lambda i: (compiled(on_device, i), sync()), i)
                               for i in range(cfg.rounds))
        result["compiled_stage_ms_per_batch"] = round(ms, 2)
        result["compiled_speedup"] = round(s / ms, 2)
    return result


def _images(n: int, size: int, seed: int):
    """``(n, size, size, 3)`` uint8 colour images and what they are."""
    import numpy as np

    from caco.data.fashion_mnist import resolve_root
    from caco.data.generated import scenes

    try:
        resolve_root(download=False)
    except FileNotFoundError:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, max(1, size // 8), max(1, size // 8), generator=g)
        smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")
        return (smooth * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy(), "random"
    return np.ascontiguousarray(scenes(n, size, seed)), "fashion-mnist scenes"
