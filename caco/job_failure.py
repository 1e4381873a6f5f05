"""How a pretraining job ends when something raises.

- An error of this process (a bug, a full disk, a config error found late) fails the job: the
  traceback is logged, a failure record is written for the other ranks
  (``<run_dir>/.failures/<job>.<restart>.rank<r>.json``), and the error propagates (the job
  exits non-zero: SLURM records FAILED).
- A collective that fails because another rank's process or node vanished (connection
  closed, reset or timed out) is not a user error: when no other rank of this incarnation left
  a failure record, the job requeues itself (``scontrol requeue``; one rank does it) and
  resumes from its last checkpoint, at most ``cluster.max_num_timeout`` times
  (``SLURM_RESTART_COUNT``), after which it fails like any error.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

FAILURES = ".failures"
EXIT_REQUEUED = 75  # EX_TEMPFAIL: the job was requeued, this incarnation ends here

# What a collective raises when its peer's process or host is gone (gloo, NCCL, c10d store).
LOST_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "connection refused", "timed out", "timeout", "socket closed",
                   "remote process exited", "network error", "communicator was aborted",
                   "transport endpoint is not connected", "no route to host",
                   "read error", "unexpected end of file")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer vanished."""
    import torch.distributed as dist

    network = tuple(t for t in (getattr(dist, "DistNetworkError", None),
                                getattr(dist, "DistBackendError", None)) if t is not None)
    for e in _chain(error):
        if network and isinstance(e, network):
            return True
        text = str(e).lower()
        from_collective = any(w in text for w in ("gloo", "nccl", "c10d", "processgroup"))
        if from_collective and any(w in text for w in LOST_PEER_WORDS):
            return True
    return False


def incarnation() -> str | None:
    """``<SLURM job id>.<restart count>``, or None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))


def record_own_failure(run_dir: Path, error: BaseException) -> Path | None:
    """Tell the other ranks of this incarnation that this one failed by its own error."""
    import torch.distributed as dist

    inc = incarnation()
    if inc is None or not (dist.is_available() and dist.is_initialized()):
        return None  # only peers of a process group read it
    rank = _rank()
    record = {"incarnation": inc, "rank": rank, "host": socket.gethostname(),
              "pid": os.getpid(), "time": time.time(), "type": type(error).__name__,
              "message": str(error)[:2000],
              "traceback": "".join(traceback.format_exception(error))[-8000:]}
    try:
        return atomic_write_text(Path(run_dir) / FAILURES / f"{inc}.rank{rank}.json",
                                 json.dumps(record, indent=1))
    except OSError as e:  # a full disk must not hide the error itself
        log.warning("could not write the failure record (%s)", e)
        return None


def peer_failures(run_dir: Path, wait_s: float = 3.0) -> list[dict[str, Any]]:
    """Failure records other ranks of this incarnation wrote (waits briefly: a failing peer
    writes its record before its process ends, which is what broke our collective)."""
    inc, rank = incarnation(), _rank()
    folder = Path(run_dir) / FAILURES
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for path in sorted(folder.glob(f"{inc}.rank*.json")) if inc else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record.get("rank") != rank:
                found.append(record)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def requeue_after_lost_peer(run_dir: Path, max_requeues: int) -> bool:
    """Requeue this SLURM job (once per incarnation, whichever rank comes first); False when
    the bound is reached or this is not a SLURM job."""
    inc = incarnation()
    if inc is None:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        log.error("a peer was lost, but the job was already requeued %d time(s) "
                  "(cluster.max_num_timeout=%d): not requeuing again", restarts, max_requeues)
        return False
    folder = Path(run_dir) / FAILURES
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"{inc}.requeue", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        log.warning("a peer was lost; another rank is requeuing the job")
        return True
    os.write(fd, json.dumps({"rank": _rank(), "host": socket.gethostname(),
                             "time": time.time()}).encode())
    os.close(fd)
    job = os.environ["SLURM_JOB_ID"]
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        log.error("a peer was lost and `scontrol requeue %s` failed: %s", job,
                  proc.stderr.strip())
        return False
    log.warning("a peer was lost (its process or node vanished): requeued job %s "
                "(restart %d of at most %d); it resumes from its last checkpoint", job,
                restarts + 1, max_requeues)
    return True
