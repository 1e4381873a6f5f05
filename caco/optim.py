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
    """``foreach`` (default on) updates all of a group's tensors with multi-tensor kernels:
    a few launches per step instead of several per parameter, and no host sync (the trust
    ratio is chosen with ``torch.where`` on the device). ``foreach=False`` is the per-tensor
    loop, equal bit for bit on CPU."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        foreach: bool = True,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                f"momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum,
            trust_coefficient=trust_coefficient, foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            update = self._foreach_update if group.get("foreach", True) else self._loop_update
            update(group, params)
        return loss

    def _loop_update(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            update = p.grad
            if p.ndim > 1:
                update = update.add(p, alpha=group["weight_decay"])
                update = update.mul(_trust_ratio(torch.linalg.vector_norm(p),
                                                 torch.linalg.vector_norm(update),
                                                 group["trust_coefficient"]))
            mu = self.state[p]["mu"]
            mu.mul_(group["momentum"]).add_(update)
            p.add_(mu, alpha=-group["lr"])

    def _foreach_update(self, group: dict, params: list[torch.Tensor]) -> None:
        matrices = [p for p in params if p.ndim > 1]
        updates = {}
        if matrices:
            scaled = torch._foreach_add([p.grad for p in matrices], matrices,
                                        alpha=group["weight_decay"])
            ratios = _trust_ratio(torch.stack(torch._foreach_norm(matrices)),
                                  torch.stack(torch._foreach_norm(scaled)),
                                  group["trust_coefficient"])
            torch._foreach_mul_(scaled, list(ratios.unbind(0)))
            updates = {id(p): u for p, u in zip(matrices, scaled)}
        mus = [self.state[p]["mu"] for p in params]
        torch._foreach_mul_(mus, group["momentum"])
        torch._foreach_add_(mus, [updates.get(id(p), p.grad) for p in params])
        torch._foreach_add_(params, mus, alpha=-group["lr"])


def _trust_ratio(p_norm: torch.Tensor, u_norm: torch.Tensor, coefficient: float
                 ) -> torch.Tensor:
    """``coefficient ||p|| / ||u||``, 1 where either norm is 0 (elementwise over norms)."""
    return torch.where((p_norm > 0) & (u_norm > 0), coefficient * p_norm / u_norm,
                       torch.ones_like(p_norm))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
