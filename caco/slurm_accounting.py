"""Reading SLURM accounting (sacct): job states, requeue history, bounded waiting.

Every call has a timeout: with the controller or its database down, callers get
:class:`SlurmUnavailable` within seconds instead of hanging.
"""

from __future__ import annotations

import subprocess
import time

from caco.job_states import SLURM_FINAL

FINAL_STATES = SLURM_FINAL
_FIELDS = ("job_id", "name", "state", "submit", "start", "end", "elapsed_s", "nodes")


class SlurmUnavailable(RuntimeError):
    """sacct could not be run or did not answer."""


def run_command(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a SLURM client command; past ``timeout`` it and anything it started are killed
    (raises SlurmUnavailable), so a hung controller never hangs the caller."""
    import os
    import signal

    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except OSError as e:
        raise SlurmUnavailable(f"{cmd[0]}: {e}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SlurmUnavailable(f"{cmd[0]} did not answer within {timeout:g} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _sacct(args: list[str], timeout: float) -> str:
    cmd = ["sacct", "-n", "-X", "-P", "-o",
           "JobID,JobName,State,Submit,Start,End,ElapsedRaw,NodeList", *args]
    proc = run_command(cmd, timeout)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"sacct: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _rows(out: str) -> list[dict[str, str]]:
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == len(_FIELDS):
            row = dict(zip(_FIELDS, parts))
            row["state"] = row["state"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            rows.append(row)
    return rows


def job_history(job_id: str, *, duplicates: bool = False,
                timeout: float = 30) -> list[dict[str, str]]:
    """sacct rows of one job (allocation lines only), oldest first; with ``duplicates`` a
    requeued job shows each of its runs."""
    return _rows(_sacct((["-D"] if duplicates else []) + ["-j", job_id], timeout))


def job_state(job_id: str) -> str:
    rows = job_history(job_id)
    return rows[-1]["state"] if rows else "UNKNOWN"


def latest_rows(job_ids: list[str], timeout: float = 5) -> dict[str, dict[str, str]]:
    """The latest sacct row of each job, in one call (raises SlurmUnavailable)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    out: dict[str, dict[str, str]] = {}
    for row in _rows(_sacct(["-S", "2000-01-01", "-j", ",".join(ids)], timeout)):
        out[row["job_id"]] = row
    return out


def wait_final(job_ids: list[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
    """Poll until every job is in a final state; returns the states (raises TimeoutError)."""
    deadline = time.time() + timeout
    while True:
        states = {j: job_state(j) for j in job_ids}
        if all(s in FINAL_STATES for s in states.values()):
            return states
        if time.time() > deadline:
            raise TimeoutError(f"jobs not finished within {timeout:.0f} s: {states}")
        time.sleep(poll)


def job_costs(job_ids: list[str], timeout: float = 10) -> dict[str, dict[str, float]]:
    """Per job: wall seconds, CPU-seconds and GPU-seconds over all its runs (a requeued job
    counts every run), from sacct's allocation rows (raises SlurmUnavailable)."""
    ids = sorted({str(j) for j in job_ids if j and str(j)[:1].isdigit()})
    if not ids:
        return {}
    proc = run_command(["sacct", "-n", "-X", "-D", "-P", "-S", "2000-01-01", "-o",
                        "JobID,ElapsedRaw,AllocCPUS,AllocTRES", "-j", ",".join(ids)], timeout)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"sacct: {proc.stderr.strip() or proc.returncode}")
    out: dict[str, dict[str, float]] = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        job, elapsed, cpus, tres = parts
        gpus = 0
        for item in tres.split(","):
            key, _, value = item.partition("=")
            if key == "gres/gpu" and value.isdigit():
                gpus = int(value)
        cost = out.setdefault(job, {"wall_s": 0.0, "cpu_s": 0.0, "gpu_s": 0.0, "runs": 0})
        seconds = float(elapsed)
        cost["wall_s"] += seconds
        cost["cpu_s"] += seconds * int(cpus or 0)
        cost["gpu_s"] += seconds * gpus
        cost["runs"] += 1
    return out
