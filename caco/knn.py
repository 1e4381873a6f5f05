"""Weighted kNN classification on frozen features, and the feature extraction it shares.

The InstDisc/DINO protocol: L2-normalised features, cosine similarity, the k nearest training
samples vote for their class with weight ``exp(sim / temperature)``. Similarities are computed
in (test chunk x train chunk) blocks with a running top-k, so an ImageNet-sized memory
(1.28M x 2048) never materialises a full similarity matrix. The registered kNN evaluator
exposes this as an evaluation; the in-loop monitor uses it directly (``caco`` never imports
the evaluators).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 256,
    train_chunk: int = 65536,
    device: torch.device | str | None = None,
    feature_dtype: str = "fp32",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN vote.

    The normalised train features are put on ``device`` once and stay there (one copy, in
    ``feature_dtype``: ``fp16`` halves it, CUDA only); the queries stream through in chunks
    of ``test_chunk`` against blocks of ``train_chunk`` train rows (views of the resident
    copy); the counts are read back once at the end."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(
            f"kNN needs non-empty splits, got {len(train_features)} train and "
            f"{len(test_features)} test features"
        )
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("kNN features and labels differ in length")
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
    device = torch.device(device) if device is not None else train_features.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(feature_dtype)
    if dtype is None or (dtype == torch.float16 and device.type != "cuda"):
        raise ValueError(f"eval.knn.feature_dtype={feature_dtype!r}: use fp32, or fp16 on a "
                         f"CUDA device (this one is {device.type})")
    train = F.normalize(train_features.to(device, torch.float32), dim=1).to(dtype)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    top5_k = min(5, num_classes)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    for start in range(0, len(test_features), test_chunk):
        queries = F.normalize(test_features[start : start + test_chunk].to(device, torch.float32),
                              dim=1).to(dtype)
        best_sim = torch.full((len(queries), 0), -2.0, device=device)
        best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
        for t0 in range(0, len(train), train_chunk):
            sim = (queries @ train[t0 : t0 + train_chunk].t()).float()
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)
            merged_sim = torch.cat([best_sim, s], dim=1)
            merged_idx = torch.cat([best_idx, i + t0], dim=1)
            best_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
            best_idx = merged_idx.gather(1, order)
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, train_labels[best_idx], (best_sim / temperature).exp())
        predictions = votes.topk(top5_k, dim=1).indices
        truth = test_labels[start : start + test_chunk].to(device).view(-1, 1)
        hits = predictions == truth
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    correct1, correct5 = correct.tolist()
    n = len(test_features)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    channels_last: bool | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` (images -> pooled features) in eval mode over ``(images, labels)``
    batches; returns float32 CPU ``(features, labels)``. The module's train/eval mode is
    restored afterwards. By default (``None``/``"auto"``) a CUDA device gets channels_last
    inputs and bf16 autocast, a CPU neither."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if channels_last is None:
        channels_last = on_gpu
    if autocast_dtype == "auto":
        autocast_dtype = torch.bfloat16 if on_gpu else None
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=desc, leave=False)
    try:
        for images, targets in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    out = backbone(images)
            else:
                out = backbone(images)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("feature extraction got an empty loader (no images in the split)")
    return torch.cat(feats), torch.cat(labels)


def knn_loaders(data, knn, shard: tuple[int, int] | None = None) -> tuple[Iterable, Iterable]:
    """The kNN memory (train split) and query (val split) loaders, eval transform; with
    ``shard=(rank, world)`` this rank's share of each."""
    from caco.data.pretrain import build_eval_loader

    return (build_eval_loader(data, "train", knn.batch_size, knn.train_subset, shard),
            build_eval_loader(data, "val", knn.batch_size, knn.test_subset, shard))


def gather_features(features: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(features, labels)`` concatenated in rank order, on every rank (as is
    without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (features, labels))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def knn_accuracy(backbone: nn.Module, train_loader: Iterable, test_loader: Iterable, *,
                 k: int, temperature: float, device: torch.device | str = "cpu",
                 feature_dtype: str = "fp32", **extract_options) -> dict[str, float]:
    """Features of both splits through ``backbone``, then :func:`knn_classify`. Under a
    process group every rank extracts its loaders' share and all get the whole result."""
    train_f, train_y = gather_features(*extract_features(
        backbone, train_loader, device=device, desc="kNN train", **extract_options))
    test_f, test_y = gather_features(*extract_features(
        backbone, test_loader, device=device, desc="kNN test", **extract_options))
    return knn_classify(train_f, train_y, test_f, test_y, k=k, temperature=temperature,
                        device=device, feature_dtype=feature_dtype)
