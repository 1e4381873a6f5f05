"""kNN at ImageNet scale: an ImageNet-sized bank of train features (1.28M x 256) against the
50k validation queries, timed, with the peak memory it takes beyond its inputs.

The features are random unit vectors with class structure (a class mean plus noise), so the
vote has something to find; what is measured is time and memory. ``caco.knn.knn_classify``
keeps one normalised copy of the bank resident and streams the queries, so the extra memory
stays about one bank plus (test chunk x train chunk) similarity blocks, whatever the number
of queries: the result reports it as ``peak_extra_over_bank``.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import torch

from caco.knn import knn_classify

log = logging.getLogger(__name__)


@dataclass
class KnnBenchConfig:
    train_size: int = 1_281_167
    queries: int = 50_000
    dim: int = 256
    classes: int = 1000
    k: int = 20
    temperature: float = 0.07
    test_chunk: int = 256
    train_chunk: int = 65536
    feature_dtype: str = "fp32"
    device: str = "cpu"
    threads: int = 0
    seed: int = 0


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _features(n: int, means: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    labels = torch.randint(0, len(means), (n,), generator=g)
    feats = torch.empty(n, means.shape[1])
    for start in range(0, n, 65536):  # in blocks: no full-size temporaries
        part = labels[start:start + 65536]
        feats[start:start + 65536] = means[part] + torch.randn(len(part), means.shape[1],
                                                                generator=g)
    return feats, labels


def run(cfg: KnnBenchConfig) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    means = torch.randn(cfg.classes, cfg.dim, generator=g) * 0.1
    train_f, train_y = _features(cfg.train_size, means, g)
    test_f, test_y = _features(cfg.queries, means, g)
    device = torch.device(cfg.device)
    bank_gb = train_f.numel() * 4 / 2**30
    base = _rss_gb()
    log.info("bank %d x %d (%.2f GB), %d queries, %d threads on %s", cfg.train_size, cfg.dim,
             bank_gb, cfg.queries, torch.get_num_threads(), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = knn_classify(train_f, train_y, test_f, test_y, k=cfg.k,
                          temperature=cfg.temperature, num_classes=cfg.classes,
                          test_chunk=cfg.test_chunk, train_chunk=cfg.train_chunk,
                          device=device, feature_dtype=cfg.feature_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    extra = max(0.0, _peak_rss_gb() - base)
    out = {
        "bench": "knn", "device": str(device), "threads": torch.get_num_threads(),
        "train_size": cfg.train_size, "queries": cfg.queries, "dim": cfg.dim, "k": cfg.k,
        "feature_dtype": cfg.feature_dtype, "seconds": round(seconds, 2),
        "queries_per_s": round(cfg.queries / seconds, 1), "top1": round(result["top1"], 2),
        "bank_gb": round(bank_gb, 3), "peak_extra_gb": round(extra, 3),
        "peak_extra_over_bank": round(extra / bank_gb, 3),
    }
    if device.type == "cuda":
        out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out
