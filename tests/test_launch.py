"""``launch/pretrain.py`` as a user runs it: config composition, bad input, kill and resume."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    CONFIGS,
    ROOT,
    assert_same_weights,
    clean_failure,
    compose_pretrain,
    model_state,
    run_cli,
)
from hydra.utils import instantiate
from PIL import Image

from caco.data.pretrain import view_augs
from caco.schedules import Schedules
from caco.train import build_model

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_pretrain(f"experiment={experiment}", f"output_root={tmp_path}")
    model = build_model(cfg.model, cfg.seed)
    assert model.bank.W.shape == (cfg.model.dim, cfg.model.bank_size)
    sched = Schedules(lr=cfg.optim.lr, final_lr=cfg.optim.final_lr,
                      memory_lr=cfg.optim.memory_lr, memory_lr_final=cfg.optim.memory_lr_final,
                      m0=cfg.optim.ema_momentum, warmup_epochs=cfg.optim.warmup_epochs,
                      epochs=cfg.epochs, global_batch=cfg.batch_size)
    assert sched.at(cfg.epochs - 1)["lr"] > 0
    n_views = len(view_augs(cfg.data))
    assert n_views == (8 if experiment == "in1k_800ep_multicrop" else 2)
    with_hydra = compose_pretrain(f"experiment={experiment}")
    assert with_hydra.epochs == cfg.epochs


def test_published_recipes_match_the_paper():
    expected = {"in1k_200ep": (200, 1024, "two_view"), "in1k_200ep_b4096": (200, 4096, "two_view"),
                "in1k_800ep": (800, 4096, "two_view"),
                "in1k_800ep_multicrop": (800, 2048, "multi_crop")}
    for name, (epochs, batch, augment) in expected.items():
        cfg = compose_pretrain(f"experiment={name}")
        assert (cfg.epochs, cfg.batch_size, cfg.data.augment) == (epochs, batch, augment)
        assert cfg.model.arch == "resnet50" and cfg.model.bank_size == 65536
        assert (cfg.model.dim, cfg.model.mlp_dim, cfg.model.moco_t, cfg.model.mem_t) == (
            256, 2048, 0.08, 0.08)
        o = cfg.optim
        assert (o.lr, o.final_lr, o.memory_lr, o.memory_lr_final, o.weight_decay) == (
            0.3, 0.003, 3.0, 3.0, 1.5e-6)
        assert (o.warmup_epochs, o.ema_momentum, cfg.model.mem_momentum) == (10, 0.99, 0.9)
    bare = compose_pretrain()
    assert (bare.epochs, bare.batch_size, bare.model.arch, bare.data.name) == (
        200, 1024, "resnet50", "imagenet")
    assert compose_pretrain("experiment=in1k_800ep", "epochs=200").epochs == 200


def test_every_group_option_composes():
    for group in ("data", "model", "optim", "cluster", "tracking", "eval", "dag"):
        for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
            compose_pretrain(f"{group}={option}")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        callbacks = compose("pretrain", return_hydra_config=True).hydra.callbacks
    assert type(instantiate(callbacks.tracking)).__name__ == "PrepareTracking"


def test_help_lists_the_config_groups():
    proc = run_cli("pretrain.py", "--help", timeout=120)
    assert proc.returncode == 0
    for group in ("experiment:", "data:", "model:", "cluster:", "in1k_800ep_multicrop"):
        assert group in proc.stdout


@pytest.mark.parametrize(("args", "code", "needles"), [
    ((), 2, ("data.root is not set", "experiment=demo")),
    (("data.root=/nonexistent/imagenet",), 2, ("/nonexistent/imagenet/train does not exist",)),
    (("experiment=smoke", "data.root=/nonexistent/fmnist"), 2,
     ("Fashion-MNIST idx files not found in /nonexistent/fmnist",)),
    (("experiment=smoke", "epochs=0"), 2, ("epochs=0 must be a positive integer",)),
    (("experiment=smoke", "epochs=-1"), 2, ("epochs=-1 must be a positive integer",)),
    (("experiment=smoke", "batch_size=0"), 2, ("batch_size=0 must be a positive integer",)),
    (("experiment=smoke", "no_such_key=1"), 1, ("Could not override 'no_such_key'",)),
    (("model=vgg16",), 1, ("Could not find 'model/vgg16'", "resnet50")),
    (("experiment=smoke", "device=cuda"), 2, ("device=cuda but no CUDA GPU",)),
])
def test_bad_input_gives_one_clear_message(tmp_path, args, code, needles):
    clean_failure(run_cli("pretrain.py", f"output_root={tmp_path}", *args, timeout=300),
                   code, *needles)


def test_unreadable_image_is_named(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(20):
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), (i * 10, 50, 100)).save(buf, "JPEG")
                (d / f"{i}.jpg").write_bytes(buf.getvalue())
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    proc = run_cli("pretrain.py", "experiment=smoke", "data=imagenet", f"data.root={root}",
                   "data.image_size=32", "data.eval_resize=32", "data.num_workers=1",
                   "batch_size=41", "model.bank_size=41", f"output_root={tmp_path}",
                   timeout=300)
    clean_failure(proc, 2, f"cannot read image {bad}")


def test_corrupt_checkpoint_is_refused_by_name(tmp_path):
    last = tmp_path / "runs" / "r1" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 torn write")
    proc = run_cli("pretrain.py", "experiment=smoke", "run_name=r1", f"output_root={tmp_path}",
                   timeout=300)
    clean_failure(proc, 2, f"checkpoint {last} is corrupt")


@pytest.mark.slow
def test_kill_between_epochs_then_rerun_resumes_to_identical_weights(tmp_path):
    args = ["experiment=smoke", "epochs=3", "eval.knn.final=false", f"output_root={tmp_path}"]
    full = run_cli("pretrain.py", *args, "run_name=full", timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr

    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), *args, "run_name=killed"]
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "epoch_0001.pt").exists():
        assert proc.poll() is None, "run ended before its first milestone"
        assert time.time() < deadline, "no milestone within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = (run_dir / "tracking.json").read_text()
    resumed = run_cli("pretrain.py", *args, "run_name=killed", timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    assert (run_dir / "tracking.json").read_text() == run_id  # the same MLflow run continues
    assert_same_weights(model_state(run_dir / "checkpoints/last.pt"),
                        model_state(tmp_path / "runs/full/checkpoints/last.pt"))
