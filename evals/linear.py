"""Linear probe: the reference protocol (caco.md §10) and a fast variant on cached features.

Reference: frozen backbone with BN in eval mode, one Linear layer (weights N(0, 0.01), bias 0),
SGD momentum 0.9 wrapped by LARC (trust 0.001, on weight and bias), lr 0.025 x batch / 256,
cosine per epoch, 100 epochs, weight decay 0; train RandomResizedCrop + flip, val
Resize + CenterCrop; top-1 and top-5.

Fast variant (``protocol: cached``): the same classifier and optimiser trained on features
extracted ONCE from center crops (no augmentation), so a frequent checkpoint costs two
feature passes; its numbers are reported under their own name (``linear_cached``) because
they are not the reference protocol's.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)


class LARC(torch.optim.Optimizer):
    """Layer-wise adaptive rate control around an optimizer (no clipping, as the reference):
    each parameter's gradient (plus ``weight_decay * p``) is scaled by
    ``trust * ||p|| / (||g|| + weight_decay ||p|| + eps)`` before the inner step."""

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001,
                 eps: float = 1e-8) -> None:
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        decays = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0.0)
            decays.append(wd)
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(p.grad)
                if p_norm > 0 and g_norm > 0:
                    rate = self.trust_coefficient * p_norm / (g_norm + wd * p_norm + self.eps)
                    p.grad.add_(p, alpha=wd).mul_(rate)
            group["weight_decay"] = 0.0  # folded into the gradient above
        loss = self.optim.step(closure)
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd
        return loss


def make_classifier(feature_dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def make_optimizer(head: nn.Module, batch_size: int, lr: float = 0.025,
                   trust_coefficient: float = 0.001) -> LARC:
    sgd = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9,
                          weight_decay=0.0)
    return LARC(sgd, trust_coefficient=trust_coefficient)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def train_on_cached_features(
    train_features: torch.Tensor, train_labels: torch.Tensor,
    test_features: torch.Tensor, test_labels: torch.Tensor, *,
    num_classes: int, epochs: int = 100, batch_size: int = 256, lr: float = 0.025,
    seed: int = 0, device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The fast variant: the reference classifier/optimiser/schedule on fixed features."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("linear probe needs non-empty train and test splits")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device(device)
    head = make_classifier(train_features.shape[1], num_classes).to(device)
    opt = make_optimizer(head, batch_size, lr)
    base = opt.param_groups[0]["lr"]
    x, y = train_features.to(device), train_labels.long().to(device)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(base, epoch, epochs)
        order = torch.randperm(len(x), generator=g).to(device)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return _evaluate_head(head, [(test_features.to(device), test_labels.to(device))])


@torch.no_grad()
def _evaluate_head(head: nn.Module, batches: Iterable) -> dict[str, float]:
    c1 = c5 = n = 0
    for feats, labels in batches:
        a1, a5 = accuracy(head(feats), labels.long())
        c1, c5, n = c1 + a1, c5 + a5, n + len(labels)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def frozen_features(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device
                    ) -> torch.Tensor:
    """The frozen backbone's float32 features; on CUDA under bf16 autocast with channels_last
    inputs (the head trains in fp32)."""
    images = images.to(device, non_blocking=True)
    if device.type != "cuda":
        return backbone(images)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return backbone(images).float()


def train_reference_protocol(
    backbone: nn.Module, feature_dim: int, train_loader: Iterable, test_loader: Iterable, *,
    num_classes: int, epochs: int = 100, batch_size: int = 256, lr: float = 0.025,
    device: torch.device | str = "cpu", progress: bool = False,
) -> dict[str, float]:
    """Augmented images through the frozen backbone (BN in eval mode) every epoch.

    Under torch.distributed (one process per GPU) the classifier is DDP-wrapped, each rank
    trains on its shard of ``train_loader`` (a DistributedSampler, reshuffled per epoch) and
    tests its slice of ``test_loader``; the counts are summed over ranks. ``batch_size`` is
    the global batch (the lr scales with it).
    """
    import torch.distributed as dist

    rank, world = _world()
    device = torch.device(device)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)  # the same initial classifier on every rank
    head = make_classifier(feature_dim, num_classes).to(device)
    opt = make_optimizer(head, batch_size, lr)
    model: nn.Module = head
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(head, device_ids=[device] if device.type == "cuda" else None)
    base = opt.param_groups[0]["lr"]
    epochs_iter: Iterable[int] = range(epochs)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc="linear probe")
    sampler = getattr(train_loader, "sampler", None)
    for epoch in epochs_iter:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(base, epoch, epochs)
        for images, labels in train_loader:
            feats = frozen_features(backbone, images, device)
            loss = F.cross_entropy(model(feats), labels.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def test_batches():
        with torch.no_grad():
            for i, (images, labels) in enumerate(test_loader):
                if i % world == rank:  # this rank's slice of the test set
                    yield frozen_features(backbone, images, device), labels.to(device)

    if world == 1:
        return _evaluate_head(head, test_batches())
    c1 = c5 = n = 0
    with torch.no_grad():
        for feats, labels in test_batches():
            a1, a5 = accuracy(head(feats), labels.long())
            c1, c5, n = c1 + a1, c5 + a5, n + len(labels)
    counts = torch.tensor([c1, c5, n], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def evaluate(checkpoint: str | os.PathLike, cfg: DictConfig) -> dict[str, float]:
    """Linear probe of a checkpoint's backbone (``eval.linear.protocol``: reference|cached)."""
    from caco.data.pretrain import build_eval_loader, linear_train_loader
    from caco.knn import extract_features
    from evals.common import prepare

    lin = cfg.eval.linear
    e = prepare(checkpoint, cfg)
    device, backbone, data = e.device, e.backbone, e.data
    test = build_eval_loader(data, "val", lin.batch_size, lin.test_subset)
    classes = int(lin.num_classes) if lin.get("num_classes") else None
    if lin.protocol == "cached":
        train = build_eval_loader(data, "train", lin.batch_size, lin.train_subset)
        train_f, train_y = extract_features(backbone, train, device=device, desc="train")
        test_f, test_y = extract_features(backbone, test, device=device, desc="test")
        n = classes or int(max(train_y.max(), test_y.max())) + 1
        r = train_on_cached_features(train_f, train_y, test_f, test_y, num_classes=n,
                                     epochs=lin.epochs, batch_size=lin.batch_size, lr=lin.lr,
                                     device=device)
        name = "linear_cached"
    elif lin.protocol == "reference":
        rank, world = _world()
        train = linear_train_loader(data, max(1, int(lin.batch_size) // world),
                                    lin.train_subset, rank=rank, world=world)
        n = classes or len(train.dataset.classes)
        r = train_reference_protocol(backbone, e.model.feature_dim, train, test, num_classes=n,
                                     epochs=lin.epochs, batch_size=lin.batch_size, lr=lin.lr,
                                     device=device)
        name = "linear"
    else:
        from caco.errors import ConfigError

        raise ConfigError(f"eval.linear.protocol={lin.protocol!r}: use reference or cached")
    return {f"{name}_top1": r["top1"], f"{name}_top5": r["top5"], "epoch": e.info["epoch"]}
