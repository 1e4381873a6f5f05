"""Which process is this, and is that one still alive: (host, pid, start time), never a bare pid
(pids are reused), and never judged from another host."""

from __future__ import annotations

import os
import socket


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has ended
        return None
    return int(fields[19])


def identity(pid: int | None = None) -> dict[str, object]:
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "pid_start": start_time(pid)}


def alive(ident: dict | None) -> bool | None:
    """True/False for a process of this host; None when it ran elsewhere (unknowable here)."""
    if not ident or not ident.get("pid"):
        return None
    if ident.get("host") != socket.gethostname():
        return None
    started = start_time(int(ident["pid"]))
    return started is not None and (ident.get("pid_start") in (None, started))
