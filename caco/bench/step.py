"""Throughput of ``caco_step`` against a MoCo v2-style step of the same encoders.

The baseline shares everything but the objective: the same EMA key encoder, the same four
encoder passes (two query views with gradient, two key views without), the same LARS; its
negatives come from a FIFO queue of past keys with InfoNCE over ``[positive key, queue]``
instead of CaCo's learnable bank. The two steps are timed alternately in one process after a
warm-up, so machine load affects both alike; the ratio is what the target applies to.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caco.model import CaCo
from caco.optim import LARS
from caco.step import caco_step

log = logging.getLogger(__name__)


@dataclass
class StepBenchConfig:
    arch: str = "resnet18"
    small_stem: bool = True
    image_size: int = 32
    batch_size: int = 256
    bank_size: int = 16384
    dim: int = 128
    mlp_dim: int = 2048
    warmup_steps: int = 1
    rounds: int = 3
    steps_per_round: int = 1
    threads: int = 0  # 0: keep torch's default
    device: str = "cpu"
    seed: int = 0


class MocoQueueStep:
    """A MoCo v2-style symmetric step with a key queue, over a CaCo model's encoders."""

    def __init__(self, model: CaCo, queue_size: int, temperature: float = 0.2) -> None:
        dim = model.bank.W.shape[0]
        device = model.bank.W.device
        self.model = model
        self.queue = F.normalize(torch.randn(queue_size, dim, device=device), dim=1)
        self.ptr = 0
        self.t = temperature

    def __call__(self, optimizer: torch.optim.Optimizer, views, ema_momentum: float) -> float:
        (q1, q2), (k1, k2) = self.model(views, ema_momentum)
        queue = self.queue
        loss = 0.0
        for q, k in ((q1, k2), (q2, k1)):
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / self.t
            loss = loss + F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long,
                                                              device=q.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            keys = torch.cat([k1, k2])
            idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(queue)
            queue[idx] = keys
            self.ptr = int((self.ptr + len(keys)) % len(queue))
        return float(loss.detach())


def run(cfg: StepBenchConfig) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = CaCo(cfg.arch, dim=cfg.dim, mlp_dim=cfg.mlp_dim, bank_size=cfg.bank_size,
                 small_stem=cfg.small_stem).to(device)
    opt = LARS(model.encoder_q.parameters(), lr=0.1, weight_decay=1.5e-6)
    baseline = MocoQueueStep(model, cfg.bank_size)
    views = [torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
             for _ in range(2)]

    def caco_once():
        caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99)

    def moco_once():
        baseline(opt, views, 0.99)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(cfg.steps_per_round):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(cfg.warmup_steps):
        caco_once()
        moco_once()
    caco_s = moco_s = 0.0
    for r in range(cfg.rounds):
        caco_s += timed(caco_once)
        moco_s += timed(moco_once)
        log.info("round %d/%d: caco %.2f s, baseline %.2f s", r + 1, cfg.rounds, caco_s, moco_s)
    images = cfg.rounds * cfg.steps_per_round * cfg.batch_size
    caco_ips, moco_ips = images / caco_s, images / moco_s
    return {
        "bench": "step",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "arch": cfg.arch,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "bank_size": cfg.bank_size,
        "caco_images_per_s": round(caco_ips, 2),
        "baseline_images_per_s": round(moco_ips, 2),
        "ratio": round(caco_ips / moco_ips, 4),
        "target_ratio": 0.9,
    }
