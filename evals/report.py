"""The ``report`` node: one checkpoint's evaluations rolled up, failures included.

It runs after the checkpoint's other nodes whatever their outcome (SLURM ``afterany``), reads
their ledger entries and metrics files, asks SLURM for the final state of jobs that never
reported back (cancelled by a failed dependency, killed, timed out), and writes
``<run_dir>/evals/e<epoch>/report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.fileio import atomic_write_text

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def _final_state(entry: dict[str, Any]) -> str:
    state = entry["state"]
    job = str(entry.get("job_id") or "")
    if state in TERMINAL or not job.isdigit():
        return state
    from caco.slurm_accounting import job_state

    slurm = job_state(job)
    return slurm if slurm in TERMINAL else state


def report(run_dir: str, epoch: int, exclude: str = "report") -> dict[str, Any]:
    ledger = EvalLedger(run_dir)
    rows = []
    for entry in ledger.entries():
        if entry["epoch"] != epoch or entry["node"] == exclude:
            continue
        state = _final_state(entry)
        if state != entry["state"]:
            ledger.update(epoch, entry["node"], state=state if state in TERMINAL else "FAILED",
                          error=entry.get("error") or f"SLURM state {state}")
        rows.append({"node": entry["node"], "state": state, "job_id": entry.get("job_id"),
                     "attempts": entry.get("attempts", 0), "error": entry.get("error"),
                     "metrics": entry.get("metrics") or {}})
    failed = [r["node"] for r in rows if r["state"] != "COMPLETED"]
    out = Path(run_dir) / "evals" / f"e{epoch:04d}"
    summary = {"epoch": epoch, "nodes": rows, "failed": failed}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1))
    lines = [f"# Evaluations of epoch {epoch}", "", "| node | state | job | attempts | metrics |",
             "|---|---|---|---|---|"]
    for r in rows:
        shown = ", ".join(f"{k} {v:g}" for k, v in r["metrics"].items() if k != "epoch")
        if r["state"] != "COMPLETED":
            shown = r["error"] or ""
        lines.append(f"| {r['node']} | {r['state']} | {r['job_id']} | {r['attempts']} | "
                     f"{shown} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    metrics: dict[str, Any] = {"dag_failed_nodes": len(failed), "dag_nodes": len(rows)}
    for r in rows:
        for k, v in r["metrics"].items():
            if k not in ("epoch", "seconds"):
                metrics[f"{r['node']}.{k}"] = v
    return metrics
