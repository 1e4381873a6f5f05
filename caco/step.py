"""One CaCo training step and the bank initialisation pass (caco.md §3, §7, §8).

Both take the model as the engine holds it: a plain :class:`caco.model.CaCo` or that model
wrapped in ``DistributedDataParallel``. All views go through ONE forward call of the (wrapped)
model, the only pattern DDP allows with a single backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from caco.bank import bank_logits, positive_labels, view_bank_gradient
from caco.model import CaCo

INIT_TEMPERATURE = 0.2
INIT_EMA_MOMENTUM = 0.999


@dataclass
class StepResult:
    """What one step reports, as tensors on the step's device (0-dim for scalars): reading
    them (``float(result.loss)``) waits for the device, so the trainer does it only on
    logging steps.

    ``loss`` is the back-propagated loss (detached). ``labels``: for two views ``[y1, y2]`` (y1, the
    targets of view 1's queries, chosen by view 2's key); for multi-crop one tensor per
    global key view j, ``argmax_k key_j . W_hat_k``. ``positive_prob`` is the mean softmax
    probability (at ``moco_t``) of the positive column over all pairs;
    ``positive_columns_frac`` the number of distinct positive columns per label tensor over
    its batch size (near 0 means the bank has collapsed onto few columns).
    """

    loss: torch.Tensor
    labels: list[torch.Tensor]
    positive_prob: torch.Tensor
    positive_columns_frac: torch.Tensor


def _no_mark(phase: str) -> None:
    pass


def unwrap(model: nn.Module) -> CaCo:
    """The CaCo module inside a DDP (or similar ``.module``) wrapper."""
    core = getattr(model, "module", model)
    if not isinstance(core, CaCo):
        raise TypeError(f"expected a CaCo model (or DDP-wrapped CaCo), got {type(core).__name__}")
    return core


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_pairs(num_views: int) -> list[tuple[int, int, float]]:
    """``(query view, key view, weight)`` for the loss and the bank gradient.

    Two views: (0, 1) and (1, 0), each weight 1 (a SUM of two cross-entropies, §3.5).
    Multi-crop (§7): the two (global, other global) pairs average to one term, and the
    2 x n_local (local, global) pairs average to another; the two terms are summed.
    """
    if num_views < 2:
        raise ValueError(f"CaCo needs at least two views per image, got {num_views}")
    if num_views == 2:
        return [(0, 1, 1.0), (1, 0, 1.0)]
    n_local = num_views - 2
    pairs = [(0, 1, 0.5), (1, 0, 0.5)]
    pairs += [(i, j, 1.0 / (2 * n_local)) for i in range(2, num_views) for j in (0, 1)]
    return pairs


def caco_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    views: Sequence[torch.Tensor],
    *,
    memory_lr: float,
    ema_momentum: float,
    autocast_dtype: torch.dtype | None = None,
    mark: Callable[[str], None] | None = None,
) -> StepResult:
    """One step as the reference runs it.

    EMA update of f_k, keys of the two (global) views, swapped-key positives, the
    cross-entropy loss at ``moco_t``, backward, optimizer step, then the bank update at
    ``mem_t`` with the queries and bank from before the step, the gradient averaged over
    ranks when a process group is initialised. ``mark(phase)``, when given, is called as
    each phase begins (``forward``, ``loss``, ``backward``, ``optimizer``, ``bank``) and
    with ``end``: what a profiler hangs its timers on.
    """
    mark = mark or _no_mark
    core = unwrap(model)
    bank = core.bank
    device = views[0].device
    pairs = loss_pairs(len(views))

    mark("forward")
    with _autocast(device, autocast_dtype):
        queries, keys = model(views, ema_momentum)
    mark("loss")
    w_hat, norms = bank.normalized()
    logits = [bank_logits(q, w_hat) for q in queries]
    key_labels = [positive_labels(k, w_hat) for k in keys]

    loss = logits[0].new_zeros(())
    pos_prob = logits[0].new_zeros(())
    for i, j, weight in pairs:
        ce = F.cross_entropy(logits[i] / core.moco_t, key_labels[j], reduction="none")
        loss = loss + weight * ce.mean()
        pos_prob = pos_prob + torch.exp(-ce.detach()).mean()

    mark("backward")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark("optimizer")
    optimizer.step()

    mark("bank")
    with torch.no_grad():
        grad = torch.zeros_like(w_hat)
        for i, j, weight in pairs:
            g = view_bank_gradient(
                queries[i].detach(), logits[i].detach(), key_labels[j], w_hat, norms, core.mem_t
            )
            grad.add_(g, alpha=weight)
        world = _world_size()
        if world > 1:
            dist.all_reduce(grad)
            grad.div_(world)
        bank.apply_gradient(grad, memory_lr, core.mem_momentum)

    labels = [key_labels[1], key_labels[0]] if len(views) == 2 else key_labels
    distinct = torch.stack([distinct_fraction(y, bank.size) for y in key_labels]).mean()
    mark("end")
    return StepResult(
        loss=loss.detach(),
        labels=labels,
        positive_prob=pos_prob / len(pairs),
        positive_columns_frac=distinct,
    )


def distinct_fraction(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Distinct values in ``labels`` (in ``[0, size)``) over their number, on the device:
    a scatter into a histogram of ``size`` bins, not ``unique`` (whose output shape depends
    on the data and so waits for the device)."""
    seen = torch.zeros(size, device=labels.device)
    seen.index_fill_(0, labels, 1.0)
    return seen.sum() / labels.numel()


def _gather(t: torch.Tensor) -> torch.Tensor:
    world = _world_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def init_bank(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Sequence[torch.Tensor]],
    *,
    lr: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """The bank initialisation pass before epoch 0 (caco.md §8); returns per-batch losses.

    For consecutive batches of views: loss = CE over ``[q1.k2, q1 W_hat] / 0.2`` with the
    positive at index 0, an optimizer step (at ``lr`` when given: the full base lr, no
    warmup), f_k EMA-updated with momentum 0.999 every iteration, and the normalised keys k2
    of the (all-gathered) batch written into the next columns of W until all K are filled.
    Afterwards f_k is reset to a copy of f_q and V to zero; the optimizer's momentum buffers
    are kept. Raises ValueError if ``batches`` runs out before the bank is full.
    """
    core = unwrap(model)
    bank = core.bank
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    filled, losses = 0, []
    for views in batches:
        device = views[0].device
        with _autocast(device, autocast_dtype):
            (q1,), (k2,) = model(views, INIT_EMA_MOMENTUM, query_views=(0,), key_views=(1,))
        w_hat, _ = bank.normalized()
        positive = (q1 * k2).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, bank_logits(q1, w_hat)], dim=1) / INIT_TEMPERATURE
        loss = F.cross_entropy(logits, torch.zeros(len(q1), dtype=torch.long, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            new_keys = _gather(k2)
            n = min(len(new_keys), bank.size - filled)
            bank.W[:, filled : filled + n] = new_keys[:n].t().to(bank.W.dtype)
            filled += n
        losses.append(loss.detach())
        if filled >= bank.size:
            break
    if filled < bank.size:
        raise ValueError(
            f"bank initialisation ran out of batches: filled {filled} of {bank.size} columns; "
            "pass at least ceil(bank_size / global_batch) batches"
        )
    core.reset_key_encoder()
    bank.reset_momentum()
    return torch.stack(losses).tolist()  # one wait for the device, not one per batch
