"""A run directory made before the failure-and-recovery work and the renovation (main at
f27bb22, tests/fixtures/old_run) stays usable: dag.py status, dag.py retry with an override,
and a resume that trains one more epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "old_run"
MADE_UNDER = "/tmp/caco-old-run"
DAG = ("dag=smoke", "~dag.nodes.linear", "dag.nodes.report.needs=[knn,broken]",
       "+dag.nodes.broken={evaluator: knn, when: final, data: {root: /nonexistent/fmnist}, "
       "resources: {device: cpu, threads: 1}}")


@pytest.fixture
def old_run(tmp_path) -> Path:
    """The fixture moved to tmp_path (its absolute paths rewritten, as after a move)."""
    shutil.copytree(FIXTURE / "old", tmp_path / "runs" / "old")
    shutil.copyfile(FIXTURE / "mlflow.db", tmp_path / "mlflow.db")
    for path in (tmp_path / "runs").rglob("*"):
        if path.suffix in (".yaml", ".json") and path.is_file():
            path.write_text(path.read_text().replace(MADE_UNDER, str(tmp_path)))
    return tmp_path / "runs" / "old"


def test_status_and_retry_work_on_an_old_run(old_run):
    status = run_cli("dag.py", "status", str(old_run))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "epoch 2/2 done" in lines[0]
    assert any(line.split()[:3] == ["2", "broken", "FAILED"] for line in lines)
    bad = run_cli("dag.py", "retry", str(old_run), "dag.nodes.broken.data.rooot=x")
    assert bad.returncode == 2 and "dag.nodes.broken.data.rooot is not a key" in bad.stderr
    retry = run_cli("dag.py", "retry", str(old_run), "dag.nodes.broken.data.root=null",
                    timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    ledger = json.loads((old_run / "eval_ledger.json").read_text())["entries"]
    assert ledger["0002/broken"]["state"] == "COMPLETED"
    assert ledger["0002/broken"]["key"].endswith("-r1")
    assert ledger["0002/report"]["state"] == "COMPLETED"


def test_an_old_run_resumes(old_run):
    root = old_run.parent.parent
    proc = run_cli("pretrain.py", "experiment=smoke", "epochs=3", *DAG, "run_name=old",
                   f"output_root={root}", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "resuming from" in out and "2 epochs done" in out
    assert (old_run / "checkpoints" / "epoch_0003.pt").exists()
    ledger = json.loads((old_run / "eval_ledger.json").read_text())["entries"]
    assert ledger["0003/knn"]["state"] == "COMPLETED"
    assert ledger["0001/knn"]["job_id"] == "local-e0001-knn"  # untouched, not resubmitted
