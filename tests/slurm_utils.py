"""Talking to the test cluster: sacct polling with bounded waits and useful failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from caco.slurm_accounting import job_history, wait_final


def require_cluster() -> None:
    """Fail (never skip) when the cluster is not up: CI must run these tests."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"SLURM is not available ({e}); start it: bash launch/local_slurm.sh start "
                    "--hosts 2 --tracking")
    if out.returncode != 0 or not out.stdout.strip():
        pytest.fail("the test SLURM cluster is not running "
                    f"({out.stderr.strip()}); start it: bash launch/local_slurm.sh start "
                    "--hosts 2 --tracking")


def sacct_states(job_id: str, duplicates: bool = False) -> list[str]:
    return [row["state"] for row in job_history(job_id, duplicates=duplicates)]


def wait_for_jobs(job_ids: list[str], timeout: float, logs: list[Path] = ()) -> dict[str, str]:
    """Wait for final states; fail with the job ids and log paths otherwise."""
    try:
        return wait_final(job_ids, timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}; logs: " + ", ".join(map(str, logs)))


def job_ids_from(output: str) -> list[str]:
    return re.findall(r"-> SLURM job (\d+(?:_\d+)?), log", output)


def logs_from(output: str) -> list[Path]:
    return [Path(p) for p in re.findall(r", log (\S+)", output)]


def task_pid(job: str, procid: int) -> int | None:
    """The pid of a job's task (rank) on this machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job}".encode() in env and f"SLURM_PROCID={procid}".encode() in env
                and b"submitit" in cmd):
            return int(proc.name)
    return None


def keys_in_sacct(key: str) -> list[str]:
    """Job ids sacct holds under this name (an idempotency key must name exactly one)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName", "-S", "2000-01-01",
                          "--name", key], capture_output=True, text=True, timeout=30).stdout
    return [line.split("|")[0] for line in out.splitlines() if line.endswith("|" + key)]


STATE = Path(os.environ.get("CACO_SLURM_STATE", "/var/tmp/caco-slurm"))


def cluster_hosts() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                         timeout=30).stdout
    return sorted(set(out.split()))


def cluster_tracking() -> dict:
    """The cluster's tracking server (``local_slurm.sh start --tracking``): uri and
    credentials file; the test process gets the credentials to read what jobs logged."""
    info = STATE / "tracking.json"
    if not info.exists():
        pytest.fail("the cluster has no tracking server; start it with: bash "
                    "launch/local_slurm.sh start --hosts 2 --tracking")
    data = json.loads(info.read_text())
    from caco.tracking import read_credentials

    user, password = read_credentials(data["credentials_file"])
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return data


def tracking_overrides(experiment: str = "caco") -> list[str]:
    t = cluster_tracking()
    return ["tracking=server", f"tracking.uri={t['uri']}",
            f"tracking.credentials_file={t['credentials_file']}",
            f"tracking.experiment={experiment}"]


def tracking_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster_tracking()["uri"])
