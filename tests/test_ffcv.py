"""The FFCV path on real JPEGs: conversion, loading, equivalence with torchvision, training.

FFCV compiles every new Loader (tens of seconds on 2 cores), so the module builds ONE
two-view pretraining Loader (``ffcv_views``) and every test that needs two views reuses it:
the loader cache in :mod:`caco.data.ffcv_loader` hands the same compiled Loader to other
ranks' loaders and to the trainer when the pipeline is the same. Only the multi-crop test
compiles a second one. ffcv is required: a missing extra fails this module, it is not skipped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ffcv  # noqa: F401  (required in CI: an ImportError here is a failure)
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from caco.data.beton import convert_split, options_from_config
from caco.data.ffcv_loader import FFCVEvalLoader, FFCVPretrainLoader
from caco.data.pretrain import TorchPretrainLoader, build_eval_loader, view_augs
from caco.errors import ConfigError, DataError
from tests.helpers import ROOT, compose_pretrain, run_cli

pytestmark = [pytest.mark.ffcv, pytest.mark.slow]

BATCH = 16


def _cfg(root: Path, *extra: str):
    return compose_pretrain(
        "experiment=smoke", "data=generated", f"output_root={root}", f"batch_size={BATCH}",
        "data.generate.train_per_class=24", "data.generate.val_per_class=6",
        "data.generate.size=48", "data.image_size=32", "data.eval_resize=36",
        "data.ffcv.max_resolution=48", "data.ffcv.write_mode=raw", "data.num_workers=2",
        "data.ffcv.num_workers=2", "data.loader=ffcv", *extra)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ffcv")


@pytest.fixture(scope="module")
def data(root):
    """The generated data (240 train / 60 val JPEGs) converted once to train/val .beton."""
    cfg = _cfg(root)
    opts = options_from_config(cfg.data.ffcv)
    for split in ("train", "val"):
        convert_split(cfg.data, split, opts)
    return cfg.data


@pytest.fixture(scope="module")
def ffcv_views(data):
    """Rank 0 of 2: the module's one compiled two-view Loader."""
    return FFCVPretrainLoader(data, view_augs(data), BATCH, rank=0, world=2, seed=5)


def _source_labels(data) -> np.ndarray:
    from torchvision.datasets import ImageFolder

    return np.asarray(ImageFolder(str(Path(data.root) / "train")).targets)


def _epoch(loader, epoch: int, start_step: int = 0):
    loader.set_epoch(epoch, start_step)
    return list(loader)


# ------------------------------------------------------------------ conversion
def test_conversion_records_skips_reruns_and_refuses_other_options(data, tmp_path):
    import json

    out = Path(data.ffcv.dir) / "train.beton"
    record = json.loads(out.with_name("train.beton.json").read_text())
    assert record["samples"] == 240 and len(record["classes"]) == 10
    assert record["options"]["write_mode"] == "raw" and record["skipped"] == []
    mtime = out.stat().st_mtime_ns
    again = convert_split(data, "train", options_from_config(data.ffcv))
    assert not again.written and again.samples == 240 and out.stat().st_mtime_ns == mtime

    other = OmegaConf.merge(data, {"ffcv": {"dir": str(tmp_path / "b"), "subset_per_class": 2}})
    first = convert_split(other, "val", options_from_config(other.ffcv))
    assert first.written and first.samples == 20
    changed = OmegaConf.merge(other, {"ffcv": {"jpeg_quality": 50, "write_mode": "jpg"}})
    with pytest.raises(ConfigError, match=r"options\.jpeg_quality.*overwrite=true"):
        convert_split(changed, "val", options_from_config(changed.ffcv))
    forced = OmegaConf.merge(changed, {"ffcv": {"overwrite": True}})
    assert convert_split(forced, "val", options_from_config(forced.ffcv)).written


@pytest.fixture()
def broken_tree(data, tmp_path) -> Path:
    """Two classes of real JPEGs plus a truncated JPEG and a text file named .jpg."""
    src = Path(data.root) / "train"
    tree = tmp_path / "broken"
    for name in ("bag", "coat"):
        (tree / "train" / name).mkdir(parents=True)
        for f in sorted((src / name).iterdir())[:3]:
            shutil.copy(f, tree / "train" / name / f.name)
    good = sorted((src / "bag").iterdir())[0].read_bytes()
    (tree / "train" / "bag" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tree / "train" / "coat" / "notes.jpg").write_text("not an image")
    return tree


def _folder_data(data, tree: Path, **options):
    return OmegaConf.merge(data, {"root": str(tree), "generate": None,
                                  "ffcv": {"dir": str(tree / "ffcv"), **options}})


def test_unreadable_images_are_named_and_skipped_or_stop_the_conversion(data, broken_tree,
                                                                        caplog):
    cfg = _folder_data(data, broken_tree)
    with caplog.at_level(logging.WARNING, logger="caco.data.beton"):
        result = convert_split(cfg, "train", options_from_config(cfg.ffcv))
    assert result.samples == 6 and len(result.skipped) == 2
    for name in ("truncated.jpg", "notes.jpg"):
        assert any(name in s for s in result.skipped)
        assert any(name in r.getMessage() for r in caplog.records)
    assert "skipped 2 unreadable" in caplog.text

    strict = _folder_data(data, broken_tree, dir=str(broken_tree / "strict"), strict=True)
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*(truncated|notes)\.jpg"):
        convert_split(strict, "train", options_from_config(strict.ffcv))
    assert not (broken_tree / "strict").exists() or not any((broken_tree / "strict").iterdir())


def test_empty_class_folder_and_missing_root_are_clear_errors(data, broken_tree, tmp_path):
    (broken_tree / "train" / "dress").mkdir()
    cfg = _folder_data(data, broken_tree)
    with pytest.raises(DataError, match=r"class folder .*dress holds no images"):
        convert_split(cfg, "train", options_from_config(cfg.ffcv))
    missing = _folder_data(data, tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        convert_split(missing, "train", options_from_config(missing.ffcv))


def test_interrupted_conversion_leaves_no_valid_looking_file(tmp_path):
    out = tmp_path / "fm"
    args = ["data=fashion_mnist", f"data.ffcv.dir={out}", "splits=[train]",
            "data.ffcv.num_workers=1", f"output_root={tmp_path}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "prepare_data.py"), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(out.glob(".train.beton.tmp-*")):
            assert proc.poll() is None, "the conversion ended before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # mid-write
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "train.beton").exists()
    assert not (out / "train.beton.json").exists()
    # A rerun clears the leftover and writes a complete file.
    rerun = run_cli("prepare_data.py", *args, "data.ffcv.subset_per_class=5")
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "train.beton").exists() and not list(out.glob(".train.beton.tmp-*"))
    assert "left by an interrupted conversion" in rerun.stdout + rerun.stderr
    assert "it/s" not in rerun.stderr  # no progress bars off a terminal


def test_cli_bad_inputs_are_one_message(tmp_path):
    bad = run_cli("prepare_data.py", "data.ffcv.write_mode=png", f"output_root={tmp_path}")
    assert bad.returncode == 2 and "data.ffcv.write_mode='png'" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    nothing = run_cli("pretrain.py", "experiment=smoke", "data.loader=ffcv",
                      f"output_root={tmp_path}", "tracking.enabled=false")
    assert nothing.returncode == 2
    assert "prepare_data.py data=fashion_mnist" in nothing.stdout + nothing.stderr
    assert "Traceback" not in nothing.stderr
    unknown = run_cli("pretrain.py", "experiment=smoke", "data.loader=dali",
                      f"output_root={tmp_path}", "tracking.enabled=false")
    assert unknown.returncode == 2 and "data.loader='dali'" in unknown.stdout + unknown.stderr


# ------------------------------------------------------------------ loading
def test_views_are_uint8_independent_copies_with_aligned_labels(data, ffcv_views):
    labels = _source_labels(data)
    batches = _epoch(ffcv_views, 0)
    assert len(batches) == ffcv_views.steps_per_epoch == 240 // (2 * BATCH)
    first = [v.clone() for v in batches[0][0]]
    order = np.fromiter(iter(ffcv_views.sampler), dtype=np.int64)
    got = torch.cat([y for _, y in batches]).numpy()
    np.testing.assert_array_equal(got, labels[order])
    for views, _ in batches:
        assert [(tuple(v.shape), v.dtype) for v in views] == [((BATCH, 3, 32, 32), torch.uint8)] * 2
        assert not torch.equal(views[0], views[1])  # two crops of the same images
    # Later batches did not overwrite the first one's memory (FFCV reuses its buffers).
    assert all(torch.equal(a, b) for a, b in zip(first, batches[0][0]))


def test_order_per_epoch_resume_and_disjoint_shards(data, ffcv_views):
    epoch0 = [y for _, y in _epoch(ffcv_views, 0)]
    again = [y for _, y in _epoch(ffcv_views, 0)]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again))
    resumed = [y for _, y in _epoch(ffcv_views, 0, start_step=4)]
    assert len(resumed) == len(epoch0) - 4
    assert all(torch.equal(a, b) for a, b in zip(resumed, epoch0[4:]))

    rank1 = FFCVPretrainLoader(data, view_augs(data), BATCH, rank=1, world=2, seed=5)
    assert rank1.loader is ffcv_views.loader  # the compiled Loader is shared
    seen = {}
    for rank, loader in ((0, ffcv_views), (1, rank1)):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen[rank, epoch] = set(np.fromiter(iter(loader.sampler), dtype=np.int64))
            assert len(list(loader)) == loader.steps_per_epoch
    for epoch in (0, 1):
        assert not seen[0, epoch] & seen[1, epoch]
        assert len(seen[0, epoch] | seen[1, epoch]) == 2 * 7 * BATCH
    assert seen[0, 0] != seen[0, 1]  # reshuffled per epoch


def test_same_samples_in_the_same_order_as_the_torchvision_loader(data, ffcv_views):
    torch_data = OmegaConf.merge(data, {"loader": "torch"})
    reference = TorchPretrainLoader(torch_data, view_augs(torch_data), BATCH, rank=0, world=2,
                                    seed=5)
    assert reference.steps_per_epoch == ffcv_views.steps_per_epoch
    for epoch in (0, 3):
        ours, theirs = _epoch(ffcv_views, epoch), _epoch(reference, epoch)
        for (v_f, y_f), (v_t, y_t) in zip(ours, theirs):
            assert torch.equal(y_f, y_t)
            assert [(v.shape, v.dtype) for v in v_f] == [(v.shape, v.dtype) for v in v_t]


def test_eval_loaders_match_the_torchvision_eval_view(data):
    ffcv_eval = build_eval_loader(data, "val", 20)
    torch_eval = build_eval_loader(OmegaConf.merge(data, {"loader": "torch"}), "val", 20)
    assert isinstance(ffcv_eval, FFCVEvalLoader) and len(ffcv_eval.dataset) == 60
    diffs = []
    for (xf, yf), (xt, yt) in zip(ffcv_eval, torch_eval):
        assert torch.equal(yf, yt) and xf.shape == xt.shape == (20, 3, 32, 32)
        diffs.append((xf - xt).abs().mean().item())
    # Same images, same resize + centre crop; only the resampling filters differ
    # (normalised units; a different image is ~1.0 away).
    assert max(diffs) < 0.15, diffs
    probe = FFCVEvalLoader(data, "train", 32, train_augment=True)
    x, _ = next(iter(probe))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32


def test_multi_crop_views_at_their_own_sizes(data):
    cfg = OmegaConf.merge(data, {"augment": "multi_crop",
                                 "multi_crop": {"n_local": 2, "local_size": 16}})
    loader = FFCVPretrainLoader(cfg, view_augs(cfg), BATCH, seed=0)
    loader.set_epoch(0)
    views, labels = next(iter(loader))
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32), (32, 32), (16, 16), (16, 16)]
    assert all(v.dtype == torch.uint8 for v in views) and labels.shape == (BATCH,)


def test_training_on_ffcv_batches(data, ffcv_views, root):
    """The trainer on data.loader=ffcv: bank init, 2 epochs, milestones, kNN on .beton."""
    from caco.train import Pretrainer

    cfg = _cfg(root, "tracking.enabled=false", "optim.bank_init=true", "eval.knn.every=2")
    trainer = Pretrainer(cfg, root / "runs" / "ffcv")
    summary = trainer.run()
    assert trainer.loader.loader is ffcv_views.loader  # no second compile
    assert summary["status"] == "finished"
    assert (root / "runs" / "ffcv" / "checkpoints" / "epoch_0002.pt").exists()
    # The kNN monitor read the .beton eval loaders (60 val images; 2 epochs on 240 images make
    # no quality bar, so only the range is checked).
    from caco.data.ffcv_loader import _LOADERS

    assert 0 <= summary["train/knn_top1"] <= 100
    assert any(k[0] == "eval" and k[1].endswith("val.beton") for k in _LOADERS)
    state = torch.load(root / "runs" / "ffcv" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
