"""Data: Fashion-MNIST lookup, deterministic per-rank order, reproducible per-sample views."""

from __future__ import annotations

import shutil

import pytest
import torch

from caco.augment import MultiViewAugment, caco_two_views
from caco.data import fashion_mnist
from caco.data.pretrain import EpochShardSampler, SeededViews
from caco.errors import DataError


def test_torchvision_layout_under_data_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fashion_mnist.DEBIAN_ROOT.iterdir():
        shutil.copy(f, raw / f.name)
    images, labels = fashion_mnist.load_arrays("test", tmp_path)
    assert images.shape == (10000, 28, 28) and labels.max() == 9


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setattr(fashion_mnist, "CACHE_ROOT", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.resolve_root(None, download=False)
    with pytest.raises(FileNotFoundError, match=f"not found in {tmp_path}"):
        fashion_mnist.resolve_root(tmp_path)


def test_truncated_idx_file_is_named(tmp_path):
    for f in fashion_mnist.DEBIAN_ROOT.iterdir():
        shutil.copy(f, tmp_path / f.name)
    import gzip

    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path) as g:
        data = g.read()
    with gzip.open(path, "wb") as g:
        g.write(data[:-10])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is truncated"):
        fashion_mnist.load_arrays("test", tmp_path)


def test_shards_are_disjoint_cover_whole_batches_and_depend_on_seed_and_epoch():
    n, batch, world = 103, 5, 3
    samplers = [EpochShardSampler(n, batch, rank=r, world=world, seed=7) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shards = [list(s) for s in samplers]
    assert all(len(x) == 6 * batch for x in shards)  # floor(103 / 15) = 6 steps
    flat = [i for x in shards for i in x]
    assert len(set(flat)) == len(flat)
    again = EpochShardSampler(n, batch, rank=1, world=world, seed=7)
    again.set_epoch(2)
    assert list(again) == shards[1]
    again.set_epoch(3)
    assert list(again) != shards[1]
    again.set_epoch(2, start_step=4)
    assert list(again) == shards[1][4 * batch:] and len(again) == 2 * batch
    with pytest.raises(DataError, match="fewer than one global batch"):
        EpochShardSampler(10, 4, world=3)


def test_views_reproducible_per_seed_epoch_and_sample():
    base = fashion_mnist.FashionMNIST("train", indices=range(4))
    ds = SeededViews(base, MultiViewAugment(caco_two_views(size=32)), seed=3)
    ds.set_epoch(5)
    torch.manual_seed(123)
    first = ds[2][0]
    torch.manual_seed(999)  # the global RNG does not matter...
    second = ds[2][0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    before = torch.get_rng_state()
    ds[1]
    assert torch.equal(before, torch.get_rng_state())  # ...and is left untouched
    ds.set_epoch(6)
    assert not torch.equal(ds[2][0][0], first[0])
    assert ds[2][1] == int(base.labels[2])


def test_persistent_workers_see_each_epoch_and_resume_step():
    """Workers live for the whole run, so the epoch travels with each index: two workers
    give the batches of the in-process loader, epoch after epoch and from a mid-epoch step."""
    from helpers import compose_pretrain

    from caco.data.pretrain import build_pretrain_loader

    def batches(workers: int, plan):
        cfg = compose_pretrain("experiment=smoke", f"data.num_workers={workers}",
                               "data.train_subset=96")
        loader = build_pretrain_loader(cfg.data, 16, seed=4)
        assert loader.loader.persistent_workers == (workers > 0)
        out = []
        for epoch, start in plan:
            loader.set_epoch(epoch, start)
            out.append([views for views, _ in loader])
        return out

    plan = [(0, 0), (1, 0), (1, 3), (-1, 0)]
    for got, want in zip(batches(2, plan), batches(0, plan)):
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
