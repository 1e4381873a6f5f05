"""Faults on the real SLURM cluster: the scheduler killed between its steps, sbatch failing
(transiently, then for good), an exception inside the training step (one rank, then one of
two), and a rank's process vanishing (a lost peer: the job requeues itself)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chaos_utils import KNN_DAG, RECIPE, chaos_env, ledger
from helpers import ROOT, assert_same_weights, compose_pretrain, model_state
from omegaconf import OmegaConf
from slurm_utils import (
    job_ids_from,
    keys_in_sacct,
    logs_from,
    require_cluster,
    sacct_states,
    task_pid,
    tracking_client,
    tracking_overrides,
    wait_for_jobs,
)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _cluster():
    require_cluster()


def _launch(tmp: Path, *args: str, faults: str = "", env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "-m", "cluster=slurm",
           *RECIPE, f"output_root={tmp}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                          env={**chaos_env(faults), **(env or {})})


def _run_dirs(tmp: Path) -> list[Path]:
    return sorted(p.parent for p in tmp.glob("sweeps/*/*/config.yaml"))


def _wait_dag(run_dir: Path, timeout: float = 600) -> dict:
    entries = ledger(run_dir)
    ids = [str(e["job_id"]) for e in entries.values() if str(e.get("job_id") or "")[:1].isdigit()]
    wait_for_jobs(ids, timeout, [run_dir / "dag"])
    return ledger(run_dir)


# ------------------------------------------------------------------ scheduler killed
@pytest.mark.parametrize("point", ["sched.after_claim", "sched.after_submit"])
def test_a_scheduler_killed_between_its_steps_never_submits_twice(tmp_path, undisturbed, point):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "epoch_0001.pt"
    shutil.copyfile(undisturbed.parent / "epoch_0001.pt", ckpt)
    cfg = compose_pretrain(*RECIPE, *KNN_DAG, "cluster=slurm", f"output_root={tmp_path}",
                           "tracking.enabled=false")
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    driver = ("import sys; from omegaconf import OmegaConf; from pathlib import Path; "
              "from caco.dag.scheduler import DagScheduler; r = Path(sys.argv[1]); "
              "DagScheduler(OmegaConf.load(r / 'config.yaml'), r).schedule(sys.argv[2], 1)")
    proc = subprocess.run([sys.executable, "-c", driver, str(run_dir), str(ckpt)], cwd=ROOT,
                          env=chaos_env(f"{point}#1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9 and f"CHAOS: SIGKILL at {point}" in proc.stderr, proc.stderr
    knn = ledger(run_dir)[1, "knn"]
    assert knn["state"] == "SUBMITTING" and knn["job_id"] is None
    queued = subprocess.run(["squeue", "-h", "-o", "%i", "--name", knn["key"]],
                            capture_output=True, text=True).stdout.split()
    assert len(queued) + len(keys_in_sacct(knn["key"])) >= (
        1 if point == "sched.after_submit" else 0)
    if point == "sched.after_claim":
        assert queued == [] and keys_in_sacct(knn["key"]) == []

    retry = subprocess.run([sys.executable, str(ROOT / "launch" / "dag.py"), "retry",
                            str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    entries = _wait_dag(run_dir)
    assert sorted(entries) == [(1, "knn"), (1, "report")]
    for e in entries.values():
        assert e["state"] == "COMPLETED", e
        assert keys_in_sacct(e["key"]) == [str(e["job_id"])]  # exactly once, under its key


# ------------------------------------------------------------------ sbatch failing
SHIM = """#!/bin/bash
# sbatch as a busy controller answers: evaluation jobs (named caco-...) fail {n} times first.
if grep -q -- '--job-name=caco-' "$1" 2>/dev/null; then
  n=$(cat "{counter}" 2>/dev/null || echo 0)
  if [ "$n" -lt {n} ]; then
    echo $((n + 1)) > "{counter}"
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2
    exit 1
  fi
fi
exec {real} "$@"
"""


def test_sbatch_failures_transient_are_retried_permanent_are_recorded_and_retried(tmp_path):
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    (shim_dir / "sbatch").write_text(SHIM.format(n=2, counter=tmp_path / "failures",
                                                 real=shutil.which("sbatch")))
    (shim_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = _launch(tmp_path, "epochs=1", *KNN_DAG, "tracking.enabled=false",
                   # a second kNN on a partition this cluster does not have: refused for good
                   "+dag.nodes.knn2={evaluator: knn, when: milestones, resources: {cpus: 1, "
                   "mem_gb: 1, timeout_min: 5, device: cpu, threads: 1, partition: nope}}",
                   "dag.nodes.report.needs=[knn,knn2]", "cluster.wait=true", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "its run directory name is" in out, out  # refused at once
    assert not _run_dirs(tmp_path)
    proc = _launch(tmp_path, "epochs=1", *KNN_DAG, "tracking.enabled=false",
                   "+dag.nodes.knn2={evaluator: knn, when: milestones, resources: {cpus: 1, "
                   "mem_gb: 1, timeout_min: 5, device: cpu, threads: 1, partition: nope}}",
                   "dag.nodes.report.needs=[knn,knn2]", "cluster.wait=true",
                   "hydra.sweep.subdir=${hydra.job.num}", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    (run_dir,) = _run_dirs(tmp_path)
    entries = _wait_dag(run_dir)
    assert (tmp_path / "failures").read_text().strip() == "2"  # two transient failures
    log_text = "".join(p.read_text() for p in (run_dir.parent / ".submitit").rglob("*_log.*"))
    assert log_text.count("transient SLURM error") >= 2
    assert entries[1, "knn"]["state"] == "COMPLETED"
    assert keys_in_sacct(entries[1, "knn"]["key"]) == [str(entries[1, "knn"]["job_id"])]
    bad = entries[1, "knn2"]
    assert bad["state"] == "FAILED" and bad["job_id"] is None
    assert "invalid partition" in bad["error"].lower() and \
        "dag.nodes.knn2.resources.partition" in bad["error"]
    assert entries[1, "report"]["state"] == "COMPLETED"
    report = json.loads((run_dir / "evals" / "e0001" / "report.json").read_text())
    assert report["failed"] == ["knn2"]
    status = subprocess.run([sys.executable, str(ROOT / "launch" / "dag.py"), "status",
                             str(run_dir), "--json"], capture_output=True, text=True,
                            timeout=60)
    rows = {r["node"]: r for r in map(json.loads, status.stdout.splitlines())}
    assert rows["knn2"]["state"] == "FAILED" and "partition" in rows["knn2"]["error"]

    retry = subprocess.run([sys.executable, str(ROOT / "launch" / "dag.py"), "retry",
                            str(run_dir), "dag.nodes.knn2.resources.partition=local"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    entries = _wait_dag(run_dir)
    assert {k: e["state"] for k, e in entries.items()} == {
        (1, "knn"): "COMPLETED", (1, "knn2"): "COMPLETED", (1, "report"): "COMPLETED"}
    assert entries[1, "knn2"]["key"].endswith("-r1")
    report = json.loads((run_dir / "evals" / "e0001" / "report.json").read_text())
    assert report["failed"] == []


# ------------------------------------------------------------------ a Python error
def test_an_exception_in_the_training_step_fails_the_job_visibly(tmp_path):
    proc = _launch(tmp_path, "epochs=1", "dag=none", "cluster.wait=true",
                   *tracking_overrides("chaos-slurm"), faults="step.raise#3")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert re.search(r"1 of 1 sweep point\(s\) failed:\n  #0 .*: FAILED, job \d+", out), out
    assert "CHAOS: injected failure inside the training step" in out
    (job,) = job_ids_from(out)
    assert sacct_states(job) == ["FAILED"]  # not COMPLETED, not requeued
    (run_dir,) = _run_dirs(tmp_path)
    err = next((run_dir.parent / ".submitit").rglob("*_0_log.err")).read_text()
    assert "Traceback" in err and "CHAOS: injected failure" in err
    assert "Job completed successfully" not in err
    log = (run_dir / "pretrain.log").read_text()
    assert "Traceback" in log and "pretraining failed: RuntimeError" in log
    info = json.loads((run_dir / "tracking.json").read_text())
    assert tracking_client().get_run(info["run_id"]).info.status == "FAILED"


def test_an_exception_on_one_of_two_ranks_ends_both_quickly(tmp_path):
    t0 = time.time()
    proc = _launch(tmp_path, "epochs=2", "dag=none", "tracking.enabled=false",
                   "cluster.tasks_per_node=2", "cluster.max_num_timeout=3",
                   "cluster.dist_timeout_s=600", "cluster.wait=true", faults="step.raise#3@1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    (job,) = job_ids_from(out)
    assert sacct_states(job, duplicates=True) == ["FAILED"]  # an error is not requeued
    assert time.time() - t0 < 180  # not after dist_timeout_s
    (run_dir,) = _run_dirs(tmp_path)
    logs = {p.name: p.read_text() for p in (run_dir.parent / ".submitit").rglob("*_log.*")}
    rank1 = next(v for k, v in logs.items() if k.endswith("_1_log.err"))
    assert "CHAOS: injected failure" in rank1 and "Traceback" in rank1
    rank0 = next(v for k, v in logs.items() if k.endswith("_0_log.out"))
    assert "rank 1 on" in rank0 and "failed with RuntimeError" in rank0


# ------------------------------------------------------------------ a lost peer
def test_a_rank_that_vanishes_requeues_the_job_which_resumes_to_equal_weights(tmp_path):
    args = ("dag=none", "tracking.enabled=false", "optim.bank_init=false",
            "cluster.tasks_per_node=2", "cluster.max_num_timeout=2")
    (tmp_path / "ref").mkdir()
    ref = _launch(tmp_path / "ref", *args, "cluster.wait=true")  # undisturbed, 2 ranks
    assert ref.returncode == 0, ref.stdout + ref.stderr
    (ref_dir,) = _run_dirs(tmp_path / "ref")

    (tmp_path / "lost").mkdir()
    proc = _launch(tmp_path / "lost", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    (job,) = job_ids_from(out)
    logs = logs_from(out)
    deadline = time.time() + 300
    while not list((tmp_path / "lost").glob("sweeps/*/*/checkpoints/epoch_0001.pt")):
        assert time.time() < deadline, f"no first epoch; logs {logs}"
        time.sleep(0.2)
    pid = task_pid(job, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)  # its process vanishes, as on a dead node
    states = wait_for_jobs([job], 600, logs)
    assert states == {job: "COMPLETED"}, states
    history = sacct_states(job, duplicates=True)
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    (run_dir,) = _run_dirs(tmp_path / "lost")
    text = "".join(p.read_text() for p in (run_dir.parent / ".submitit").rglob("*_log.*"))
    assert "a peer was lost" in text and "resuming from" in text
    assert_same_weights(model_state(run_dir / "checkpoints" / "last.pt"),
                        model_state(ref_dir / "checkpoints" / "last.pt"))
