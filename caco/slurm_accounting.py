"""Reading SLURM accounting (sacct): job states, requeue history, bounded waiting."""

from __future__ import annotations

import subprocess
import time

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                          "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


def job_history(job_id: str, *, duplicates: bool = False) -> list[dict[str, str]]:
    """sacct rows of one job (allocation lines only): JobID, State, Submit, Start, End.

    With ``duplicates`` a requeued job shows each of its runs, oldest first.
    """
    cmd = ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Submit,Start,End", "-j", job_id]
    if duplicates:
        cmd.insert(1, "-D")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    keys = ("job_id", "state", "submit", "start", "end")
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == len(keys):
            row = dict(zip(keys, parts))
            row["state"] = row["state"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            rows.append(row)
    return rows


def job_state(job_id: str) -> str:
    rows = job_history(job_id)
    return rows[-1]["state"] if rows else "UNKNOWN"


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
