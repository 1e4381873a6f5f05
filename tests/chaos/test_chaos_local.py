"""cluster=local under stress: two trainers on one run directory, and Ctrl-C while evaluations
run (then a relaunch that runs them again)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from chaos_utils import KNN_DAG, chaos_env, ledger, pretrain_cmd, run_pretrain, same_weights
from helpers import ROOT

from caco.processes import alive


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path, undisturbed):
    run_dir = tmp_path / "runs" / "run"
    first = subprocess.Popen(pretrain_cmd(tmp_path, "run", "dag=none"), cwd=ROOT,
                             env=chaos_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        _wait_for(lambda: (run_dir / "lease.json").exists(), 120, "the first trainer's lease")
        t0 = time.time()
        second = run_pretrain(tmp_path, "run", "dag=none", timeout=120)
        out = second.stdout + second.stderr
        assert second.returncode == 2, out
        assert "Traceback" not in out
        assert (f"run directory {run_dir} is in use by another trainer (host "
                f"{socket.gethostname()}, pid {first.pid}") in out
        assert time.time() - t0 < 60
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    same_weights(run_dir, undisturbed)  # the first one was not disturbed


def test_ctrl_c_during_local_evaluations_stops_them_cleanly_and_a_relaunch_runs_them(
        tmp_path, undisturbed):
    run_dir = tmp_path / "runs" / "run"
    # A kNN slow enough to be caught running (a larger memory than the smoke recipe's).
    slow = ("eval.knn.train_subset=6000",)
    # As from a terminal: Ctrl-C's SIGINT is not ignored (a shell's `cmd &` ignores it in
    # what it starts, and Python then keeps it ignored).
    proc = subprocess.Popen(pretrain_cmd(tmp_path, "run", *KNN_DAG, *slow), cwd=ROOT,
                            env=chaos_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def running():
        if not (run_dir / "eval_ledger.json").exists():
            return None
        return [e for e in ledger(run_dir).values() if e["state"] == "RUNNING"
                and e.get("process")]

    try:
        busy = _wait_for(running, 240, "an evaluation to run")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    assert "interrupted (Ctrl-C)" in out
    for e in busy:  # no orphan: the node processes are gone
        assert _wait_for(lambda e=e: alive(e["process"]) is False, 30, "the node to end")
    stopped = {k: e for k, e in ledger(run_dir).items() if e.get("interrupted")}
    assert stopped and all(e["state"] == "CANCELLED" for e in stopped.values()), stopped
    assert {(e["epoch"], e["node"]) for e in busy} <= set(stopped)
    assert not [e for e in ledger(run_dir).values() if e["state"] in ("RUNNING", "SUBMITTED")]

    again = run_pretrain(tmp_path, "run", *KNN_DAG, *slow)
    assert again.returncode == 0, again.stdout + again.stderr
    entries = ledger(run_dir)
    assert {k: e["state"] for k, e in entries.items()} == {k: "COMPLETED" for k in entries}
    for key in stopped:  # run again under a new key (a new round)
        assert entries[key]["key"] != stopped[key]["key"]
    assert sorted(k for k in entries) == [(e, n) for e in (1, 2, 3) for n in ("knn", "report")]
    same_weights(run_dir, undisturbed)
    info = json.loads((run_dir / "tracking.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["uri"])
    children = client.search_runs([info["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{info['run_id']}'")
    by_key = {c.data.tags["idempotency_key"]: c.info.status for c in children}
    for key, e in stopped.items():  # an interrupted node's run (if it got one) says so
        state_file = run_dir / "evals" / f"e{key[0]:04d}" / key[1] / "tracking" / \
            f"{e['key']}.json"
        if state_file.exists():
            assert by_key[e["key"]] == "KILLED", (key, by_key)
        else:
            assert e["key"] not in by_key
    assert sorted(by_key[e["key"]] for e in entries.values()) == ["FINISHED"] * len(entries)


def test_sigterm_of_a_local_run_checkpoints_stops_truthfully_and_a_relaunch_resumes(
        tmp_path, undisturbed):
    """``kill <trainer>`` (a container stop, ``timeout``): not a death where it stood, but a
    stop at the next poll with last.pt saved, exit 143, the MLflow run KILLED (not RUNNING
    for ever), its evaluations stopped; the same command with the same run_name resumes it."""
    run_dir = tmp_path / "runs" / "run"
    slow = ("eval.knn.train_subset=6000",)
    proc = subprocess.Popen(pretrain_cmd(tmp_path, "run", *KNN_DAG, *slow), cwd=ROOT,
                            env=chaos_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "epoch_0001.pt").exists(), 240,
                  "the first milestone")
        proc.send_signal(signal.SIGTERM)  # the trainer alone, as `kill PID` does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    assert "received SIGTERM: will checkpoint after this step and stop" in out
    assert "stopped by SIGTERM at epoch" in out and "run_name=run" in out
    assert "Traceback" not in out
    progress = json.loads((run_dir / "progress.json").read_text())
    assert 1 <= progress["epoch"] < 3, progress  # it stopped, it did not finish
    lease = json.loads((run_dir / "lease.json").read_text())
    assert lease.get("released") and lease.get("status") == "stopped", lease
    assert not [e for e in ledger(run_dir).values()
                if e["state"] in ("RUNNING", "SUBMITTED", "SUBMITTING")]
    for e in ledger(run_dir).values():
        if e.get("process"):
            assert _wait_for(lambda e=e: alive(e["process"]) is False, 30, "the node to end")

    info = json.loads((run_dir / "tracking.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["uri"])
    assert client.get_run(info["run_id"]).info.status == "KILLED"

    again = run_pretrain(tmp_path, "run", *KNN_DAG, *slow)
    assert again.returncode == 0, again.stdout + again.stderr
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == info["run_id"]
    entries = ledger(run_dir)
    assert sorted(entries) == [(e, n) for e in (1, 2, 3) for n in ("knn", "report")]
    assert {e["state"] for e in entries.values()} == {"COMPLETED"}
    same_weights(run_dir, undisturbed)
