"""``dag.py status <dir> --watch``: a live view of a run or a sweep until everything has ended.

Per run: the pretraining job's state (SLURM, or the local trainer's process), epochs done of
the total as a bar, the ETA from the recent epochs' images/s, and its DAG cells (checkpoint
epoch: node state ...). On a terminal it is a rich table redrawn in place; otherwise (a log,
a pipe) a block of plain lines each time something changed. It ends when no pretraining job
is active and every evaluation is in a final state: exit status 0 when all completed, 1 when
anything failed, was cancelled or timed out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from caco.job_states import FINAL, SLURM_FINAL

MARKS = {"COMPLETED": "ok", "FAILED": "FAILED", "CANCELLED": "cancelled", "TIMEOUT": "TIMEOUT",
         "RUNNING": "running", "SUBMITTED": "queued", "SUBMITTING": "submitting"}
RECENT_EPOCHS = 3


def eta_seconds(run_dir: str | Path, epochs_done: int | None, epochs: int | None) -> float | None:
    """Seconds left at the recent pace: the epochs that remain times the mean time of the last
    few epochs (the same images per epoch, so the same as their images/s)."""
    from caco.report.collect import read_history

    if not epochs or epochs_done is None or epochs_done >= epochs:
        return None
    recent = [float(r["train/epoch_time_s"]) for r in read_history(run_dir)
              if r.get("train/epoch_time_s")][-RECENT_EPOCHS:]
    return (epochs - epochs_done) * sum(recent) / len(recent) if recent else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def bar(done: int | None, total: int | None, width: int = 20) -> str:
    if not total or done is None:
        return "[" + " " * width + "]"
    filled = round(width * min(done, total) / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def view(run: dict[str, Any]) -> dict[str, Any]:
    """One run's line: name, state, epochs done/total, ETA, DAG cells."""
    p = run["pretraining"]
    state = p.get("slurm") if "job_id" in p else \
        (p.get("process", "").rsplit(": ", 1)[-1] if "process" in p else "not started")
    if "job_id" in p:
        state = f"{state} (job {p['job_id']})"
    done, total = p.get("epoch"), p.get("epochs")
    cells: dict[int, list[str]] = {}
    for r in run["rows"]:
        cells.setdefault(r["epoch"], []).append(f"{r['node']} {MARKS.get(r['state'], r['state'])}")
    dag = " | ".join(f"e{e}: " + ", ".join(v) for e, v in sorted(cells.items())) or "-"
    return {"run": Path(run["run_dir"]).name, "state": state, "done": done, "total": total,
            "progress": f"{bar(done, total)} {done if done is not None else 0}/{total or '?'}",
            "eta": _duration(eta_seconds(run["run_dir"], done, total) if p.get("active")
                             else None), "dag": dag}


def ended(runs: list[dict[str, Any]]) -> bool:
    return all(r["pretraining"].get("active") is False for r in runs) and \
        all(row["state"] in FINAL for r in runs for row in r["rows"])


def failed(runs: list[dict[str, Any]]) -> bool:
    bad = SLURM_FINAL - {"COMPLETED"}
    return any(row["state"] != "COMPLETED" for r in runs for row in r["rows"]) or any(
        (r["pretraining"].get("slurm") in bad) or ("process" in r["pretraining"] and not
         r["pretraining"]["process"].endswith(": finished")) for r in runs)


def plain(views: list[dict[str, Any]]) -> str:
    stamp = time.strftime("%H:%M:%S")
    return "\n".join(f"[{stamp}] {v['run']}: {v['state']}, {v['progress']}, ETA {v['eta']}; "
                     f"DAG {v['dag']}" for v in views)


def table(views: list[dict[str, Any]], title: str):
    from rich.table import Table

    t = Table(title=title, expand=True)
    for name in ("run", "pretraining", "epochs", "ETA", "evaluation DAG"):
        t.add_column(name, overflow="fold")
    for v in views:
        t.add_row(v["run"], v["state"], v["progress"], v["eta"], v["dag"])
    return t


def watch(path: str | Path, *, interval: float = 10.0, out=None,
          tty: bool | None = None) -> int:
    """Refresh until everything ended; returns 0 (all completed) or 1 (something failed)."""
    from caco.dag.admin import snapshot
    from caco.report.collect import short_names

    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    title = f"{Path(path).resolve().name} (every {interval:g} s, Ctrl-C to leave)"
    last = None
    live = None
    if tty:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(file=out), auto_refresh=False)
        live.start()
    try:
        while True:
            runs, _, _ = snapshot(path)
            views = [view(r) for r in runs]
            for v, name in zip(views, short_names([v["run"] for v in views], 60)):
                v["run"] = name
            if live is not None:
                live.update(table(views, title), refresh=True)
            else:
                text = plain(views)
                shown = [line.split("] ", 1)[-1] for line in text.splitlines()]  # sans time
                if shown != last:
                    print(text, file=out, flush=True)
                    last = shown
            if ended(runs):
                break
            time.sleep(interval)
    finally:
        if live is not None:
            live.stop()
    code = 1 if failed(runs) else 0
    print(f"everything has ended: {'something failed (see above)' if code else 'all completed'}",
          file=out, flush=True)
    return code
