"""On the real one-node SLURM cluster (launch/local_slurm.sh): sweeps with their evaluation
DAGs, a 2-task DDP job, preemption with USR2 and a plain requeue. Required in CI: a missing
cluster FAILS."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from emulation import emulate_run
from helpers import assert_same_weights, compose_pretrain, model_state, run_cli
from slurm_utils import (
    job_ids_from,
    logs_from,
    require_cluster,
    sacct_states,
    task_pid,
    tracking_client,
    tracking_overrides,
    wait_for_jobs,
)

from caco.dag.ledger import EvalLedger
from caco.slurm_accounting import job_history

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def cluster():
    require_cluster()


def _submit(tmp: Path, *args: str) -> tuple[list[str], list[Path], str]:
    t0 = time.time()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   f"output_root={tmp}", *args, timeout=300, cwd=tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    ids = job_ids_from(out)
    assert ids, out
    return ids, logs_from(out), f"{time.time() - t0:.1f}"


def _run_dirs(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.glob("sweeps/*/*") if (p / "config.yaml").exists())


# A DAG node whose data cannot be found: retried in its job, then reported as failed.
BROKEN = ("+dag.nodes.broken={evaluator: knn, when: final, data: {root: nonexistent_fmnist}, "
          "resources: {gpus: 0, cpus: 1, mem_gb: 1, timeout_min: 5, device: cpu, threads: 1}}",
          "dag.nodes.report.needs=[knn,linear,broken]")


@pytest.fixture(scope="session")
def sweep(cluster, tmp_path_factory):
    """THE shared sweep: `-m cluster=slurm epochs=1,2 experiment=smoke dag=smoke`, as a user
    runs it (returns after submission); then waits for both jobs."""
    tmp = tmp_path_factory.mktemp("sweep")
    ids, logs, _ = _submit(tmp, "epochs=1,2", "dag=smoke", *BROKEN,
                           *tracking_overrides("slurm-sweep"))
    at_return = {j: (sacct_states(j) or ["PENDING"])[-1] for j in ids}
    states = wait_for_jobs(ids, 600, logs)
    return {"tmp": tmp, "ids": ids, "logs": logs, "at_return": at_return, "states": states}


def test_sweep_submits_one_job_per_point_and_returns(sweep):
    assert len(sweep["ids"]) == 2
    # The launcher returned while the jobs were still queued or running.
    assert any(s in ("PENDING", "RUNNING") for s in sweep["at_return"].values()), sweep
    assert set(sweep["states"].values()) == {"COMPLETED"}, (sweep["states"], sweep["logs"])
    # COMPLETED must mean "trained to the end" (a crash once ended COMPLETED too): the trainer
    # logged its last line and nothing raised.
    for out in sweep["logs"]:
        err = out.with_name(out.name.replace("_log.out", "_log.err"))
        assert "run directory: " in out.read_text(), out
        assert "Traceback" not in err.read_text(), err


def test_sweep_points_have_their_checkpoints_and_mlflow_runs(sweep):
    dirs = _run_dirs(sweep["tmp"])
    assert len(dirs) == 2 and ",epochs=1," in dirs[0].name and ",epochs=2," in dirs[1].name
    assert sorted(p.name for p in (dirs[0] / "checkpoints").iterdir()) == [
        "epoch_0001.pt", "last.pt"]
    assert sorted(p.name for p in (dirs[1] / "checkpoints").iterdir()) == [
        "epoch_0001.pt", "epoch_0002.pt", "last.pt"]
    run_ids = [json.loads((d / "tracking.json").read_text())["run_id"] for d in dirs]
    assert len(set(run_ids)) == 2
    client = tracking_client()
    for run_id, epochs in zip(run_ids, (1, 2)):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["epochs"] == str(epochs)
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps == list(range(1, epochs + 1))
        assert run.data.params["cluster.name"] == "slurm"


@pytest.fixture(scope="session")
def sweep_dag(sweep):
    """Every evaluation job the sweep's checkpoints fanned out into, waited for."""
    dirs = _run_dirs(sweep["tmp"])
    ledgers = {d: EvalLedger(d).entries() for d in dirs}
    ids = [str(e["job_id"]) for entries in ledgers.values() for e in entries]
    states = wait_for_jobs(ids, 900, [d / "dag" / "slurm" for d in dirs])
    return {"dirs": dirs, "states": states,
            "ledgers": {d: {(e["epoch"], e["node"]): e for e in EvalLedger(d).entries()}
                        for d in dirs}}


def _sacct_times(job: str) -> tuple[str, str, str]:
    row = job_history(job)[-1]
    return row["submit"], row["start"], row["end"]


def test_each_checkpoint_fans_out_into_slurm_jobs_with_their_dependencies(sweep, sweep_dag):
    two_epochs = sweep_dag["dirs"][1]
    entries = sweep_dag["ledgers"][two_epochs]
    assert sorted(entries) == [(1, "knn"), (1, "report"), (2, "broken"), (2, "knn"),
                               (2, "linear"), (2, "report")]
    assert sorted(sweep_dag["ledgers"][sweep_dag["dirs"][0]]) == [
        (1, "broken"), (1, "knn"), (1, "linear"), (1, "report")]
    for (epoch, node), e in entries.items():
        job = str(e["job_id"])
        want = "FAILED" if node == "broken" else "COMPLETED"
        assert sweep_dag["states"][job] == want, (epoch, node, e)
        assert e["state"] == want
        names = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobName", "-j", job],
                               capture_output=True, text=True).stdout.split()
        assert names == [e["key"]]  # the idempotency key is the job's name
    for epoch in (1, 2):
        report = entries[epoch, "report"]
        script = (two_epochs / "dag" / "slurm" / str(report["job_id"]) /
                  f"{report['job_id']}_submission.sh").read_text()
        needs = [n for (ep, n) in entries if ep == epoch and n != "report"]
        wanted = sorted(str(entries[epoch, n]["job_id"]) for n in needs)
        line = next(x for x in script.splitlines() if "--dependency=" in x)
        kind, ids = line.split("--dependency=")[1].split(":", 1)
        assert kind == "afterany" and sorted(ids.split(":")) == wanted, line
        assert "--kill-on-invalid-dep=yes" in script
        report_start = _sacct_times(str(report["job_id"]))[1]
        for n in needs:  # sacct's ISO times sort as strings
            assert report_start >= _sacct_times(str(entries[epoch, n]["job_id"]))[2]

    # Every checkpoint's jobs were all submitted well within 2 s of it being written.
    import re

    text = "".join(p.read_text() for log in sweep["logs"] for p in log.parent.glob("*_log.*"))
    latencies = [float(x) for x in re.findall(r"submitted ([\d.]+) s after the checkpoint", text)]
    assert len(latencies) == 3 and max(latencies) < 2.0, latencies


def test_slurm_evaluations_are_child_runs_with_parent_metrics(sweep, sweep_dag):
    client = tracking_client()
    run_dir = sweep_dag["dirs"][1]
    parent_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    entries = sweep_dag["ledgers"][run_dir]
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(f"e{ep:04d}-{n}" for ep, n in entries)
    for (epoch, node), e in entries.items():
        tags = by_name[f"e{epoch:04d}-{node}"].data.tags
        assert tags["slurm_job_id"] == str(e["job_id"]) and tags["evaluator"] in (
            "knn", "linear", "report")
    steps = sorted(m.step for m in client.get_metric_history(parent_id, "eval/knn_top1"))
    assert steps == [1, 2]
    assert [m.step for m in client.get_metric_history(parent_id,
                                                      "eval/linear_cached_top1")] == [2]
    failed = {m.step: m.value for m in client.get_metric_history(parent_id,
                                                                  "eval/dag_failed_nodes")}
    assert failed == {1: 0.0, 2: 1.0}


def test_a_failing_evaluation_is_retried_in_its_job_then_reported(sweep_dag):
    run_dir = sweep_dag["dirs"][1]
    e = sweep_dag["ledgers"][run_dir][2, "broken"]
    assert e["attempts"] == 2 and "nonexistent_fmnist" in e["error"]
    report = json.loads((run_dir / "evals" / "e0002" / "report.json").read_text())
    assert report["failed"] == ["broken"]


def test_sweep_report_costs_from_sacct_watch_and_a_backfill_job(sweep, sweep_dag):
    """The sweep's report (cost from sacct), `dag.py status --watch` of the ended sweep, and a
    backfill of the last checkpoint as a SLURM job (cluster=slurm) through the ledger."""
    from caco.dag.admin import run_dirs

    sweep_dir = sweep_dag["dirs"][0].parent
    t0 = time.perf_counter()
    proc = run_cli("report.py", str(sweep_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"report.py of the 2-run SLURM sweep: {time.perf_counter() - t0:.1f} s")
    summary = json.loads((sweep_dir / "report" / "summary.json").read_text())
    assert len(summary["runs"]) == 2
    for run in summary["runs"]:
        assert run["pretraining"]["source"] == "sacct" and run["pretraining"]["cpu_s"] > 0
        assert all(c["wall_s"] is not None for c in run["cells"] if c["state"] == "COMPLETED")
    assert run_dirs(sweep_dir)[0] == sweep_dag["dirs"]  # report/ is not a run directory

    watch = run_cli("dag.py", "status", str(sweep_dir), "--watch", "--interval", "1",
                    timeout=120)
    assert watch.returncode == 1, watch.stdout + watch.stderr  # the broken node failed
    assert watch.stdout.count("COMPLETED (job ") == 2 and "broken FAILED" in watch.stdout

    run_dir = sweep_dag["dirs"][1]
    proc = run_cli("evaluate.py", "eval=knn", f"runs={run_dir}", "checkpoints=last",
                   "cluster=slurm", "eval.knn.k=3", "resources.gpus=0", "resources.cpus=1",
                   "resources.mem_gb=1", "resources.timeout_min=5", "resources.device=cpu",
                   "resources.threads=1", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = EvalLedger(run_dir).get(2, "knn_k3")
    assert entry["backend"] == "slurm" and str(entry["job_id"]).isdigit()
    states = wait_for_jobs([str(entry["job_id"])], 300, [run_dir / "dag" / "slurm"])
    assert states == {str(entry["job_id"]): "COMPLETED"}
    entry = EvalLedger(run_dir).get(2, "knn_k3")
    assert entry["state"] == "COMPLETED" and 0 <= entry["metrics"]["knn_top1"] <= 100


def test_a_submission_interrupted_before_the_ledger_write_is_not_repeated(cluster, tmp_path):
    """Crash between sbatch and the ledger update: the SUBMITTING entry is found by its key."""
    from caco.dag.executors import SlurmExecutor
    from caco.dag.scheduler import DagScheduler

    cfg = compose_pretrain("experiment=smoke", "cluster=slurm", "dag=smoke",
                           f"output_root={tmp_path}")
    run_dir = tmp_path / "runs" / "r"
    ckpt = run_dir / "checkpoints" / "epoch_0001.pt"
    ledger = EvalLedger(run_dir)
    scheduler = DagScheduler(cfg, run_dir)
    entry = ledger.claim(1, "knn", ckpt)
    # What the crashed process did: submitted the job under its key, then died.
    first = SlurmExecutor(run_dir).submit(scheduler._job(scheduler.specs["knn"], str(ckpt), 1,
                                                         entry["key"]), {"cpus": 1}, [])
    subprocess.run(["scontrol", "hold", first], check=True)  # keep it pending
    try:
        done = scheduler.schedule(str(ckpt), 1)
        assert ledger.get(1, "knn")["job_id"] == first  # found, not resubmitted
        assert [e["node"] for e in done] == ["report"]
        named = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "2000-01-01",
                                "--name", entry["key"]], capture_output=True, text=True)
        assert named.stdout.split() == [first]
    finally:
        subprocess.run(["scancel", first, str(ledger.get(1, "report")["job_id"])])


def test_two_task_job_matches_single_process_emulation(cluster, tmp_path):
    args = ("epochs=1", "data.train_subset=128", "optim.bank_init=false",
            "cluster.tasks_per_node=2", "cluster.wait=true", "eval.knn.final=false")
    ids, logs, _ = _submit(tmp_path, *args)
    assert wait_for_jobs(ids, 300, logs) == {ids[0]: "COMPLETED"}
    log_text = "".join(p.read_text() for p in logs[0].parent.glob("*_log.*"))
    assert re.search(r"process group: rank 1 of 2 on \S+ \([\d.]+\), gloo", log_text)
    assert "all 2 ranks hold identical weights and bank" in log_text
    (run_dir,) = _run_dirs(tmp_path)
    ranked = model_state(run_dir / "checkpoints" / "last.pt")
    cfg = compose_pretrain("experiment=smoke", "cluster=slurm", *args[:-2])
    torch.set_num_threads(1)
    ref = emulate_run(cfg, world=2).state_dict()
    # Float summation order alone moves results by ~1e-6 per step; after 4 steps through
    # argmax-chosen positives the ranks still agree with the emulation to about 1e-3.
    for key, value in ref.items():
        if (key.startswith("encoder_q.") and "running" not in key and "num_batches" not in key) \
                or key.startswith("bank."):
            torch.testing.assert_close(ranked[key], value, rtol=1e-2, atol=2e-3, msg=key)


def test_usr2_preemption_and_plain_requeue_resume_to_identical_weights(sweep, tmp_path):
    uninterrupted = model_state(_run_dirs(sweep["tmp"])[1] / "checkpoints" / "last.pt")
    results = {}
    for mode in ("usr2", "requeue"):
        tmp = tmp_path / mode
        tmp.mkdir()
        dag = ("dag=smoke",) if mode == "requeue" else ()
        ids, logs, _ = _submit(tmp, "epochs=2", *dag)
        job = ids[0]
        run_dir = None
        deadline = time.time() + 300
        while run_dir is None or not (run_dir / "checkpoints" / "last.pt").exists() or (
                dag and len(EvalLedger(run_dir).entries()) < 2):
            # (with the DAG: requeue once the first milestone's jobs are submitted)
            assert time.time() < deadline, f"job {job} wrote no checkpoint; logs {logs}"
            dirs = _run_dirs(tmp)
            run_dir = dirs[0] if dirs else None
            time.sleep(0.05)
        if mode == "usr2":  # what SLURM sends before the time limit, or on preemption
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
        else:  # no signal handler runs: the job restarts and must find its checkpoint
            time.sleep(1.0)
            subprocess.run(["scontrol", "requeue", job], check=True)
        assert wait_for_jobs([job], 600, logs) == {job: "COMPLETED"}
        history = sacct_states(job, duplicates=True)
        assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", (history, logs)
        log_text = "".join(p.read_text() for p in logs[0].parent.glob("*_log.*"))
        assert "resuming from" in log_text, logs
        if mode == "usr2":
            assert "stop requested: saving" in log_text
        else:  # the requeued job submitted no evaluation twice
            entries = EvalLedger(run_dir).entries()
            assert sorted((e["epoch"], e["node"]) for e in entries) == [
                (1, "knn"), (1, "report"), (2, "knn"), (2, "linear"), (2, "report")]
            wait_for_jobs([str(e["job_id"]) for e in entries], 600, [run_dir / "dag"])
            for e in entries:
                named = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S",
                                        "2000-01-01", "--name", e["key"]],
                                       capture_output=True, text=True).stdout.split()
                assert named == [str(e["job_id"])], (e, named)
        results[mode] = model_state(run_dir / "checkpoints" / "last.pt")
    for mode, state in results.items():
        assert_same_weights(state, uninterrupted)
        print(mode, "ok")


def test_a_dead_rank_ends_the_job_instead_of_hanging(cluster, tmp_path):
    ids, logs, _ = _submit(tmp_path, "epochs=50", "cluster.tasks_per_node=2",
                           "cluster.max_num_timeout=0", "eval.knn.final=false")
    job = ids[0]
    deadline = time.time() + 300
    while not any("all 2 ranks hold identical" in p.read_text()
                  for p in logs[0].parent.glob("*_log.*")):
        assert time.time() < deadline, f"job {job} did not reach epoch 1; logs {logs}"
        time.sleep(0.2)
    pid = task_pid(job, 1)
    assert pid is not None, "rank 1's process not found"
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    state = wait_for_jobs([job], 240, logs)[job]
    assert state in ("FAILED", "CANCELLED"), (state, logs)
    assert time.time() - t0 < 240
    rank0 = logs[0].parent / f"{job}_0_log.err"
    assert "Error" in rank0.read_text() or "error" in rank0.read_text(), rank0
