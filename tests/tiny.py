"""Tiny but real torchvision ResNets, so the unit tests run in seconds on CPU."""

from __future__ import annotations

import torch

from caco.model import CaCo

TINY = dict(arch="resnet18", dim=16, mlp_dim=32, small_stem=True, width=8, blocks=(1, 1, 1, 1))


def tiny_caco(bank_size: int = 64, seed: int = 0, **overrides) -> CaCo:
    torch.manual_seed(seed)
    return CaCo(**{**TINY, "bank_size": bank_size, **overrides})


def bank_surrogate(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mem_t: float):
    """S(W) of caco.md §4 with the coefficients c_nk held constant (for autograd checks)."""
    w_hat = w / w.norm(dim=0, keepdim=True)
    logits = x @ w_hat
    p = torch.softmax(logits.detach() / mem_t, dim=1)
    c = -p
    rows = torch.arange(len(y))
    c[rows, y] = p[rows, y] - 1
    return (c * logits).sum() / len(y) / mem_t
