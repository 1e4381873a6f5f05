r"""The learnable bank and its cooperative-adversarial update (caco.md §2 and §4).

For one view with unit queries :math:`x_n`, positives :math:`y_n` and cosine logits
:math:`l_{nk} = x_n \cdot \hat W_k`, let :math:`p_{nk} = \mathrm{softmax}_k(l_{nk}/\tau_m)` and
:math:`c_{nk} = p_{nk} - 1` if :math:`k = y_n` else :math:`-p_{nk}` (constants). The bank
gradient is the gradient w.r.t. the raw W of

.. math::  S(W) = \frac{1}{N}\sum_n\sum_k c_{nk}\, l_{nk}(W) / \tau_m

through the column normalisation. With :math:`\tilde P = -C`, the closed form is

.. math::  G = -\big[X^\top \tilde P / N - \hat W \odot \mathrm{mean}_n(\tilde P \odot L)\big]
           / (\lVert W \rVert \tau_m)

column-wise. Then ``V <- mem_momentum * V + G`` and ``W <- W - memory_lr * V``: descent on
each query's positive column (it moves towards the query), ascent on the others (negatives
also move towards the query, becoming harder). No weight decay, no re-normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-12


class MemoryBank(nn.Module):
    """``W`` (dim x K, unnormalised) and its momentum ``V``, updated by hand (no optimizer)."""

    W: torch.Tensor
    V: torch.Tensor

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"bank needs positive dim and size, got dim={dim}, size={size}")
        w = torch.randn(dim, size)
        self.register_buffer("W", w / w.norm(dim=0, keepdim=True))
        self.register_buffer("V", torch.zeros(dim, size))

    @property
    def size(self) -> int:
        return self.W.shape[1]

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_hat, norms)`` in float32: unit columns and their original norms (1 x K)."""
        w = self.W.float()
        norms = w.norm(dim=0, keepdim=True).clamp_min(_EPS)
        return w / norms, norms

    @torch.no_grad()
    def apply_gradient(self, grad: torch.Tensor, memory_lr: float, momentum: float) -> None:
        """``V <- momentum V + G``; ``W <- W - memory_lr V``."""
        self.V.mul_(momentum).add_(grad.to(self.V.dtype))
        self.W.sub_(self.V, alpha=memory_lr)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        self.V.zero_()


def view_bank_gradient(
    queries: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    w_hat: torch.Tensor,
    norms: torch.Tensor,
    mem_t: float,
) -> torch.Tensor:
    """Closed-form dS/dW for one (query view, positive labels) pair.

    ``queries`` (N x dim, unit rows) and ``logits`` (N x K, ``queries @ w_hat``) are detached
    float32 tensors from before the optimizer step; the result has W's shape (dim x K).
    """
    n = queries.shape[0]
    p_tilde = torch.softmax(logits / mem_t, dim=1)
    pos = labels.view(-1, 1)
    p_tilde.scatter_(1, pos, 1.0 - p_tilde.gather(1, pos))
    mean_pl = (p_tilde * logits).mean(dim=0, keepdim=True)
    grad = queries.t() @ p_tilde
    grad.div_(n).sub_(w_hat * mean_pl)
    return grad.div_(norms).mul_(-1.0 / mem_t)


def bank_logits(queries: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Cosine logits ``q W_hat`` in float32, outside any autocast region (caco.md §3.3)."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return queries.float() @ w_hat


@torch.no_grad()
def positive_labels(keys: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """``argmax_k key . W_hat_k`` for every key (caco.md §3.4)."""
    return bank_logits(keys, w_hat).argmax(dim=1)
