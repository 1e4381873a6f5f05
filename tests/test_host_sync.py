"""No host<->device synchronisation in the hot path: the step, the colour stage and the
engine's loop wait for the device only on logging steps (counted on CPU by function)."""

from __future__ import annotations

import itertools

import torch
from helpers import compose_pretrain
from tiny import tiny_caco

import caco.step as steps
from caco.augment import caco_two_views
from caco.device_augment import DeviceAugment
from caco.host_sync import HostSyncCounter
from caco.optim import LARS
from caco.train import Pretrainer


def test_the_counter_sees_every_kind_of_sync():
    x = torch.randn(8)
    with HostSyncCounter() as c:
        if (x > 0).any():
            pass
        x.nonzero()
        x.item() if x.numel() == 1 else x[0].item()
        float(x.sum())
        x[x > 0]
        torch.unique(x)
        x.cpu()
    assert c.counts == {"bool": 1, "nonzero": 1, "item": 1, "float": 1, "bool_index": 1,
                        "unique": 1, "cpu": 1}, c.counts
    with HostSyncCounter() as c:
        torch.where(x > 0, x, -x).sum().add_(1)
    assert c.total == 0


def test_a_training_step_makes_no_host_sync():
    model = tiny_caco(bank_size=32)
    opt = LARS(model.encoder_q.parameters(), lr=0.1, weight_decay=1e-4)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    with HostSyncCounter() as c:
        for _ in range(3):
            out = steps.caco_step(model, opt, views, memory_lr=3.0, ema_momentum=0.99)
    assert c.total == 0, c.counts  # (main before this change: 12 in three steps)
    assert float(out.loss) > 0 and 0 < float(out.positive_columns_frac) <= 1


def test_the_colour_stage_makes_no_host_sync():
    views = [torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8) for _ in range(2)]
    augment = DeviceAugment(caco_two_views(size=24))
    with HostSyncCounter() as c:
        augment(views, seed=3)
    assert c.total == 0, c.counts  # (before this change: 73 for this batch)


def test_the_engine_waits_for_the_device_only_on_logging_steps(tmp_path, monkeypatch):
    """Two epochs of 8 steps, logged every 4, a stop poll every 2: the syncs between one
    step's start and the next are zero except at logging steps and epoch ends."""
    counter = HostSyncCounter()
    at_step: list[int] = []
    real_step = steps.caco_step

    def counted_step(*args, **kwargs):
        at_step.append(counter.total)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(steps, "caco_step", counted_step)
    cfg = compose_pretrain("experiment=smoke", f"output_root={tmp_path}", "tracking.enabled=false",
                           "eval.knn.every=0", "log_every_steps=4", "stop_poll_steps=2")
    trainer = Pretrainer(cfg, tmp_path / "run")

    def batches_made_outside(loader):
        # The CPU data pipeline's own tensor reads are not device syncs: not counted.
        it = iter(loader)
        while True:
            counter.paused = True
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                counter.paused = False
            yield batch

    real_setup = trainer._setup

    def setup():
        real_setup()
        loader = trainer.loader
        trainer.loader = type("Counted", (), {
            "steps_per_epoch": loader.steps_per_epoch,
            "set_epoch": staticmethod(loader.set_epoch),
            "__iter__": lambda self: batches_made_outside(loader),
        })()

    trainer._setup = setup
    with counter:
        trainer.run()
    at_step.append(counter.total)
    per_step = [b - a for a, b in itertools.pairwise(at_step)]
    assert len(per_step) == 16
    for k, n in enumerate(per_step):
        step = k % 8 + 1
        if step == 8:
            continue  # the epoch's end: metrics, checkpoint, kNN monitor
        if step % 4 == 0:
            assert 0 < n <= 3, (k, per_step)  # finiteness, loss and positive_prob
        else:
            assert n == 0, (k, per_step, counter.counts)
