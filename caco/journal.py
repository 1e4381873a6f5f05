"""A writer's journal: JSON records appended to one file, delivered in order, removed once sent.

Each record gets a sequence number (``seq``) when appended. Appends and rewrites hold an
exclusive lock on ``.<name>.lock`` for an instant; whoever delivers holds
``.<name>.deliver.lock`` (non-blocking: a second deliverer steps aside) while it sends, so a
record is never sent by two processes at once. A line that is not valid JSON (a write torn by
a kill) is set aside in ``<name>.torn`` with a warning instead of blocking what follows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from caco.fileio import atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._deliver_path = self.path.with_name(f".{self.path.name}.deliver.lock")

    def _locked(self):
        return exclusive_lock(self._lock_path)

    def delivery(self):
        """A context that yields True when this process may deliver now (no other process
        is delivering)."""
        return exclusive_lock(self._deliver_path, wait=False)

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records, torn = [], []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "kind" not in record:
                    raise ValueError("not a record")
                records.append(record)
            except ValueError:
                torn.append(line)
        if any("seq" not in r for r in records):  # written before records were numbered
            low = min((r["seq"] for r in records if "seq" in r), default=0)
            for i, r in enumerate(records):
                r.setdefault("seq", low - len(records) + i)
            self._write(records)
        if torn:
            aside = self.path.with_name(f"{self.path.name}.torn")
            with open(aside, "a") as f:
                f.writelines(line + "\n" for line in torn)
            log.warning("%d unreadable line(s) in %s (a write torn by a kill) set aside in %s",
                        len(torn), self.path, aside)
            self._write(records)
        return records

    def _write(self, records: list[dict[str, Any]]) -> None:
        if records:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        else:
            self.path.unlink(missing_ok=True)

    def _last_seq(self) -> int:
        """The last record's number, from the file's tail (appends stay cheap when a long
        outage has made the journal long)."""
        if not self.path.exists():
            return -1
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode(errors="replace").splitlines()
        for line in reversed(tail):
            try:
                return int(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                continue
        return max((r["seq"] for r in self._read()), default=-1)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._locked():
            # Numbered from the file, not a counter of this process: a second process may
            # append too (dag.py cancel closing a run whose job it just killed).
            record = {**record, "seq": self._last_seq() + 1}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # a line torn by a kill has no newline: never glue onto it
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            return record

    def records(self) -> list[dict[str, Any]]:
        with self._locked():
            return self._read()

    def update(self, changed: Iterable[dict[str, Any]]) -> None:
        """Rewrite the records with these sequence numbers (e.g. their attempt counts)."""
        by_seq = {r["seq"]: r for r in changed}
        with self._locked():
            self._write([by_seq.get(r["seq"], r) for r in self._read()])

    def remove(self, seqs: Iterable[int]) -> None:
        gone = set(seqs)
        with self._locked():
            self._write([r for r in self._read() if r["seq"] not in gone])

    def __len__(self) -> int:
        return len(self.records())
