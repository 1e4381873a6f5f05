"""LARS as the reference uses it (caco.md §5).

For a parameter p with gradient g and more than one dimension:
``u = g + wd p``; trust ratio ``t = trust_coefficient ||p|| / ||u||`` (1 if either norm is 0);
``mu <- momentum mu + t u``; ``p <- p - lr mu``. One-dimensional parameters (BN weights and
biases) get neither weight decay nor trust scaling: plain momentum SGD.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                f"momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where(
                        (p_norm > 0) & (u_norm > 0),
                        group["trust_coefficient"] * p_norm / u_norm,
                        torch.ones_like(p_norm),
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
