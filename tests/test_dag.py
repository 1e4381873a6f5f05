"""The evaluation DAG on cluster=local: a real smoke pretraining whose milestones fan out into
kNN, a cached linear probe, a node made to fail and the report, as separate processes, with a
real MLflow store; then the run is relaunched (nothing submitted twice), inspected and retried
with ``launch/dag.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import run_cli

from caco.dag.ledger import EvalLedger

pytestmark = pytest.mark.slow


def _pretrain(root: Path, missing: Path):
    return run_cli(
        "pretrain.py", "experiment=smoke", "dag=smoke", f"output_root={root}", "run_name=dag",
        # A node whose data cannot be found: retried in-process, then reported as failed.
        f"+dag.nodes.broken={{evaluator: knn, when: final, data: {{root: {missing}}}, "
        "resources: {device: cpu, threads: 1}}",
        "dag.nodes.report.needs=[knn,linear,broken]", "eval.knn.random_init_baseline=true",
        timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    missing = root / "fashion_mnist_copy"
    proc = _pretrain(root, missing)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "run_dir": root / "runs" / "dag", "missing": missing,
            "out": proc.stdout + proc.stderr}


def _entries(run_dir: Path) -> dict[tuple[int, str], dict]:
    return {(e["epoch"], e["node"]): e for e in EvalLedger(run_dir).entries()}


def test_every_milestone_fans_out_in_dependency_order(run):
    entries = _entries(run["run_dir"])
    assert sorted(entries) == [(1, "knn"), (1, "report"), (2, "broken"), (2, "knn"),
                               (2, "linear"), (2, "report")]
    for key, e in entries.items():
        expected = "FAILED" if key[1] == "broken" else "COMPLETED"
        assert e["state"] == expected, (key, e)
        assert e["started"] >= e["submitted"]
    for epoch in (1, 2):  # report ran after every other node of its checkpoint
        others = [e["finished"] for (ep, n), e in entries.items() if ep == epoch and
                  n != "report"]
        assert entries[epoch, "report"]["started"] >= max(others)
    assert entries[2, "knn"]["metrics"]["knn_top1"] > 10
    assert entries[2, "linear"]["metrics"]["linear_cached_top1"] > 10
    assert "comes from the DAG's knn node" in run["out"]


def test_a_failing_node_is_retried_then_reported(run):
    e = _entries(run["run_dir"])[2, "broken"]
    assert e["attempts"] == 2 and "not found" in e["error"]  # dag.retries=1: two attempts
    report = json.loads((run["run_dir"] / "evals" / "e0002" / "report.json").read_text())
    assert report["failed"] == ["broken"]
    assert {r["node"]: r["state"] for r in report["nodes"]} == {
        "knn": "COMPLETED", "linear": "COMPLETED", "broken": "FAILED"}
    log = (run["run_dir"] / "dag" / "logs" / "e0002-broken.log").read_text()
    assert "attempt 1/2 failed" in log and "attempt 2/2 failed" in log


def test_child_runs_and_parent_metrics_in_mlflow(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run['root']}/mlflow.db")
    parent_id = json.loads((run["run_dir"] / "tracking.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == ["e0001-knn", "e0001-report", "e0002-broken", "e0002-knn",
                               "e0002-linear", "e0002-report"]
    knn = by_name["e0002-knn"]
    assert knn.data.tags["evaluator"] == "knn" and knn.data.tags["checkpoint_epoch"] == "2"
    assert knn.data.tags["slurm_job_id"] == "none" and knn.data.params["knn.k"] == "20"
    assert by_name["e0002-broken"].info.status == "FAILED"

    def history(name):
        return [(m.step, round(m.value, 4)) for m in client.get_metric_history(parent_id, name)]

    # Once per checkpoint: the DAG's kNN replaced the trainer's own final kNN.
    assert sorted(s for s, _ in history("eval/knn_top1")) == [1, 2]
    assert [s for s, _ in history("eval/knn_top1_random_init")] == [2]
    assert [s for s, _ in history("eval/linear_cached_top1")] == [2]
    assert sorted(history("eval/dag_failed_nodes")) == [(1, 0.0), (2, 1.0)]


def test_the_report_node_draws_the_runs_report_and_logs_it_on_the_pretraining_run(run):
    from mlflow.tracking import MlflowClient

    report = run["run_dir"] / "report"
    summary = json.loads((report / "summary.json").read_text())
    cells = {(c["epoch"], c["node"]): c for c in summary["runs"][0]["cells"]}
    assert cells[2, "broken"]["state"] == "FAILED" and "not found" in cells[2, "broken"]["error"]
    assert cells[2, "knn"]["value"] == _entries(run["run_dir"])[2, "knn"]["metrics"]["knn_top1"]
    assert summary["runs"][0]["history_epochs"] == [1, 2]
    assert [m["epoch"] for m in summary["runs"][0]["milestones"]] == [1, 2]
    page = (report / "index.html").read_text()
    for png in ("eval_metrics.png", "matrix.png", "training.png", "cost.png"):
        assert (report / png).stat().st_size > 5_000, png
    assert page.count("data:image/png;base64,") == 4  # self-contained
    assert "FAILED" in page and "not found" in page  # the failed cell is visible
    assert not (report / "config.yaml").exists()

    client = MlflowClient(f"sqlite:///{run['root']}/mlflow.db")
    info = json.loads((run["run_dir"] / "tracking.json").read_text())
    parent = client.get_run(info["run_id"])
    logged = {a.path for a in client.list_artifacts(info["run_id"], "report")}
    assert {"report/index.html", "report/eval_metrics.png", "report/matrix.png"} <= logged
    note = parent.data.tags["mlflow.note.content"]
    children = {c.info.run_name: c.info.run_id for c in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{info['run_id']}'")}
    link = f"(#/experiments/{parent.info.experiment_id}/runs/{children['e0002-knn']}?workflowType"
    assert link in note
    assert "e0002-broken" in note and "FAILED" in note and "report/index.html" in note
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_report_py_of_a_run_and_of_a_non_run(run, tmp_path):
    proc = run_cli("report.py", str(run["run_dir"]), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "report written to" in proc.stdout and (tmp_path / "r" / "index.html").exists()
    bad = run_cli("report.py", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "not a pretraining run directory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_watch_of_an_ended_run_says_so_and_exits_1_on_a_failed_node(run):
    proc = run_cli("dag.py", "status", str(run["run_dir"]), "--watch", "--interval", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "dag: finished, [####################] 2/2" in lines[0]
    assert "e2: " in lines[0] and "broken FAILED" in lines[0] and "knn ok" in lines[0]
    assert lines[-1] == "everything has ended: something failed (see above)"


def test_relaunch_submits_nothing_twice_and_status_shows_the_ledger(run):
    before = _entries(run["run_dir"])
    again = _pretrain(run["root"], run["missing"])
    assert again.returncode == 0, again.stdout + again.stderr
    after = _entries(run["run_dir"])
    assert {k: (e["job_id"], e["state"], e["submitted"]) for k, e in after.items()} == \
        {k: (e["job_id"], e["state"], e["submitted"]) for k, e in before.items()}

    status = run_cli("dag.py", "status", str(run["run_dir"]))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    # The pretraining run's own line, then the node table.
    assert lines[0].startswith("pretraining: local trainer pid") and "finished" in lines[0]
    assert "epoch 2/2 done" in lines[0]
    assert lines[1].split() == ["epoch", "node", "state", "slurm", "job", "attempts", "result"]
    assert any(line.split()[:3] == ["2", "broken", "FAILED"] for line in lines)
    assert any(line.split()[:3] == ["2", "linear", "COMPLETED"] for line in lines)


def test_retry_resubmits_the_failed_node_and_its_report(run):
    from caco.data.fashion_mnist import resolve_root

    os.symlink(resolve_root(), run["missing"])  # the data is back
    proc = run_cli("dag.py", "retry", str(run["run_dir"]), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = _entries(run["run_dir"])
    assert entries[2, "broken"]["state"] == "COMPLETED"
    assert entries[2, "broken"]["key"].endswith("-r1")
    assert entries[2, "knn"]["attempts"] == 1  # untouched
    report = json.loads((run["run_dir"] / "evals" / "e0002" / "report.json").read_text())
    assert report["failed"] == []


def test_dag_status_of_a_non_run_is_one_message(tmp_path):
    proc = run_cli("dag.py", "status", str(tmp_path))
    assert proc.returncode == 2
    assert "is not a pretraining run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_linear_probe_trains_with_ddp_across_the_nodes_processes(run, tmp_path):
    """A node with tasks: 2 runs as two processes (torch.distributed.run locally, two SLURM
    tasks on a cluster); the reference linear probe trains DDP, rank 0 alone records."""
    from helpers import compose_pretrain
    from omegaconf import OmegaConf

    from caco.dag.executors import LocalExecutor
    from caco.dag.node import NodeJob

    ckpt = run["run_dir"] / "checkpoints" / "epoch_0002.pt"
    data = OmegaConf.to_container(compose_pretrain("experiment=smoke").data, resolve=True)
    entry = EvalLedger(tmp_path).claim(2, "linear", ckpt)
    job = NodeJob(run_dir=str(tmp_path), epoch=2, node="linear", evaluator="linear",
                  checkpoint=str(ckpt), key=entry["key"], data=data, device="cpu", threads=1,
                  retries=0, tasks=2,
                  settings={"protocol": "reference", "epochs": 2, "batch_size": 64,
                            "lr": 0.025, "train_subset": 256, "test_subset": 128,
                            "num_classes": None})
    executor = LocalExecutor(tmp_path)
    executor.submit(job, {}, [])
    assert executor.wait(timeout=600)
    e = EvalLedger(tmp_path).get(2, "linear")
    log = (tmp_path / "dag" / "logs" / "e0002-linear.log").read_text()
    assert e["state"] == "COMPLETED", log
    assert e["metrics"]["processes"] == 2 and 0 <= e["metrics"]["linear_top1"] <= 100
    assert "process group: rank 1 of 2 on " in log and "process group: rank 0 of 2 on " in log
    assert log.count("node linear (epoch 2) completed") == 1  # rank 0 alone records


def _copy_as_new_run(run_dir: Path, dest: Path) -> str:
    """The run's config and checkpoints in a new run directory with its own MLflow run (the
    same weights, another run: what two identical sweep points are)."""
    import shutil

    from caco.tracking import Tracker, prepare_experiment

    dest.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    shutil.copytree(run_dir / "checkpoints", dest / "checkpoints")
    uri = json.loads((run_dir / "tracking.json").read_text())["uri"]
    tracker = Tracker(uri, prepare_experiment(uri, "caco"), dest)
    tracker.start(run_name=dest.name)
    return tracker.run_id


def test_evaluate_backfills_checkpoints_caches_results_and_records_each_run(run, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, root = run["run_dir"], run["root"]
    ask = ("evaluate.py", "eval=knn", f"runs={run_dir}", "eval.knn.k=5", "resources.threads=1")
    first = run_cli(*ask, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    entries = _entries(run_dir)
    assert entries[1, "knn_k5"]["state"] == entries[2, "knn_k5"]["state"] == "COMPLETED"
    assert entries[2, "knn_k5"]["metrics"]["knn_top1"] != entries[2, "knn"]["metrics"]["knn_top1"]
    assert not entries[2, "knn_k5"]["cached"]
    cache = sorted((root / "evals" / "cache").glob("*.json"))
    assert len(cache) == 2

    again = run_cli(*ask, timeout=300)
    said = again.stdout + again.stderr
    assert again.returncode == 0 and said.count("already COMPLETED") == 2, said
    assert _entries(run_dir)[2, "knn_k5"]["finished"] == entries[2, "knn_k5"]["finished"]

    copy = tmp_path / "runs" / "copy"
    copy_id = _copy_as_new_run(run_dir, copy)
    hit = run_cli("evaluate.py", "eval=knn", f"runs={copy}", "eval.knn.k=5",
                  "checkpoints=last", timeout=300)
    assert hit.returncode == 0, hit.stdout + hit.stderr
    assert "cached result, computed nothing" in hit.stdout + hit.stderr
    e = EvalLedger(copy).get(2, "knn_k5")
    assert e["state"] == "COMPLETED" and e["cached"] and EvalLedger(copy).get(1, "knn_k5") is None
    assert e["metrics"]["knn_top1"] == entries[2, "knn_k5"]["metrics"]["knn_top1"]
    metrics = json.loads((copy / "evals" / "e0002" / "knn_k5" / "metrics.json").read_text())
    assert metrics["cached"] == str(cache[0]) or metrics["cached"] == str(cache[1])

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    for parent, steps in ((json.loads((run_dir / "tracking.json").read_text())["run_id"],
                           [1, 2]), (copy_id, [2])):
        history = client.get_metric_history(parent, "eval/knn_k5.knn_top1")
        assert sorted(m.step for m in history) == steps
        children = client.search_runs(
            ["0", client.get_run(parent).info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and attributes.run_name = 'e0002-knn_k5'")
        assert len(children) == 1 and children[0].info.status == "FINISHED"

    forced = run_cli("evaluate.py", "eval=knn", f"runs={copy}", "eval.knn.k=5",
                     "checkpoints=last", "resources.threads=1", "--force", timeout=300)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    e = EvalLedger(copy).get(2, "knn_k5")
    assert not e["cached"] and e["round"] == 1
    assert "cached" not in json.loads(
        (copy / "evals" / "e0002" / "knn_k5" / "metrics.json").read_text())


@pytest.mark.parametrize("args, needle", [
    (["runs=/nonexistent/run"], "is not a pretraining run directory"),
    (["checkpoints=some"], "checkpoints='some': use one of"),
    (["cluster=moon"], "Could not find 'cluster/moon'"),
    ([], "pass checkpoint=<path>"),
])
def test_evaluate_bad_backfill_inputs_are_one_message(run, args, needle):
    given = ["eval=knn", *args]
    if not any(a.startswith("runs=") for a in args) and args:
        given.append(f"runs={run['run_dir']}")
    proc = run_cli("evaluate.py", *given, timeout=120)
    assert proc.returncode == (1 if "cluster=moon" in args else 2), proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert needle in said and "Traceback" not in said


def test_watch_follows_a_training_run_until_it_ends(tmp_path):
    import subprocess
    import sys
    import time

    from helpers import ROOT

    train = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "experiment=smoke", "epochs=4",
         "dag=none", "tracking.enabled=false", f"output_root={tmp_path}", "run_name=live"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "runs" / "live"
    try:
        deadline = time.time() + 120
        while not (run_dir / "lease.json").exists():
            assert time.time() < deadline and train.poll() is None, "the run did not start"
            time.sleep(0.2)
        watch = run_cli("dag.py", "status", str(run_dir), "--watch", "--interval", "0.5",
                        timeout=300)
    finally:
        train.wait(300)
    assert train.returncode == 0
    assert watch.returncode == 0, watch.stdout + watch.stderr
    lines = watch.stdout.splitlines()
    progress = [line.split(", ")[1] for line in lines[:-1]]
    assert len(set(progress)) >= 2, lines  # it refreshed while the run trained
    assert "running" in lines[0] and "finished, [####################] 4/4" in lines[-2]
    assert lines[-1] == "everything has ended: all completed"
