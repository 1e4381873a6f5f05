"""A single-process emulation of CaCo under DDP with ``world`` ranks on CPU.

Each rank's share of the batch is forwarded on its own (its own BN statistics, as on CPU
where SyncBatchNorm does not exist), the encoder gradients are averaged over ranks (what DDP
does), and so is the bank gradient (what ``caco_step`` does with a process group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caco.bank import positive_labels, view_bank_gradient
from caco.step import loss_pairs


def emulated_ddp_step(model, optimizer, shards, *, memory_lr: float, ema_momentum: float):
    """One step over ``shards`` (a list, one entry per rank, of that rank's views)."""
    world = len(shards)
    model.ema_update(ema_momentum)
    w_hat, norms = model.bank.normalized()
    optimizer.zero_grad()
    bank_grad = torch.zeros_like(w_hat)
    for views in shards:
        qs = [F.normalize(model.encoder_q(v), dim=1) for v in views]
        with torch.no_grad():
            keys = [F.normalize(model.encoder_k(v), dim=1) for v in views[:2]]
        labels = [positive_labels(k, w_hat) for k in keys]
        loss = 0
        for i, j, weight in loss_pairs(len(views)):
            logits = qs[i] @ w_hat
            loss = loss + weight * F.cross_entropy(logits / model.moco_t, labels[j])
            bank_grad += weight * view_bank_gradient(qs[i].detach(), logits.detach(), labels[j],
                                                     w_hat, norms, model.mem_t) / world
        (loss / world).backward()
    optimizer.step()
    model.bank.apply_gradient(bank_grad, memory_lr, model.mem_momentum)


def emulate_run(cfg, world: int):
    """The whole (bank_init=false) run of ``cfg`` as ``world`` CPU ranks would train it."""
    from caco.augment import GeometricViews
    from caco.data.pretrain import EpochShardSampler, SeededViews, build_device_augment, view_augs
    from caco.data.sources import labelled_split
    from caco.device_augment import batch_seed
    from caco.optim import LARS, set_lr
    from caco.schedules import Schedules
    from caco.train import build_model

    assert not cfg.optim.bank_init
    model = build_model(cfg.model, cfg.seed)
    o = cfg.optim
    sched = Schedules(lr=o.lr, final_lr=o.final_lr, memory_lr=o.memory_lr,
                      memory_lr_final=o.memory_lr_final, m0=o.ema_momentum,
                      warmup_epochs=o.warmup_epochs, epochs=cfg.epochs,
                      global_batch=cfg.batch_size)
    opt = LARS(model.encoder_q.parameters(), lr=sched.base_lr, weight_decay=o.weight_decay,
               momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    base = labelled_split(cfg.data, "train", subset=cfg.data.train_subset)
    data = SeededViews(base, GeometricViews(view_augs(cfg.data)), cfg.seed)
    augment = build_device_augment(cfg.data)
    per_rank = cfg.batch_size // world
    samplers = [EpochShardSampler(len(data), per_rank, rank=r, world=world, seed=cfg.seed)
                for r in range(world)]
    for epoch in range(cfg.epochs):
        s = sched.at(epoch)
        set_lr(opt, s["lr"])
        data.set_epoch(epoch)
        orders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        for step in range(samplers[0].steps_per_epoch):
            shards = []
            for rank, order in enumerate(orders):
                samples = [data[i][0] for i in order[step * per_rank:(step + 1) * per_rank]]
                views = [torch.stack([views[v] for views in samples])
                         for v in range(len(samples[0]))]
                shards.append(augment(views, batch_seed(cfg.seed, epoch, step, rank)))
            emulated_ddp_step(model, opt, shards, memory_lr=s["memory_lr"],
                              ema_momentum=s["ema_momentum"])
    return model
