"""View-images per second delivered by the FFCV loader vs the torchvision loader.

Both read the same generated JPEG set (an ImageFolder and its .beton) and deliver what the
trainer receives from them: every view decoded, random-resized-cropped and flipped, uint8 on
the host, the same batch size and number of workers. Each loader runs a warm-up epoch; the
timed epoch counts from its first batch to its end. FFCV's one-off compile (its warm-up
epoch's wait for the first batch) is reported on its own. The shared device-side colour
stage is timed separately (on the CPU, and on the GPU when there is one), not in the ratio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class DataloaderBenchConfig:
    output_root: str = "./outputs"
    source_size: int = 128          # generated JPEGs are source_size x source_size
    train_per_class: int = 500      # x 10 classes
    image_size: int = 64            # both views
    batch_size: int = 64
    num_workers: int = 2
    rounds: int = 3                 # torch, ffcv, torch, ffcv, ...: the median round's ratio
    jpeg_quality: int = 90
    colour_batches: int = 20
    seed: int = 0


def _data_config(cfg: DataloaderBenchConfig, loader: str):
    tag = f"{cfg.source_size}px_{cfg.train_per_class}"
    return OmegaConf.create({
        "name": "bench", "kind": "imagefolder",
        "root": f"{cfg.output_root}/data/generated_{tag}",
        "train_dir": "train", "val_dir": "val",
        "generate": {"train_per_class": cfg.train_per_class, "val_per_class": 1,
                     "size": cfg.source_size, "seed": cfg.seed},
        "train_subset": None, "loader": loader, "num_workers": cfg.num_workers,
        "image_size": cfg.image_size, "eval_resize": cfg.image_size,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "augment": "two_view", "crop_scale": [0.2, 1.0], "blur": True,
        "ffcv": {"dir": f"{cfg.output_root}/ffcv/bench_{tag}_q{cfg.jpeg_quality}",
                 "max_resolution": cfg.source_size, "jpeg_quality": cfg.jpeg_quality,
                 "write_mode": "jpg", "compress_probability": 1.0,
                 "num_workers": cfg.num_workers, "subset_per_class": None, "strict": False,
                 "overwrite": False, "os_cache": True, "batches_ahead": 3},
    })


def _epoch(loader, epoch: int) -> tuple[float, int, float]:
    """(seconds from the first batch to the end, view-images after the first batch,
    seconds to the first batch)."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    first = None
    images = 0
    for views, _ in loader:
        if first is None:
            first = time.perf_counter()
            continue
        images += sum(v.shape[0] for v in views)
    end = time.perf_counter()
    return end - first, images, first - t0


def _colour_cost(cfg: DataloaderBenchConfig, device: torch.device) -> float:
    """Milliseconds per two-view batch for the device-side colour stage."""
    from caco.data.pretrain import build_device_augment

    augment = build_device_augment(_data_config(cfg, "torch"))
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    g = torch.Generator().manual_seed(cfg.seed)
    views = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
             for _ in range(2)]
    augment(views, 0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(cfg.colour_batches):
        augment(views, i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / cfg.colour_batches * 1000


def run(cfg: DataloaderBenchConfig) -> dict:
    from caco.data.beton import convert_split, options_from_config
    from caco.data.ffcv_loader import FFCVPretrainLoader, require_ffcv
    from caco.data.pretrain import TorchPretrainLoader, view_augs
    from caco.data.sources import ensure_generated

    require_ffcv()
    data_torch, data_ffcv = _data_config(cfg, "torch"), _data_config(cfg, "ffcv")
    ensure_generated(data_torch)
    convert_split(data_ffcv, "train", options_from_config(data_ffcv.ffcv))
    views = view_augs(data_torch)

    torch_loader = TorchPretrainLoader(data_torch, views, cfg.batch_size, seed=cfg.seed)
    t0 = time.perf_counter()
    ffcv_loader = FFCVPretrainLoader(data_ffcv, views, cfg.batch_size, seed=cfg.seed)
    build_s = time.perf_counter() - t0
    n = torch_loader.steps_per_epoch * cfg.batch_size
    log.info("%d images of %d px -> two %d px views, batch %d, %d workers", n,
             cfg.source_size, cfg.image_size, cfg.batch_size, cfg.num_workers)

    _, _, torch_first = _epoch(torch_loader, 0)
    _, _, ffcv_first = _epoch(ffcv_loader, 0)
    compile_s = build_s + ffcv_first
    log.info("warm-up epochs done; FFCV compile %.1f s", compile_s)
    rates: dict[str, list[float]] = {"torch": [], "ffcv": []}
    for r in range(cfg.rounds):
        for name, loader in (("torch", torch_loader), ("ffcv", ffcv_loader)):
            seconds, images, _ = _epoch(loader, r + 1)
            rates[name].append(images / seconds)
            log.info("round %d %s: %.0f view-images/s", r + 1, name, rates[name][-1])
    # Each round's two epochs ran back to back under the same machine load: the ratio per
    # round, then the median over rounds.
    ratios = sorted(f / t for f, t in zip(rates["ffcv"], rates["torch"]))
    best = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}

    colour_cpu = _colour_cost(cfg, torch.device("cpu"))
    result = {
        "ffcv_images_per_s": round(best["ffcv"], 1),
        "torch_images_per_s": round(best["torch"], 1),
        "ratio": round(ratios[len(ratios) // 2], 3),
        "ratios": [round(x, 3) for x in ratios],
        "ffcv_compile_s": round(compile_s, 1),
        "torch_first_batch_s": round(torch_first, 2),
        "colour_stage_cpu_ms_per_batch": round(colour_cpu, 1),
        "images": n, "views": 2, "image_size": cfg.image_size, "source_size": cfg.source_size,
        "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
    }
    if torch.cuda.is_available():
        result["colour_stage_gpu_ms_per_batch"] = round(_colour_cost(cfg, torch.device("cuda")),
                                                        2)
    return result
