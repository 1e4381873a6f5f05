"""Talking to the one-node test cluster: sacct polling with bounded waits and useful failures."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def require_cluster() -> None:
    """Fail (never skip) when the cluster is not up: CI must run these tests."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"SLURM is not available ({e}); start it: bash launch/local_slurm.sh start")
    if out.returncode != 0 or not out.stdout.strip():
        pytest.fail("the one-node SLURM cluster is not running "
                    f"({out.stderr.strip()}); start it: bash launch/local_slurm.sh start")


def sacct_states(job_id: str, duplicates: bool = False) -> list[str]:
    cmd = ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id]
    if duplicates:
        cmd.insert(1, "-D")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    return [line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line]


def wait_for_jobs(job_ids: list[str], timeout: float, logs: list[Path] = ()) -> dict[str, str]:
    """Poll sacct until every job reached a final state; fail with ids and logs otherwise."""
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = {j: (sacct_states(j) or ["UNKNOWN"])[-1] for j in job_ids}
        if all(s in FINAL for s in states.values()):
            return states
        time.sleep(1)
    pytest.fail(f"jobs not finished within {timeout:.0f} s: {states}; logs: "
                + ", ".join(map(str, logs)))
    return states


def job_ids_from(output: str) -> list[str]:
    return re.findall(r"-> SLURM job (\d+(?:_\d+)?), log", output)


def logs_from(output: str) -> list[Path]:
    return [Path(p) for p in re.findall(r", log (\S+)", output)]
