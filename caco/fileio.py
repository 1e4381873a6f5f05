"""Writing files so that a kill at any instant leaves the old file or the new one, never a torn
one: write a temporary file in the same folder, fsync it, rename it over the target, fsync the
folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from caco.errors import CacoError


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *,
                 binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file and publish it as ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or link in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if needed) across processes;
    yields False instead of waiting when ``wait`` is off and another holder has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def read_json(path: str | os.PathLike | None) -> Any:
    """The JSON in ``path``, or None where there is none to read (no file, unreadable, torn):
    for state files that another process may be writing or may never have written."""
    import json

    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished temporary folder into place; if another process published the
    same content first (concurrent first use), keep theirs and drop ours."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    if final.exists() and not any(final.iterdir()):
        final.rmdir()
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


class LockError(CacoError, OSError):
    """File locks that do not work where a run needs them (names the folder)."""


def check_locks_work(folder: str | os.PathLike) -> None:
    """Refuse a filesystem whose file locks are missing or not enforced (some NFS/Lustre
    mounts): the ledger and the run lease depend on them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".lock-probe-{os.getpid()}"
    try:
        with open(probe, "a") as a, open(probe, "a") as b:
            try:
                fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise LockError(
                    f"file locks do not work on {folder} ({e}); the run directory must be on a "
                    "filesystem with working locks (mount NFS with locking, not `nolock`/"
                    "`local_lock`), or choose another output_root") from None
            try:
                fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # the second lock was refused: locks are enforced
            raise LockError(
                f"file locks are not enforced on {folder} (a second exclusive lock was "
                "granted); the run directory needs a filesystem with working locks, or "
                "choose another output_root")
    finally:
        probe.unlink(missing_ok=True)
