"""``EvalLedger``: the source of truth for what was submitted for which checkpoint.

One JSON file per pretraining run (``<run_dir>/eval_ledger.json``), rewritten atomically
(temp file + fsync + rename) under an exclusive ``flock``, so concurrent writers (the trainer's
scheduler, a report job, ``dag.py retry``) never lose each other's updates and a kill at any
instant leaves the previous or the new ledger, never a torn one.

A node is marked ``SUBMITTING`` with its idempotency key BEFORE the executor is called; a
crash between the submission and the ``SUBMITTED`` write leaves that mark behind, and the
scheduler then looks the key up in the cluster's accounting (the key is the job's name)
instead of submitting again. Whoever claims, submits and records a node (the trainer's
scheduler, ``dag.py retry``) holds :meth:`EvalLedger.submission_lock` for those three steps,
so a SUBMITTING entry seen under that lock belongs to a submitter that died. An update that
names a key (a node job reporting back) is refused once the entry carries another key (the
node was resubmitted since): :class:`StaleKey`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caco.errors import CacoError
from caco.fileio import atomic_write_text, exclusive_lock
from caco.job_states import LEDGER_STATES

LEDGER_FILE = "eval_ledger.json"
STATES = LEDGER_STATES


class LedgerError(CacoError, ValueError):
    """An unreadable ledger file (names it)."""


class StaleKey(LedgerError):
    """An update from a job whose node was resubmitted under another key since."""


def idempotency_key(run_dir: str | os.PathLike, epoch: int, node: str, round: int = 0) -> str:
    """Deterministic per (run, checkpoint epoch, node, retry round): the same after any
    restart, different for a deliberate retry (``dag.py retry``)."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"caco-{digest}-e{epoch:04d}-{node}" + (f"-r{round}" if round else "")


class EvalLedger:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self._lock_path = self.run_dir / f".{LEDGER_FILE}.lock"
        self._submit_lock_path = self.run_dir / f".{LEDGER_FILE}.submit.lock"

    @contextlib.contextmanager
    def submission_lock(self) -> Iterator[None]:
        """Held from claiming a node to recording its submission (across processes)."""
        with exclusive_lock(self._submit_lock_path):
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Read-modify-write under an exclusive lock; the yielded dict is written back."""
        with exclusive_lock(self._lock_path):
            data = self._read()
            yield data
            self._write(data)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": 1, "entries": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LedgerError(f"evaluation ledger {self.path} is unreadable ({e}); restore it "
                              "or move it away (nodes would then be resubmitted)") from None
        if not isinstance(data, dict) or "entries" not in data:
            raise LedgerError(f"evaluation ledger {self.path} has no 'entries'")
        return data

    def _write(self, data: dict) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))

    @staticmethod
    def _id(epoch: int, node: str) -> str:
        return f"{epoch:04d}/{node}"

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded node, ordered by (epoch, node)."""
        data = self._read()
        return [data["entries"][k] for k in sorted(data["entries"])]

    def get(self, epoch: int, node: str) -> dict[str, Any] | None:
        return self._read()["entries"].get(self._id(epoch, node))

    def claim(self, epoch: int, node: str, checkpoint: str | os.PathLike) -> dict | None:
        """Mark a node SUBMITTING unless it is already recorded; returns the new entry, or
        None when the node exists (never submit twice)."""
        with self._locked() as data:
            key = self._id(epoch, node)
            if key in data["entries"]:
                return None
            round = sum(1 for h in data.get("history", []) if h["epoch"] == epoch
                        and h["node"] == node)
            entry = {"epoch": epoch, "node": node, "checkpoint": str(checkpoint),
                     "key": idempotency_key(self.run_dir, epoch, node, round), "job_id": None,
                     "state": "SUBMITTING", "attempts": 0, "round": round,
                     "updated": time.time()}
            data["entries"][key] = entry
            return dict(entry)

    def update(self, epoch: int, node: str, *, key: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """Change a node's entry; with ``key``, only while the entry still carries it."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown ledger state {fields['state']!r}; one of {STATES}")
        with self._locked() as data:
            entry = data["entries"].get(self._id(epoch, node))
            if key is not None and (entry is None or entry.get("key") != key):
                now = entry.get("key") if entry else "no entry"
                raise StaleKey(f"evaluation {node} of epoch {epoch} was resubmitted since "
                               f"this job started (its key is now {now}, this job's {key}); "
                               "this job's results are not recorded")
            entry.update(fields, updated=time.time())
            return dict(entry)

    def reset(self, epoch: int, node: str) -> dict[str, Any] | None:
        """Move a node's entry to the history so it can be claimed (and submitted) again."""
        with self._locked() as data:
            entry = data["entries"].pop(self._id(epoch, node), None)
            if entry is not None:
                data.setdefault("history", []).append(entry)
            return entry
