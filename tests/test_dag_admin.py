"""``dag.py`` on a real SLURM sweep: status of a sweep directory (also with SLURM unreachable),
cancel, and retry --pretraining of the cancelled sweep point (it resumes)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import run_cli
from slurm_utils import job_ids_from, require_cluster, sacct_states, wait_for_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
INJECT = Path(__file__).parent / "chaos" / "inject"


def _dag(*args: str, env: dict | None = None, timeout: float = 120):
    return run_cli("dag.py", *args, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cancelled(tmp_path_factory):
    """A 2-point sweep with a kNN node per milestone, cancelled once its first evaluations are
    queued. Its steps (0.5 s each) and evaluations (a minute each) are slowed by the chaos
    suite's injection, inherited by the SLURM jobs, so training and evaluations are surely
    still going when the cancel comes, however busy the machine; the retry's jobs run at full
    speed."""
    require_cluster()
    tmp = tmp_path_factory.mktemp("admin")
    slow = {"PYTHONPATH": os.pathsep.join(filter(None, (str(INJECT),
                                                        os.environ.get("PYTHONPATH")))),
            "CACO_FAULTS": "step.slow#1,eval.slow#1"}
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke", "epochs=6",
                   "seed=0,1", "dag=smoke", "~dag.nodes.linear", "dag.nodes.report.needs=[knn]",
                   "checkpoint.milestones=[1,2,3,4,5]", f"output_root={tmp}", timeout=300,
                   cwd=tmp, env=slow)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_ids_from(proc.stdout + proc.stderr)
    (sweep,) = [p for p in (tmp / "sweeps").iterdir()]
    deadline = time.time() + 300
    while not list(sweep.glob("*/eval_ledger.json")):
        assert time.time() < deadline, "no evaluation was scheduled"
        time.sleep(0.2)
    before = _dag("status", str(sweep))
    cancel = _dag("cancel", str(sweep), timeout=180)
    return {"sweep": sweep, "jobs": jobs, "before": before, "cancel": cancel, "tmp": tmp}


def test_status_of_a_sweep_shows_every_run_with_its_job(cancelled):
    status = cancelled["before"]
    assert status.returncode == 0, status.stderr
    blocks = status.stdout.split("\n\n")
    assert len([b for b in blocks if b.startswith("== ")]) == 2
    for block, job in zip(sorted(b for b in blocks if b.startswith("== ")), cancelled["jobs"]):
        lines = block.splitlines()
        assert lines[1].startswith(f"pretraining: SLURM job {job} ")
        assert lines[2].split() == ["epoch", "node", "state", "slurm", "job", "attempts",
                                    "result"] or lines[2] == "no evaluation nodes recorded yet"


def test_cancel_stops_the_pretraining_and_its_evaluations(cancelled):
    out = cancelled["cancel"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cancelled 2 pretraining job(s)" in out.stdout
    for job in cancelled["jobs"]:
        assert sacct_states(job)[-1] == "CANCELLED"
    from mlflow.tracking import MlflowClient

    for run_dir in sorted(p.parent for p in cancelled["sweep"].glob("*/config.yaml")):
        entries = json.loads((run_dir / "eval_ledger.json").read_text())["entries"] \
            if (run_dir / "eval_ledger.json").exists() else {}
        for e in entries.values():
            assert e["state"] in ("COMPLETED", "CANCELLED"), e
            if e["state"] == "CANCELLED":
                assert e["error"] == "cancelled by dag.py cancel"
                assert sacct_states(str(e["job_id"]))[-1] == "CANCELLED"
        info = json.loads((run_dir / "tracking.json").read_text())
        assert MlflowClient(info["uri"]).get_run(info["run_id"]).info.status == "KILLED"


def test_status_with_slurm_unreachable_shows_the_ledger_quickly(cancelled, tmp_path):
    hang = tmp_path / "bin"
    hang.mkdir()
    for tool in ("sacct", "squeue"):
        (hang / tool).write_text("#!/bin/sh\nsleep 60\n")
        (hang / tool).chmod(0o755)
    t0 = time.time()
    status = _dag("status", str(cancelled["sweep"]),
                  env={"PATH": f"{hang}{os.pathsep}{os.environ['PATH']}"})
    assert status.returncode == 0, status.stderr
    assert time.time() - t0 < 10
    assert "unavailable" in status.stdout and "SLURM did not answer" in status.stdout
    rows = [line.split() for line in status.stdout.splitlines() if "CANCELLED" in line]
    assert rows and all(r[3] == "unavailable" for r in rows)
    as_json = _dag("status", str(cancelled["sweep"]), "--json")
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert objects and set(objects[0]) == {"run", "epoch", "node", "state", "job_id",
                                           "attempts", "error"}


def test_retry_pretraining_resubmits_the_cancelled_points_which_resume(cancelled):
    proc = _dag("retry", str(cancelled["sweep"]), "--pretraining", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resubmitted 2 sweep point(s)" in proc.stdout
    new = [m.split()[-1] for m in proc.stderr.splitlines() + proc.stdout.splitlines()
           if "-> SLURM job" in m]
    assert len(new) == 2 and not set(new) & set(cancelled["jobs"])
    states = wait_for_jobs(new, 600, [cancelled["sweep"] / ".submitit"])
    assert set(states.values()) == {"COMPLETED"}, states
    for job in new:
        log = next(Path(cancelled["sweep"], ".submitit").glob(f"{job}/*_0_log.out")).read_text()
        assert "resuming from" in log
    manifest = json.loads((cancelled["sweep"] / "sweep.json").read_text())
    assert [p["jobs"][-1] for p in manifest["points"]] == new
    again = _dag("retry", str(cancelled["sweep"]), "--pretraining")
    assert "resubmitted 0 sweep point(s)" in again.stdout
    subprocess.run(["scancel", *new], capture_output=True)
