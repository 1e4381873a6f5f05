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
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN vote."""
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
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    top5_k = min(5, num_classes)
    correct1 = correct5 = 0
    for start in range(0, len(test), test_chunk):
        queries = test[start : start + test_chunk].to(device)
        best_sim = torch.full((len(queries), 0), -2.0, device=device)
        best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
        for t0 in range(0, len(train), train_chunk):
            block = train[t0 : t0 + train_chunk].to(device)
            sim = queries @ block.t()
            kk = min(k, sim.shape[1])
            s, i = sim.topk(kk, dim=1)
            merged_sim = torch.cat([best_sim, s], dim=1)
            merged_idx = torch.cat([best_idx, i + t0], dim=1)
            keep = min(k, merged_sim.shape[1])
            best_sim, order = merged_sim.topk(keep, dim=1)
            best_idx = merged_idx.gather(1, order)
        neighbour_labels = train_labels.to(device)[best_idx]
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, neighbour_labels, (best_sim / temperature).exp())
        predictions = votes.topk(top5_k, dim=1).indices
        truth = test_labels[start : start + test_chunk].to(device).view(-1, 1)
        hits = predictions == truth
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    n = len(test)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` (images -> pooled features) in eval mode over ``(images, labels)``
    batches; returns float32 CPU ``(features, labels)``. The module's train/eval mode is
    restored afterwards."""
    device = torch.device(device)
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


def knn_loaders(data, knn) -> tuple[Iterable, Iterable]:
    """The kNN memory (train split) and query (val split) loaders, eval transform."""
    from caco.data.pretrain import build_eval_loader

    return (build_eval_loader(data, "train", knn.batch_size, knn.train_subset),
            build_eval_loader(data, "val", knn.batch_size, knn.test_subset))


def knn_accuracy(backbone: nn.Module, train_loader: Iterable, test_loader: Iterable, *,
                 k: int, temperature: float, device: torch.device | str = "cpu",
                 **extract_options) -> dict[str, float]:
    """Features of both splits through ``backbone``, then :func:`knn_classify`."""
    train_f, train_y = extract_features(backbone, train_loader, device=device,
                                        desc="kNN train", **extract_options)
    test_f, test_y = extract_features(backbone, test_loader, device=device, desc="kNN test",
                                      **extract_options)
    return knn_classify(train_f, train_y, test_f, test_y, k=k, temperature=temperature,
                        device=device)
