"""A short CaCo run on real Fashion-MNIST: the loss falls and the bank follows the queries."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from caco.augment import MultiViewAugment, caco_two_views
from caco.data.fashion_mnist import FashionMNIST
from caco.model import CaCo
from caco.optim import LARS, set_lr
from caco.schedules import Schedules
from caco.step import caco_step, init_bank


@pytest.mark.slow
def test_short_run_loss_falls_and_bank_tracks_queries():
    torch.manual_seed(0)
    aug = MultiViewAugment(caco_two_views(size=32), mean=(0.286,) * 3, std=(0.353,) * 3)
    data = FashionMNIST("train", indices=range(2048), transform=aug)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
    model = CaCo("resnet18", dim=64, mlp_dim=256, bank_size=512, small_stem=True, width=16,
                 blocks=(1, 1, 1, 1))
    sched = Schedules(lr=0.3, final_lr=0.003, memory_lr=3.0, memory_lr_final=3.0, m0=0.99,
                      warmup_epochs=1, epochs=3, global_batch=64)
    opt = LARS(model.encoder_q.parameters(), lr=sched.base_lr, weight_decay=1.5e-6)
    init_bank(model, opt, (views for views, _ in itertools.cycle(loader)), lr=sched.base_lr)

    losses, improved = [], []
    for epoch in range(2):
        s = sched.at(epoch)
        set_lr(opt, s["lr"])
        for views, _ in loader:
            with torch.no_grad():
                (q1, _), _ = model(views, None)
                w_before, _ = model.bank.normalized()
            out = caco_step(model, opt, views, memory_lr=s["memory_lr"],
                            ema_momentum=s["ema_momentum"])
            w_after, _ = model.bank.normalized()
            y1 = out.labels[0]
            # The positive columns chosen for view 1 moved towards view 1's queries.
            before = (q1 * w_before[:, y1].t()).sum(1).mean()
            after = (q1 * w_after[:, y1].t()).sum(1).mean()
            improved.append(bool(after > before))
            losses.append(out.loss)
            assert out.positive_columns_frac > 0.5, "bank collapsed onto few columns"

    chance = 2 * torch.log(torch.tensor(512.0)).item()
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert first > last + 0.5, (first, last)
    assert last < chance - 0.5
    assert sum(improved) / len(improved) > 0.9, improved
