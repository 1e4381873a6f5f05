"""One vocabulary of job states: the evaluation ledger's, SLURM's, and how one maps to the other.

Ledger states (upper case, as ``eval_ledger.json`` has always stored them):

- ``SUBMITTING``  claimed with its idempotency key; the submission may or may not have happened
- ``SUBMITTED``   handed to the executor (queued locally, or a SLURM job id is known)
- ``RUNNING``     the node's process has started
- ``COMPLETED`` / ``FAILED`` / ``CANCELLED`` / ``TIMEOUT``   final
"""

from __future__ import annotations

ACTIVE = ("SUBMITTING", "SUBMITTED", "RUNNING")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
LEDGER_STATES = ACTIVE + FINAL
# What `dag.py retry` resubmits (plus stranded SUBMITTING entries, found by looking them up).
RETRYABLE = ("FAILED", "CANCELLED", "TIMEOUT")

# sacct's states of a job that has ended (a requeued job goes back to PENDING).
SLURM_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                         "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})
SLURM_RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT",
                           "RESIZING", "SUSPENDED", "STOPPED"})


def ledger_state(slurm_state: str) -> str | None:
    """The ledger state a final SLURM state means (None while the job is not final)."""
    if slurm_state not in SLURM_FINAL:
        return None
    if slurm_state in ("COMPLETED", "CANCELLED", "TIMEOUT"):
        return slurm_state
    return "FAILED"  # OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL, DEADLINE, PREEMPTED: it did not finish
