"""Tracking outages (a proxy in front of the session's real MLflow server refuses connections and
cuts open ones): at start, mid-run, during evaluations. Training and evaluations go on, every
record is buffered and delivered later exactly once, counted row by row (a resent record would
carry a different timestamp, so a duplicate is a visible second row, not one MLflow drops)."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

from chaos_utils import KNN_DAG, chaos_env, ledger, pretrain_cmd, run_pretrain, same_weights
from helpers import ROOT, run_cli

STEPS_PER_EPOCH = 8  # smoke: 256 images, batch 32


def _tracked(proxy, experiment: str) -> tuple[str, ...]:
    return ("tracking=server", f"tracking.uri={proxy.uri}", f"tracking.experiment={experiment}",
            "tracking.retry_interval_s=1", "tracking.http_timeout=3")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _epoch_done(run_dir: Path, epoch: int):
    def check():
        try:
            return json.loads((run_dir / "progress.json").read_text())["epoch"] >= epoch
        except (OSError, ValueError, KeyError):
            return False
    return check


def _run_while(tmp_path: Path, args: tuple[str, ...], during) -> str:
    """Run the chaos recipe, call ``during(run_dir)`` while it trains; its output."""
    proc = subprocess.Popen(pretrain_cmd(tmp_path, "run", *args), cwd=ROOT, env=chaos_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        during(tmp_path / "runs" / "run")
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    return out


def _rows(client, run_id: str) -> Counter:
    """(metric, step) -> number of rows in the store."""
    run = client.get_run(run_id)
    counts: Counter = Counter()
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            counts[key, m.step] += 1
    return counts


def _check_exactly_once(server_uri: str, run_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server_uri)
    info = json.loads((run_dir / "tracking.json").read_text())
    parent = client.get_run(info["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.arch"] == "resnet18"
    rows = _rows(client, info["run_id"])
    assert set(rows.values()) == {1}, [k for k, n in rows.items() if n > 1]
    steps = {}
    for key, step in rows:
        steps.setdefault(key, []).append(step)
    assert sorted(steps["train/loss"]) == [1, 2, 3]
    assert sorted(steps["train_step/loss"]) == list(range(4, 3 * STEPS_PER_EPOCH + 1, 4))
    assert sorted(steps["init/loss"]) == [0]
    assert sorted(steps["eval/knn_top1"]) == [1, 2, 3]
    assert sorted(steps["eval/dag_failed_nodes"]) == [1, 2, 3]
    children = client.search_runs([info["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{info['run_id']}'")
    entries = ledger(run_dir)
    assert sorted(c.data.tags["idempotency_key"] for c in children) == sorted(
        e["key"] for e in entries.values())
    for child in children:
        assert child.info.status == "FINISHED", child.info
        counts = _rows(client, child.info.run_id)
        assert counts and set(counts.values()) == {1}, counts
        epoch = int(child.data.tags["checkpoint_epoch"])
        assert {step for _, step in counts} == {epoch}
    assert not list(run_dir.rglob("*pending.jsonl")), list(run_dir.rglob("*pending.jsonl"))


def test_backend_down_at_start_and_during_evaluations_then_back(tmp_path, tracking_proxy,
                                                                  mlflow_server, undisturbed):
    """Down from the launch until the second milestone: the run is created late, the first
    checkpoint's evaluations buffer; when it is back every writer delivers by itself."""
    run_dir = tmp_path / "runs" / "run"
    tracking_proxy.down()

    def back_after_epoch_2(run_dir):
        _wait_for(_epoch_done(run_dir, 2), 300, "epoch 2")
        assert json.loads((run_dir / "tracking.json").read_text())["run_id"] is None
        tracking_proxy.up()

    out = _run_while(tmp_path, (*KNN_DAG, *_tracked(tracking_proxy, "chaos-start")),
                     back_after_epoch_2)
    assert "could not reach" in out and "unavailable at start" in out
    same_weights(run_dir, undisturbed)
    _check_exactly_once(mlflow_server.uri, run_dir)


def test_backend_gone_mid_run_a_torn_record_then_sync(tmp_path, tracking_proxy, mlflow_server,
                                                      undisturbed):
    """Gone after epoch 1 until well after the end: the run and every evaluation finish,
    everything is buffered; a torn line (a kill mid-append) neither stops a relaunch nor the
    sync, which then delivers the rest exactly once."""
    run_dir = tmp_path / "runs" / "run"
    args = (*KNN_DAG, *_tracked(tracking_proxy, "chaos-mid"))

    def gone_after_epoch_1(run_dir):
        _wait_for(_epoch_done(run_dir, 1), 300, "epoch 1")
        tracking_proxy.down()

    out = _run_while(tmp_path, args, gone_after_epoch_1)
    assert "buffering to" in out
    same_weights(run_dir, undisturbed)
    assert all(e["state"] == "COMPLETED" for e in ledger(run_dir).values())
    pending = run_dir / "tracking-pending.jsonl"
    assert pending.exists() and list(run_dir.glob("evals/*/*/tracking/*.pending.jsonl"))
    with open(pending, "a") as f:
        f.write('{"kind": "metrics", "run": "self", "metr')  # torn by a kill, no newline

    again = run_pretrain(tmp_path, "run", *args)  # nothing left to train; must not choke
    assert again.returncode == 0, again.stdout + again.stderr
    assert (run_dir / "tracking-pending.jsonl.torn").exists()

    tracking_proxy.up()
    sync = run_cli("sync_tracking.py", str(run_dir), timeout=300)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert "all records sent" in sync.stdout + sync.stderr
    _check_exactly_once(mlflow_server.uri, run_dir)
