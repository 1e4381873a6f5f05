"""One trainer per run directory: an exclusive lease with a heartbeat.

``<run_dir>/lease.json`` names the trainer that owns the directory (host, pid and its start
time, SLURM job id and restart count, a heartbeat renewed every ``heartbeat_s``); on release
it stays as the last trainer's record (``released``, ``status``). A second
trainer is refused with a message naming the holder, unless the lease may be taken over:

- the holder is an earlier incarnation of the same SLURM job (a requeue, on any host);
- the holder ran on this host and its process is gone;
- the holder ran on another host and its SLURM job is no longer running, or (SLURM cannot
  tell, or no job) its heartbeat is older than ``stale_s``. A pid is never judged from another
  host.

Changes to the lease happen under an exclusive file lock, after checking that locks work on
the run directory's filesystem at all. A trainer whose lease was taken over (its heartbeat
stopped for longer than ``stale_s``, e.g. a partitioned node) notices at its next heartbeat
and refuses to write anything more (:attr:`RunLease.lost`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from caco.errors import CacoError
from caco.fileio import atomic_write_text, check_locks_work, exclusive_lock
from caco.processes import alive, identity

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class LeaseHeld(CacoError, RuntimeError):
    """Another live trainer owns the run directory (the message names it)."""


def _slurm_state(job_id: str) -> str | None:
    """sacct's state of ``job_id``, or None when SLURM cannot be asked."""
    from caco.slurm_accounting import job_state

    try:
        state = job_state(job_id)
    except (OSError, RuntimeError, ValueError):
        return None
    return None if state == "UNKNOWN" else state


def describe(holder: dict[str, Any]) -> str:
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    age = time.time() - float(holder.get("heartbeat", 0))
    parts.append(f"last heartbeat {age:.0f} s ago")
    return ", ".join(parts)


class RunLease:
    def __init__(self, run_dir: str | os.PathLike, *, heartbeat_s: float = 30.0,
                 stale_s: float = 300.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self._lock_path = self.run_dir / f".{LEASE_FILE}.lock"
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _locked(self):
        return exclusive_lock(self._lock_path)

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {"host": "?", "pid": None, "heartbeat": 0}  # unreadable: treat as stale

    def _takeover(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lease may be taken over, or None when it may not."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return f"a requeued incarnation of SLURM job {job}"
        running = alive(holder.get("process"))
        if running is not None:  # the holder ran on this host: its process decides
            return None if running else "its process is gone"
        if holder.get("slurm_job_id"):
            state = _slurm_state(str(holder["slurm_job_id"]))
            if state is not None and state not in ("RUNNING", "COMPLETING", "CONFIGURING",
                                                   "SUSPENDED"):
                return f"its SLURM job {holder['slurm_job_id']} is {state}"
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return f"its heartbeat is older than {self.stale_s:.0f} s"
        return None

    def _record(self) -> dict[str, Any]:
        ident = identity()
        return {"token": self.token, "host": ident["host"], "pid": ident["pid"],
                "process": ident, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "acquired": time.time(), "heartbeat": time.time()}

    def acquire(self) -> RunLease:
        check_locks_work(self.run_dir)
        with self._locked():
            holder = self.holder()
            if holder is not None and not holder.get("released"):
                why = self._takeover(holder)
                if why is None:
                    raise LeaseHeld(
                        f"run directory {self.run_dir} is in use by another trainer "
                        f"({describe(holder)}); wait for it to end or stop it, or use another "
                        "run_name")
                log.warning("taking over the run directory from %s: %s", describe(holder), why)
            atomic_write_text(self.path, json.dumps(self._record(), indent=1))
        self._thread = threading.Thread(target=self._beat, name="caco-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._locked():
                holder = self.holder() or {}
                if holder.get("token") != self.token:
                    self.lost = True
                    log.error("the run directory %s was taken over by %s; this trainer writes "
                              "nothing more", self.run_dir, describe(holder) if holder else
                              "nobody (the lease was removed)")
                    return
                atomic_write_text(self.path, json.dumps({**holder, "heartbeat": time.time()},
                                                        indent=1))

    def release(self, status: str = "ended") -> None:
        """Free the directory; the record stays (``released``) as the last trainer's trace."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError), self._locked():
            holder = self.holder() or {}
            if holder.get("token") == self.token:
                atomic_write_text(self.path, json.dumps(
                    {**holder, "released": time.time(), "status": status}, indent=1))
