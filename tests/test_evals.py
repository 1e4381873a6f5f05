"""Evaluators on real checkpoints: kNN and linear probe by hand, our and the authors' layout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_pretrain, run_cli

from caco.checkpoint import model_from_checkpoint
from caco.train import Pretrainer
from evals.linear import LARC


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    cfg = compose_pretrain("experiment=smoke", "epochs=1", "tracking.enabled=false",
                           "eval.knn.final=false", f"output_root={root}")
    Pretrainer(cfg, root / "run").run()
    ours = root / "run" / "checkpoints" / "epoch_0001.pt"
    model, _ = model_from_checkpoint(ours)
    state = {f"module.{k}": v for k, v in model.state_dict().items()
             if k.startswith(("encoder_q.", "encoder_k."))}
    reference = root / "checkpoint_0001.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state,
                "Memory_Bank": {"W": model.bank.W, "v": model.bank.V}}, reference)
    return ours, reference


def test_larc_scales_each_parameter_by_its_trust_ratio():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    start = w.detach().clone()
    opt = LARC(torch.optim.SGD([w], lr=0.5, momentum=0.9, weight_decay=0.1))
    g = torch.randn(4, 3)
    w.grad = g.clone()
    opt.step()
    rate = 0.001 * start.norm() / (g.norm() + 0.1 * start.norm() + 1e-8)
    torch.testing.assert_close(w.detach(), start - 0.5 * rate * (g + 0.1 * start))
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after the step


def test_reference_layout_rebuilds_the_same_encoder(smoke_checkpoint):
    ours, reference = smoke_checkpoint
    a, info_a = model_from_checkpoint(ours)
    b, info_b = model_from_checkpoint(reference)
    assert info_a["format"] == "caco-toolkit-1" and info_b["format"] == "reference"
    assert (b.encoder_q.conv1.kernel_size, b.bank.W.shape) == ((3, 3), a.bank.W.shape)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_knn_by_hand_gives_the_same_number_for_both_layouts(smoke_checkpoint, tmp_path):
    ours, reference = smoke_checkpoint
    common = ["eval=knn", "eval.knn.train_subset=1000", "eval.knn.test_subset=500",
              f"output_root={tmp_path}"]
    a = run_cli("evaluate.py", f"checkpoint={ours}", *common)
    assert a.returncode == 0, a.stdout + a.stderr
    b = run_cli("evaluate.py", f"checkpoint={reference}", "data=fashion_mnist", *common)
    assert b.returncode == 0, b.stdout + b.stderr
    results = [json.loads(p.read_text())
               for p in (tmp_path / "evals" / "knn").glob("*/metrics.json")]
    assert len(results) == 2
    assert results[0]["knn_top1"] == results[1]["knn_top1"]
    assert 10 < results[0]["knn_top1"] <= 100


def test_linear_probe_cached_learns_and_reference_protocol_runs(smoke_checkpoint, tmp_path):
    from omegaconf import OmegaConf

    from evals import linear

    ours, _ = smoke_checkpoint
    cfg = OmegaConf.create({"device": "cpu", "data": None, "eval": {"linear": {
        "protocol": "cached", "epochs": 20, "batch_size": 256, "lr": 20.0,
        "train_subset": 2000, "test_subset": 500, "num_classes": None}}})
    fast = linear.evaluate(ours, cfg)
    assert fast["linear_cached_top1"] > 40 and fast["epoch"] == 1
    cfg.eval.linear.protocol = "reference"
    cfg.eval.linear.epochs = 1
    ref = linear.evaluate(ours, cfg)
    assert 0 <= ref["linear_top1"] <= 100 and ref["linear_top5"] >= ref["linear_top1"]


def test_evaluate_bad_inputs(smoke_checkpoint, tmp_path):
    _, reference = smoke_checkpoint
    missing = run_cli("evaluate.py", "eval=knn", f"checkpoint={tmp_path}/nope.pt",
                      f"output_root={tmp_path}")
    assert missing.returncode == 2 and "does not exist" in missing.stdout + missing.stderr
    no_data = run_cli("evaluate.py", "eval=knn", f"checkpoint={reference}",
                      f"output_root={tmp_path}")
    out = no_data.stdout + no_data.stderr
    assert no_data.returncode == 2 and "does not record its dataset" in out
    assert "Traceback" not in out
