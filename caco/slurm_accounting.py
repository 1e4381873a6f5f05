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


def _sacct(args: list[str], timeout: float) -> str:
    cmd = ["sacct", "-n", "-X", "-P", "-o",
           "JobID,JobName,State,Submit,Start,End,ElapsedRaw,NodeList", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmUnavailable(f"sacct: {e}") from None
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


def latest_rows(job_ids: list[str], timeout: float = 8) -> dict[str, dict[str, str]]:
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
