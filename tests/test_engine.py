"""The training engine in-process: checkpoints, exact resume, tracking records."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_weights, compose_pretrain, model_state

from caco.errors import ConfigError
from caco.train import Pretrainer, validate

SMOKE = ("experiment=smoke", "log_every_steps=0", "eval.knn.final=false")


def _cfg(tmp_path, *extra):
    return compose_pretrain(*SMOKE, f"output_root={tmp_path}", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One complete 3-epoch smoke run that the resume tests compare against."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = _cfg(root, "epochs=3", "tracking.enabled=false")
    run_dir = root / "runs" / "full"
    summary = Pretrainer(cfg, run_dir).run()
    assert summary["status"] == "finished"
    return run_dir


def test_checkpoint_layout_and_milestones(uninterrupted):
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    ckpt = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step_in_epoch"] == 0
    assert {"model", "optimizer", "rng", "config", "schedules", "data_seed",
            "mlflow_run_id"} <= set(ckpt)
    assert ckpt["config"]["model"]["arch"] == "resnet18"
    assert "bank.W" in ckpt["model"] and "encoder_k.fc.6.weight" in ckpt["model"]
    assert_same_weights(ckpt["model"], model_state(uninterrupted / "checkpoints/epoch_0003.pt"))
    assert (uninterrupted / "config.yaml").exists()


def test_train_history_has_one_line_per_epoch(uninterrupted):
    from caco.report.collect import read_history

    lines = (uninterrupted / "train_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    rows = read_history(uninterrupted)
    for row in rows:
        assert row["train/loss"] > 0 and row["train/images_per_sec"] > 0
        assert row["world"] == 1 and row["device"] == "cpu" and row["threads"] >= 1
    assert rows[0]["train/lr"] != rows[-1]["train/lr"]  # the schedule, as trained


def test_weights_digest_follows_the_weights_not_the_file(uninterrupted, tmp_path):
    from caco.checkpoint import weights_digest

    ckpts = uninterrupted / "checkpoints"
    assert weights_digest(ckpts / "last.pt") == weights_digest(ckpts / "epoch_0003.pt")
    assert weights_digest(ckpts / "epoch_0002.pt") != weights_digest(ckpts / "epoch_0003.pt")
    ckpt = torch.load(ckpts / "last.pt", weights_only=True)
    ckpt["mlflow_run_id"], ckpt["optimizer"] = "another-run", {}  # same weights, other run
    torch.save(ckpt, tmp_path / "copy.pt")
    assert weights_digest(tmp_path / "copy.pt") == weights_digest(ckpts / "last.pt")
    ckpt["model"]["bank.W"][0, 0] += 1e-6
    torch.save(ckpt, tmp_path / "changed.pt")
    assert weights_digest(tmp_path / "changed.pt") != weights_digest(ckpts / "last.pt")


def test_stop_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    cfg = _cfg(tmp_path, "epochs=3", "tracking.enabled=false", "stop_poll_steps=1")
    run_dir = tmp_path / "runs" / "stopped"
    calls = {"n": 0}

    def stop_in_second_epoch():
        calls["n"] += 1
        # Polled once after the bank initialisation pass, after every step but an epoch's
        # last (8 an epoch), after every epoch but the last: stop in epoch 2 after step 3.
        return calls["n"] == 1 + 7 + 1 + 3

    first = Pretrainer(cfg, run_dir, should_stop=stop_in_second_epoch).run()
    assert first["status"] == "stopped"
    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 3)
    second = Pretrainer(cfg, run_dir).run()
    assert second["status"] == "finished"
    assert_same_weights(model_state(run_dir / "checkpoints/last.pt"),
                        model_state(uninterrupted / "checkpoints/last.pt"))
    from caco.report.collect import read_history

    with open(run_dir / "train_history.jsonl", "a") as f:
        f.write('{"epoch": 3, "train/lo')  # torn by a kill mid-write: skipped
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2, 3]


def test_a_stop_request_is_polled_every_stop_poll_steps(tmp_path):
    """A poll waits for the device (and is a collective with ranks): only every N steps."""
    polls = []
    cfg = _cfg(tmp_path, "epochs=2", "tracking.enabled=false", "stop_poll_steps=3")
    run_dir = tmp_path / "runs" / "polled"
    out = Pretrainer(cfg, run_dir, should_stop=lambda: polls.append(1) or len(polls) > 1).run()
    assert out["status"] == "stopped" and len(polls) == 2  # after the bank init, at step 3
    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3)


def test_a_stop_request_at_an_epoch_end_stops_there(tmp_path):
    polls = []
    cfg = _cfg(tmp_path, "epochs=3", "tracking.enabled=false", "stop_poll_steps=100")
    run_dir = tmp_path / "runs" / "at_end"
    out = Pretrainer(cfg, run_dir, should_stop=lambda: polls.append(1) or len(polls) > 1).run()
    assert out["status"] == "stopped" and len(polls) == 2
    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 0)


def test_resume_refuses_a_different_architecture(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    Pretrainer(_cfg(tmp_path, "epochs=1", "tracking.enabled=false"), run_dir).run()
    cfg = _cfg(tmp_path, "epochs=2", "tracking.enabled=false", "model.width=16",
               "model.bank_size=128")
    with pytest.raises(ConfigError, match=r"model\.bank_size: checkpoint 256 vs now 128.*"
                                          r"model\.width: checkpoint 8 vs now 16"):
        Pretrainer(cfg, run_dir).run()
    # A harmless change (logging) resumes fine and trains the remaining epoch.
    out = Pretrainer(_cfg(tmp_path, "epochs=2", "tracking.enabled=false",
                          "log_every_steps=2"), run_dir).run()
    assert out["status"] == "finished"


def test_tracking_records_params_metrics_tags_and_artifact(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, "epochs=2", "eval.knn.final=true", "eval.knn.every=1",
               "log_every_steps=4")
    run_dir = tmp_path / "runs" / "tracked"
    summary = Pretrainer(cfg, run_dir).run()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model.arch"] == "resnet18"
    assert run.data.params["batch_size"] == "32"
    assert run.data.params["eval.knn.k"] == "20"
    for key in ("train/loss", "train/lr", "train/memory_lr", "train/ema_momentum",
                "train/positive_prob", "train/images_per_sec", "train/positive_columns_frac"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2], key
    assert len(client.get_metric_history(run.info.run_id, "train_step/loss")) == 4
    monitor = client.get_metric_history(run.info.run_id, "train/knn_top1")
    assert [m.step for m in monitor] == [1, 2]
    assert 0 <= monitor[-1].value <= 100
    # The trainer trains: the run's kNN results (eval/*) come from the evaluation DAG.
    assert not [k for k in run.data.metrics if k.startswith("eval/")]
    assert run.data.tags["host"] and run.data.tags["git_commit"]
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "caco"


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_checkpoint(tmp_path):
    from caco.errors import TrainingDiverged

    run_dir = tmp_path / "runs" / "nan"
    cfg = _cfg(tmp_path, "epochs=1", "tracking.enabled=false")
    Pretrainer(cfg, run_dir).run()
    good = model_state(run_dir / "checkpoints/last.pt")
    cfg = _cfg(tmp_path, "epochs=2", "tracking.enabled=false", "optim.lr=1e30",
               "optim.memory_lr=1e30")
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2.*last good "
                                               r"checkpoint is .*last\.pt"):
        Pretrainer(cfg, run_dir).run()
    assert_same_weights(good, model_state(run_dir / "checkpoints/last.pt"))


@pytest.mark.parametrize(("overrides", "match"), [
    (("epochs=0",), "epochs=0 must be a positive integer"),
    (("epochs=-3",), "epochs=-3 must be a positive integer"),
    (("batch_size=0",), "batch_size=0 must be a positive integer"),
])
def test_bad_numbers_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(tmp_path, *overrides), world=1)


def test_batch_must_fit_the_world_size(tmp_path):
    with pytest.raises(ConfigError, match="smaller than the world size 4"):
        validate(_cfg(tmp_path, "batch_size=2"), world=4)
    with pytest.raises(ConfigError, match="not divisible by the world size 4"):
        validate(_cfg(tmp_path, "batch_size=30"), world=4)


def test_a_checkpoint_write_that_fails_in_the_background_fails_the_run(tmp_path, monkeypatch):
    """last.pt is written in a thread while the next epoch trains: its failure still ends
    the run with an error naming the file (not a silent loss of checkpoints)."""
    import caco.checkpoint as ck
    from caco.checkpoint import CheckpointError

    real, calls = ck.save_last, []

    def fail_the_second(payload, path):
        calls.append(payload["epoch"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(payload, path)

    monkeypatch.setattr(ck, "save_last", fail_the_second)
    run_dir = tmp_path / "runs" / "full_disk"
    with pytest.raises(CheckpointError, match=r"writing .*last\.pt failed: .*No space left"):
        Pretrainer(_cfg(tmp_path, "epochs=3", "tracking.enabled=false"), run_dir).run()
    assert calls == [0, 1]  # the bank init's, then epoch 1's (failed): nothing after it
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["epoch"] == 0


def test_prefetching_one_batch_ahead_trains_the_same_weights(tmp_path, uninterrupted):
    """The prefetcher's look-ahead with the CPU's null stream (on CUDA: a side stream), and a
    stop mid-epoch under it: bit for bit the run without it."""
    cfg = _cfg(tmp_path, "epochs=3", "tracking.enabled=false", "prefetch=true",
               "stop_poll_steps=1")
    run_dir = tmp_path / "runs" / "prefetched"
    calls = {"n": 0}

    def stop_once():
        calls["n"] += 1
        return calls["n"] == 1 + 7 + 1 + 3

    assert Pretrainer(cfg, run_dir, should_stop=stop_once).run()["status"] == "stopped"
    assert Pretrainer(cfg, run_dir).run()["status"] == "finished"
    assert_same_weights(model_state(run_dir / "checkpoints/last.pt"),
                        model_state(uninterrupted / "checkpoints/last.pt"))


def test_a_bad_prefetch_value_is_named(tmp_path):
    from caco.runtime import resolve_runtime

    with pytest.raises(ConfigError, match=r"prefetch='sometimes': use auto, true or false"):
        resolve_runtime(_cfg(tmp_path, "prefetch=sometimes"))
