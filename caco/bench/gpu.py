"""The GPU hot path on one GPU: how close a CaCo step comes to what the GPU can do.

The yardstick is supervised ResNet-50 training (bf16 autocast, channels_last, one fwd+bwd and
an SGD step per image) measured in the same process. A CaCo image costs about 2.6 supervised
images (two query views with gradient, two key views without, the bank), so the ideal
``ratio`` = CaCo img/s / supervised img/s is about 0.37-0.40. Also reported: per-phase
milliseconds (CUDA events), host syncs per step (:class:`caco.host_sync.HostSyncCounter`),
multi-crop img/s, a small training loop with and without the prefetcher, and how often bf16
and fp32 forwards choose the same positive column of the bank.

Imports nothing but torch, torchvision and caco (no mlflow, ffcv or submitit): the GPU
machines it is meant for may have nothing else.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from caco.augment import caco_two_views
from caco.bank import positive_labels
from caco.device_augment import DeviceAugment
from caco.errors import CacoError
from caco.host_sync import HostSyncCounter
from caco.model import CaCo
from caco.optim import LARS
from caco.prefetch import prefetch, stream_for
from caco.step import caco_step

log = logging.getLogger(__name__)

PHASES = ("colour", "query_forward", "key_forward", "loss", "backward", "optimizer", "bank")


class NoGpu(CacoError):
    """The benchmark needs a CUDA device."""


@dataclass
class GpuBenchConfig:
    batch_size: int = 128        # images per step (each gives two views)
    image_size: int = 224
    bank_size: int = 65536
    dim: int = 256
    mlp_dim: int = 2048
    local_crops: int = 6         # multi-crop: 2 x image_size + local_crops x local_size
    local_size: int = 96
    warmup_steps: int = 5
    steps: int = 20
    loop_batches: int = 12       # the training loop with / without the prefetcher
    device: str = "cuda"
    seed: int = 0


def _ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    return start.elapsed_time(end)


def _timed_img_per_s(fn, images: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return images * steps / (time.perf_counter() - t0)


def supervised_img_per_s(cfg: GpuBenchConfig, device: torch.device) -> float:
    from torchvision.models import resnet50

    net = resnet50(num_classes=1000).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device
                    ).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (cfg.batch_size,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_img_per_s(step, cfg.batch_size, cfg.warmup_steps, cfg.steps)


def _uint8_views(cfg: GpuBenchConfig, device, n_local: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    sizes = [cfg.image_size] * 2 + [cfg.local_size] * n_local
    return [torch.randint(0, 256, (cfg.batch_size, 3, s, s), generator=g, dtype=torch.uint8)
            .to(device) for s in sizes]


def _model(cfg: GpuBenchConfig, device) -> tuple[CaCo, LARS]:
    torch.manual_seed(cfg.seed)
    model = CaCo("resnet50", dim=cfg.dim, mlp_dim=cfg.mlp_dim, bank_size=cfg.bank_size)
    model = model.to(device, memory_format=torch.channels_last)
    return model, LARS(model.encoder_q.parameters(), lr=0.3, weight_decay=1.5e-6)


def _as_input(views: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.contiguous(memory_format=torch.channels_last) for v in views]


def phase_ms(model: CaCo, opt: LARS, augment: DeviceAugment, raw: list[torch.Tensor],
             steps: int) -> dict[str, float]:
    """Mean milliseconds per phase over ``steps`` steps, from CUDA events."""
    totals = dict.fromkeys(PHASES, 0.0)
    for s in range(steps):
        events: list[tuple[str, torch.cuda.Event]] = []

        def mark(name: str, events=events) -> None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append((name, e))

        hooks = []
        for encoder, name in ((model.encoder_q, "query_forward"),
                              (model.encoder_k, "key_forward")):
            hooks.append(encoder.register_forward_pre_hook(
                lambda *_, n=name: mark(n)))
            hooks.append(encoder.register_forward_hook(lambda *_: mark("forward_gap")))
        mark("colour")
        views = _as_input(augment(raw, seed=s))
        caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99,
                  autocast_dtype=torch.bfloat16, mark=mark)
        for h in hooks:
            h.remove()
        torch.cuda.synchronize()
        for (name, start), (_, end) in itertools.pairwise(events):
            if name in totals:
                totals[name] += _ms(start, end)
    return {k: round(v / steps, 3) for k, v in totals.items()}


def host_syncs_per_step(model, opt, augment, raw, steps: int = 3) -> float:
    with HostSyncCounter() as counter:
        for s in range(steps):
            views = _as_input(augment(raw, seed=s))
            caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99,
                      autocast_dtype=torch.bfloat16)
    if counter.total:
        log.warning("host syncs in %d steps: %s", steps, dict(counter.counts))
    return counter.total / steps


def loop_img_per_s(cfg: GpuBenchConfig, model, opt, augment, device, use_prefetch: bool
                   ) -> float:
    """A training loop over pinned uint8 host batches: copy, colour stage, step."""
    host = [[v.cpu().pin_memory() for v in _uint8_views(cfg, "cpu")]
            for _ in range(2)]
    batches = [(host[i % 2], None) for i in range(cfg.loop_batches)]

    def prepare(views, step):
        return _as_input(augment([v.to(device, non_blocking=True) for v in views], seed=step))

    def one_pass():
        if use_prefetch:
            items = prefetch(batches, prepare, 0, stream_for(device))
        else:
            items = ((i, prepare(v, i)) for i, (v, _) in enumerate(batches))
        for _, views in items:
            caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99,
                      autocast_dtype=torch.bfloat16)

    return _timed_img_per_s(one_pass, cfg.batch_size * cfg.loop_batches, 1, 2)


@torch.no_grad()
def bf16_label_agreement(model: CaCo, views: list[torch.Tensor]) -> float:
    """Positive columns (argmax over the bank) chosen by bf16 and by fp32 key forwards of the
    same batch, bank filled with real keys (as after the bank initialisation)."""
    _, keys = model(views, None)
    bank = F.normalize(torch.cat(keys).t().repeat(1, model.bank.size // (2 * len(keys[0])) + 1)
                       [:, :model.bank.size] + 0.05 * torch.randn_like(model.bank.W), dim=0)
    model.bank.W.copy_(bank)
    w_hat, _ = model.bank.normalized()
    fp32 = [positive_labels(k, w_hat) for k in keys]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, keys16 = model(views, None)
    bf16 = [positive_labels(k, w_hat) for k in keys16]
    same = sum(int((a == b).sum()) for a, b in zip(fp32, bf16))
    return 100.0 * same / sum(len(a) for a in fp32)


def run(cfg: GpuBenchConfig) -> dict:
    if not torch.cuda.is_available():
        raise NoGpu("bench=gpu needs a CUDA GPU and this machine has none "
                    "(torch.cuda.is_available() is False); run it on a GPU node, e.g. "
                    "bash launch/gpu_check.sh")
    device = torch.device(cfg.device)
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats(device)
    log.info("supervised ResNet-50 at %d px, batch %d", cfg.image_size, cfg.batch_size)
    sup = supervised_img_per_s(cfg, device)
    torch.cuda.empty_cache()
    model, opt = _model(cfg, device)
    augment = DeviceAugment(caco_two_views(size=cfg.image_size))
    raw = _uint8_views(cfg, device)

    def caco_once():
        views = _as_input(augment(raw, seed=0))
        caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99,
                  autocast_dtype=torch.bfloat16)

    log.info("CaCo step: ResNet-50, bank %d, two views at %d px", cfg.bank_size, cfg.image_size)
    caco = _timed_img_per_s(caco_once, cfg.batch_size, cfg.warmup_steps, cfg.steps)
    phases = phase_ms(model, opt, augment, raw, max(3, cfg.steps // 4))
    syncs = host_syncs_per_step(model, opt, augment, raw)
    log.info("training loop with and without the prefetcher")
    without = loop_img_per_s(cfg, model, opt, augment, device, use_prefetch=False)
    with_prefetch = loop_img_per_s(cfg, model, opt, augment, device, use_prefetch=True)
    agreement = bf16_label_agreement(model, _as_input(augment(raw, seed=1)))

    from caco.augment import caco_multi_crop

    mc_augment = DeviceAugment(caco_multi_crop(cfg.image_size, cfg.local_size, cfg.local_crops))
    mc_raw = _uint8_views(cfg, device, n_local=cfg.local_crops)

    def multicrop_once():
        views = _as_input(mc_augment(mc_raw, seed=0))
        caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99,
                  autocast_dtype=torch.bfloat16)

    multicrop = _timed_img_per_s(multicrop_once, cfg.batch_size, 2, max(3, cfg.steps // 2))
    return {
        "bench": "gpu", "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "batch_size": cfg.batch_size,
        "image_size": cfg.image_size, "bank_size": cfg.bank_size,
        "supervised_img_per_s": round(sup, 1), "caco_img_per_s": round(caco, 1),
        "ratio": round(caco / sup, 4), "ideal_ratio": "0.37-0.40", "target_ratio": 0.35,
        "phase_ms": phases, "host_syncs_per_step": syncs,
        "multicrop_img_per_s": round(multicrop, 1),
        "loop_img_per_s_without_prefetch": round(without, 1),
        "loop_img_per_s_with_prefetch": round(with_prefetch, 1),
        "bf16_fp32_positive_agreement_pct": round(agreement, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }
