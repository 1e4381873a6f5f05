"""Per-EPOCH schedules of the reference (caco.md §1 and §5); epochs count from 0.

- encoder lr: ``base = lr * global_batch / 256``; epoch ``e < W`` gives ``base (e+1) / W``;
  afterwards a cosine from ``base`` to ``final = final_lr * global_batch / 256`` (base / 100
  in the published runs): ``final + 0.5 (1 + cos(pi (e-W) / (E-W))) (base - final)``.
- memory lr: ``memory_lr (e+1) / W`` during warmup, then a cosine to ``memory_lr_final``;
  the published runs set both equal, i.e. constant after warmup. Not scaled with the batch.
- EMA momentum: ``m(e) = 1 - 0.5 (1 + cos(pi e / E)) (1 - m0)``, from m0 to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(lr: float, global_batch: int) -> float:
    """The linear scaling rule of the reference: ``lr * global_batch / 256``."""
    return lr * global_batch / 256


def _warmup_cosine(epoch: int, start: float, final: float, warmup: int, epochs: int) -> float:
    if epoch < warmup:
        return start * (epoch + 1) / warmup
    span = max(epochs - warmup, 1)
    return final + 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span)) * (start - final)


def encoder_lr(
    epoch: int, *, base_lr: float, final_lr: float, warmup_epochs: int, epochs: int
) -> float:
    """Encoder lr at ``epoch``; ``base_lr`` and ``final_lr`` already batch-scaled."""
    return _warmup_cosine(epoch, base_lr, final_lr, warmup_epochs, epochs)


def memory_lr(
    epoch: int, *, memory_lr: float, memory_lr_final: float, warmup_epochs: int, epochs: int
) -> float:
    return _warmup_cosine(epoch, memory_lr, memory_lr_final, warmup_epochs, epochs)


def ema_momentum(epoch: int, *, m0: float, epochs: int) -> float:
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)


@dataclass(frozen=True)
class Schedules:
    """All three schedules of a run, resolved from its settings; a pure function of the epoch."""

    lr: float
    final_lr: float
    memory_lr: float
    memory_lr_final: float
    m0: float
    warmup_epochs: int
    epochs: int
    global_batch: int

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.global_batch < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.global_batch}")
        if not 0 <= self.m0 <= 1:
            raise ValueError(f"optim.ema_momentum must be in [0, 1], got {self.m0}")

    @property
    def base_lr(self) -> float:
        return scaled_lr(self.lr, self.global_batch)

    def at(self, epoch: int) -> dict[str, float]:
        """``{'lr', 'memory_lr', 'ema_momentum'}`` for ``epoch``."""
        warmup = self.warmup_epochs
        return {
            "lr": encoder_lr(
                epoch,
                base_lr=self.base_lr,
                final_lr=scaled_lr(self.final_lr, self.global_batch),
                warmup_epochs=warmup,
                epochs=self.epochs,
            ),
            "memory_lr": memory_lr(
                epoch,
                memory_lr=self.memory_lr,
                memory_lr_final=self.memory_lr_final,
                warmup_epochs=warmup,
                epochs=self.epochs,
            ),
            "ema_momentum": ema_momentum(epoch, m0=self.m0, epochs=self.epochs),
        }
