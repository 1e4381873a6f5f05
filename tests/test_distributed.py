"""Two gloo processes, each with half the batch, under DDP: identical banks, and equal to a
single-process emulation (BN over each half, encoder and bank gradients averaged)."""

from __future__ import annotations

import copy
import multiprocessing as mp

import torch
import torch.distributed as dist
from emulation import emulated_ddp_step
from tiny import tiny_caco

from caco.optim import LARS
from caco.step import caco_step

BATCH, BANK, LR, MEMORY_LR, EMA, STEPS = 8, 32, 0.05, 3.0, 0.99, 2


def _views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(2)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = tiny_caco(bank_size=BANK)
        ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        opt = LARS(model.encoder_q.parameters(), lr=LR, weight_decay=1.5e-6)
        half = BATCH // world
        for step in range(STEPS):
            views = [v[rank * half:(rank + 1) * half] for v in _views(step)]
            caco_step(ddp, opt, views, memory_lr=MEMORY_LR, ema_momentum=EMA)
        torch.save({"W": model.bank.W, "V": model.bank.V,
                    "q": dict(model.encoder_q.named_parameters())}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _emulate(world: int):
    """Single process: per-half forward (own BN batch), gradients averaged over halves."""
    model = tiny_caco(bank_size=BANK)
    opt = LARS(model.encoder_q.parameters(), lr=LR, weight_decay=1.5e-6)
    half = BATCH // world
    for step in range(STEPS):
        shards = [[v[r * half:(r + 1) * half] for v in _views(step)] for r in range(world)]
        emulated_ddp_step(model, opt, shards, memory_lr=MEMORY_LR, ema_momentum=EMA)
    return model


def _run_ranks(target, tmp_path, world: int = 2, while_running=lambda: None) -> None:
    """``target(rank, world, rendezvous file, out dir)`` in ``world`` spawned processes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, str(tmp_path / "rdzv"), str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    while_running()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed or hung (see stderr)"


def test_two_ranks_end_with_identical_banks_equal_to_emulation(tmp_path):
    _run_ranks(_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["W"], r1["W"]) and torch.equal(r0["V"], r1["V"])
    for name in r0["q"]:
        assert torch.equal(r0["q"][name], r1["q"][name]), name
    ref = _emulate(2)
    torch.testing.assert_close(r0["W"], ref.bank.W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["V"], ref.bank.V, rtol=1e-4, atol=1e-5)
    for name, p in ref.encoder_q.named_parameters():
        torch.testing.assert_close(r0["q"][name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    # The emulation is not trivially the full-batch step: BN statistics per half matter.
    full = copy.deepcopy(tiny_caco(bank_size=BANK))
    opt = LARS(full.encoder_q.parameters(), lr=LR, weight_decay=1.5e-6)
    for step in range(STEPS):
        caco_step(full, opt, _views(step), memory_lr=MEMORY_LR, ema_momentum=EMA)
    assert not torch.allclose(full.bank.W, ref.bank.W, rtol=1e-4, atol=1e-5)


def _knn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from helpers import compose_pretrain

    from caco.knn import knn_accuracy, knn_loaders
    from caco.model import Backbone

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
    try:
        cfg = compose_pretrain("experiment=smoke", "eval.knn.train_subset=300",
                               "eval.knn.test_subset=101", "eval.knn.batch_size=64")
        loaders = knn_loaders(cfg.data, cfg.eval.knn, shard=(rank, world))
        assert len(loaders[0].dataset) in (150, 300) and len(loaders[1].dataset) in (50, 51, 101)
        result = knn_accuracy(Backbone(tiny_caco().encoder_q), *loaders, k=20,
                              temperature=0.07)
        torch.save(result, f"{out_dir}/knn{world}_{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_the_knn_monitor_shards_feature_extraction_across_ranks(tmp_path):
    """Each of two ranks extracts half of each split; both get the single-process result."""
    _run_ranks(_knn_worker, tmp_path, while_running=lambda: _knn_worker(0, 1, "", str(tmp_path)))
    single = torch.load(tmp_path / "knn1_0.pt")
    assert torch.load(tmp_path / "knn2_0.pt") == single == torch.load(tmp_path / "knn2_1.pt")
