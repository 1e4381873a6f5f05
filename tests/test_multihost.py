"""On the multi-host cluster (``local_slurm.sh start --hosts 2 --tracking``): one DDP job across
two hosts, equal to the same run as one node with two tasks; evaluation jobs on both hosts; a
host that dies (the host of rank 1, then the batch host of rank 0) requeues the job, which
resumes to the weights of an undisturbed run; the team's tracking server with authentication.
Required in CI: a missing cluster, host or server FAILS."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_weights, clean_failure, model_state, run_cli
from slurm_utils import (
    cluster_hosts,
    job_ids_from,
    keys_in_sacct,
    require_cluster,
    sacct_states,
    tracking_client,
    tracking_overrides,
    wait_for_jobs,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ("cluster.nodes=2", "cluster.tasks_per_node=1")
ONE_NODE_TWO_TASKS = ("cluster.nodes=1", "cluster.tasks_per_node=2")
RANK_LINE = re.compile(r"process group: rank (\d) of 2 on (\S+) \(([\d.]+)\)")


@pytest.fixture(scope="module")
def hosts() -> list[str]:
    require_cluster()
    found = cluster_hosts()
    if len(found) < 2:
        pytest.fail(f"these tests need a cluster of 2 hosts, found {found}: bash "
                    "launch/local_slurm.sh start --hosts 2 --tracking")
    return found


def _launch(tmp: Path, *args: str, experiment: str = "multihost") -> tuple[str, Path]:
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   "hydra.sweep.subdir=${hydra.job.num}", f"output_root={tmp}",
                   *tracking_overrides(experiment), *args, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    (job,) = job_ids_from(out)
    return job, tmp


def _run_dir(tmp: Path) -> Path:
    (run_dir,) = [p.parent for p in tmp.glob("sweeps/*/*/config.yaml")]
    return run_dir


def _logs(run_dir: Path, job: str) -> dict[str, str]:
    folder = run_dir.parent / ".submitit" / job
    return {p.name: p.read_text() for p in folder.glob("*_log.*")}


def _ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_ledger.json").read_text())["entries"]


def _wait_dag(run_dir: Path) -> dict:
    entries = _ledger(run_dir)
    wait_for_jobs([str(e["job_id"]) for e in entries.values()], 600, [run_dir / "dag"])
    return _ledger(run_dir)


def _node_of(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job],
                         capture_output=True, text=True).stdout.split()
    return out[-1] if out else ""


# ------------------------------------------------------------------ multi-node training
@pytest.fixture(scope="module")
def two_runs(hosts, tmp_path_factory):
    """The same smoke run as 2 nodes x 1 task (with a DAG placed on both hosts) and as
    1 node x 2 tasks, submitted together."""
    h1, h2 = hosts[:2]
    multi = _launch(tmp_path_factory.mktemp("two_nodes"), *TWO_NODES, "dag=smoke",
                    f"+dag.nodes.knn.resources.nodelist={h1}",
                    f"+dag.nodes.linear.resources.nodelist={h2}")
    single = _launch(tmp_path_factory.mktemp("two_tasks"), *ONE_NODE_TWO_TASKS, "dag=none")
    states = wait_for_jobs([multi[0], single[0]], 600, [multi[1], single[1]])
    assert set(states.values()) == {"COMPLETED"}, states
    return {"multi": (multi[0], _run_dir(multi[1])), "single": (single[0], _run_dir(single[1])),
            "hosts": (h1, h2)}


def test_one_ddp_job_runs_across_both_hosts(two_runs, hosts):
    job, run_dir = two_runs["multi"]
    logs = _logs(run_dir, job)
    ranks = {}
    for rank in (0, 1):
        text = logs[f"{job}_{rank}_log.out"]
        lines = [m for m in RANK_LINE.finditer(text)]
        assert len(lines) == 1, text  # each rank logs itself once, in its task's log
        r, host, address = lines[0].groups()
        assert int(r) == rank
        ranks[rank] = (host, address)
        assert host in hosts
    assert ranks[0][0] != ranks[1][0] and ranks[0][1] != ranks[1][1], ranks
    pretrain_log = (run_dir / "pretrain.log").read_text()
    assert sorted(m.group(1) for m in RANK_LINE.finditer(pretrain_log)) == ["0", "1"]
    # Rank 0 alone writes checkpoints and tracks: its host holds the lease, one MLflow run.
    assert json.loads((run_dir / "lease.json").read_text())["host"] == ranks[0][0]
    info = json.loads((run_dir / "tracking.json").read_text())
    client = tracking_client()
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["cluster.nodes"] == "2"
    assert [m.step for m in client.get_metric_history(info["run_id"], "train/loss")] == [1, 2]


def test_two_nodes_train_the_same_weights_as_one_node_with_two_tasks(two_runs):
    """Same ranks, same shards, same gloo all-reduce of two ranks: bit for bit."""
    assert_same_weights(model_state(two_runs["multi"][1] / "checkpoints" / "last.pt"),
                        model_state(two_runs["single"][1] / "checkpoints" / "last.pt"))


def test_evaluations_run_on_both_hosts_and_complete(two_runs):
    run_dir = two_runs["multi"][1]
    entries = _wait_dag(run_dir)
    assert {e["state"] for e in entries.values()} == {"COMPLETED"}, entries
    used = {_node_of(str(e["job_id"])) for e in entries.values()}
    assert set(two_runs["hosts"]) <= used, used
    client = tracking_client()
    parent = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == len(entries)
    assert sorted(m.step for m in client.get_metric_history(parent, "eval/knn_top1")) == [1, 2]


# ------------------------------------------------------------------ a host that dies
NODE_DEATH = ("epochs=5", "data.train_subset=1024", "checkpoint.milestones=[1]",
              "cluster.max_num_timeout=3")


@pytest.fixture(scope="module")
def undisturbed(hosts, tmp_path_factory):
    job, tmp = _launch(tmp_path_factory.mktemp("undisturbed"), *TWO_NODES, *NODE_DEATH,
                       "dag=none")
    assert wait_for_jobs([job], 600, [tmp]) == {job: "COMPLETED"}
    return model_state(_run_dir(tmp) / "checkpoints" / "last.pt")


def _bash(*args: str) -> None:
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("victim", [1, 0])
def test_a_host_that_dies_requeues_the_job_which_resumes_to_equal_weights(
        hosts, tmp_path, undisturbed, victim):
    # Evaluations go to the host that survives, so their DAG must run exactly once.
    job, tmp = _launch(tmp_path, *TWO_NODES, *NODE_DEATH, "dag=smoke", "~dag.nodes.linear",
                       "dag.nodes.report.needs=[knn]")
    deadline = time.time() + 300
    while not list(tmp.glob("sweeps/*/*/checkpoints/epoch_0001.pt")):
        assert time.time() < deadline, "no first milestone"
        time.sleep(0.2)
    run_dir = _run_dir(tmp)
    where = {int(m.group(1)): m.group(2) for text in _logs(run_dir, job).values()
             for m in RANK_LINE.finditer(text)}
    dead = where[victim]
    t_fail = time.time()
    _bash("host-down", dead[len("caco-h"):])
    while "REQUEUED" not in sacct_states(job, duplicates=True) and \
            subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True,
                           text=True).stdout.strip() != "PENDING":
        assert time.time() - t_fail < 180, f"job {job} was not requeued"
        time.sleep(0.5)
    t_requeued = time.time()
    _bash("host-up", dead[len("caco-h"):])
    state = wait_for_jobs([job], 600, [run_dir])[job]
    t_done = time.time()
    assert state == "COMPLETED", state
    text = "".join(_logs(run_dir, job).values())
    assert "a peer was lost" in text and "resuming from" in text
    print(f"host {dead} (rank {victim}) down -> requeued {t_requeued - t_fail:.0f} s -> done "
          f"{t_done - t_fail:.0f} s after the failure")
    assert_same_weights(model_state(run_dir / "checkpoints" / "last.pt"), undisturbed)
    entries = _wait_dag(run_dir)
    assert {e["state"] for e in entries.values()} == {"COMPLETED"}, entries
    for e in entries.values():
        assert keys_in_sacct(e["key"]) == [str(e["job_id"])], e  # exactly once


# ------------------------------------------------------------------ the tracking server
def test_the_tracking_server_refuses_wrong_credentials_before_anything_is_submitted(
        hosts, tmp_path):
    wrong = tmp_path / "creds"
    wrong.write_text("username=caco\npassword=not-the-password\n")
    wrong.chmod(0o600)
    overrides = [o if not o.startswith("tracking.credentials_file=")
                 else f"tracking.credentials_file={wrong}" for o in tracking_overrides()]
    before = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "-S", "2000-01-01"],
                            capture_output=True, text=True).stdout.split()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   f"output_root={tmp_path}", *overrides, timeout=120)
    out = clean_failure(proc, 2, "refused the credentials")
    assert "not-the-password" not in out
    after = subprocess.run(["sacct", "-n", "-X", "-o", "JobID", "-S", "2000-01-01"],
                           capture_output=True, text=True).stdout.split()
    assert after == before


def test_a_loopback_tracking_uri_is_refused_on_a_multi_host_cluster(hosts, tmp_path):
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   f"output_root={tmp_path}", "tracking=server",
                   "tracking.uri=http://127.0.0.1:5077", timeout=120)
    clean_failure(proc, 2, "is a loopback address", f"the cluster's {len(hosts)} compute hosts",
                  "nothing was submitted")
