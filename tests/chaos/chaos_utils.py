"""What the chaos tests share: runs with injected faults, and the invariants they check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, assert_same_weights, model_state

INJECT = Path(__file__).parent / "inject"
# The recipe every chaos run trains (3 epochs, milestones 1, 2 and 3 on the smoke data).
RECIPE = ("experiment=smoke", "epochs=3", "eval.knn.final=false", "log_every_steps=4")
# A light DAG: kNN on every milestone, then the report.
KNN_DAG = ("dag=smoke", "~dag.nodes.linear", "dag.nodes.report.needs=[knn]")


def chaos_env(faults: str = "", **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(INJECT), env.get("PYTHONPATH")) if p)
    env["CACO_FAULTS"] = faults
    return env


def pretrain_cmd(root: Path, run_name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), *RECIPE,
            f"output_root={root}", f"run_name={run_name}", *overrides]


def run_pretrain(root: Path, run_name: str, *overrides: str, faults: str = "",
                 timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cmd(root, run_name, *overrides), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=chaos_env(faults),
                          **popen)


def killed(proc: subprocess.CompletedProcess, point: str) -> None:
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert f"CHAOS: SIGKILL at {point}" in proc.stderr, proc.stderr


def same_weights(run_dir: Path, reference: Path) -> None:
    assert_same_weights(model_state(run_dir / "checkpoints" / "last.pt"),
                        model_state(reference))


def ledger(run_dir: Path) -> dict[tuple[int, str], dict]:
    data = json.loads((run_dir / "eval_ledger.json").read_text())
    return {(e["epoch"], e["node"]): e for e in data["entries"].values()}


def history(run_dir: Path) -> list[dict]:
    data = json.loads((run_dir / "eval_ledger.json").read_text())
    return data.get("history", [])
