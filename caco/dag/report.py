"""The ``report`` node: one checkpoint's evaluations rolled up, failures included (a roll-up of
the ledger, so it lives with the DAG, not with the evaluators).

It runs after the checkpoint's other nodes whatever their outcome (SLURM ``afterany``), reads
their ledger entries and metrics files, asks SLURM for the final state of jobs that never
reported back (cancelled by a failed dependency, killed, timed out; a job's row counts only
when its name is the node's key), records that state in the ledger, and writes
``<run_dir>/evals/e<epoch>/report.json`` and ``report.md``. Nodes whose submission SLURM
refused are in the ledger as FAILED with SLURM's words, and are reported like any failure.
Then it redraws the run's report (``<run_dir>/report/``, :mod:`caco.report`), which the node
logs as artifacts of the pretraining run, with a description of the run (its evaluation
child runs, linked, and the report) as the run's MLflow note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.fileio import atomic_write_text
from caco.job_states import FINAL, ledger_state

REPORT_HEADLINE = ("dag_failed_nodes",)  # also on the pretraining run as eval/<metric>


def _slurm_finals(entries: list[dict[str, Any]]) -> dict[str, str]:
    """SLURM's final state of each unfinished node's job (rows named by the node's key)."""
    from caco.slurm_accounting import SlurmUnavailable, latest_rows

    waiting = {str(e["job_id"]): e["key"] for e in entries
               if e["state"] not in FINAL and str(e.get("job_id") or "")[:1].isdigit()}
    try:
        rows = latest_rows(list(waiting))
    except SlurmUnavailable:
        return {}
    return {job: row["state"] for job, row in rows.items()
            if job in waiting and row.get("name") == waiting[job]}


def _deliver_tracking(run_dir: str, epoch: int) -> None:
    """The checkpoint's nodes have ended: send what they buffered during a tracking outage
    and could not send themselves (best effort; sync_tracking.py does the rest)."""
    import contextlib

    from caco.tracking import sync

    with contextlib.suppress(FileNotFoundError):  # tracking disabled
        sync(run_dir, epoch=epoch, trainer=False)


def report(run_dir: str, epoch: int, exclude: str = "report") -> dict[str, Any]:
    _deliver_tracking(run_dir, epoch)
    ledger = EvalLedger(run_dir)
    rows = []
    entries = [e for e in ledger.entries() if e["epoch"] == epoch and e["node"] != exclude]
    finals = _slurm_finals(entries)
    for entry in entries:
        state, error = entry["state"], entry.get("error")
        slurm = finals.get(str(entry.get("job_id")))
        if state not in FINAL and slurm and ledger_state(slurm):
            state, error = ledger_state(slurm), error or f"SLURM state {slurm}"
            ledger.update(epoch, entry["node"], key=entry["key"], state=state, error=error)
        rows.append({"node": entry["node"], "state": state, "job_id": entry.get("job_id"),
                     "attempts": entry.get("attempts", 0), "error": error,
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
    from caco.report import write_report

    write_report(run_dir)
    metrics: dict[str, Any] = {"dag_failed_nodes": len(failed), "dag_nodes": len(rows)}
    for r in rows:
        for k, v in r["metrics"].items():
            if k not in ("epoch", "seconds"):
                metrics[f"{r['node']}.{k}"] = v
    return metrics


def description(run_dir: str, experiment_id: str | None, run_id: str | None,
                exclude: str = "report") -> str:
    """The pretraining run's MLflow note (markdown): its evaluations by checkpoint (the
    roll-up nodes ``exclude`` left out), each linked to its child run, and where the report
    is."""
    from caco.tracking import ui_link

    route = f"experiments/{experiment_id}/runs/{run_id}"
    ledger = EvalLedger(run_dir)
    lines = ["**CaCo pretraining run**: evaluations are child runs, listed by checkpoint; the "
             "report (charts, checkpoint x evaluation matrix, cost) is under Artifacts: "
             + (f"[report/index.html]({ui_link(route + '/artifactPath/report/index.html')})"
                if experiment_id and run_id else "report/index.html"),
             "", "| checkpoint | node | state | result |", "|---|---|---|---|"]
    for e in ledger.entries():
        if e["node"] == exclude:
            continue
        name = f"e{e['epoch']:04d}-{e['node']}"
        child = e.get("child_run_id")
        shown = f"[{name}]({ui_link(f'experiments/{experiment_id}/runs/{child}')})" \
            if child and experiment_id else name
        metrics = e.get("metrics") or {}
        result = ", ".join(f"{k} {v:g}" for k, v in metrics.items()
                           if k not in ("epoch", "seconds", "processes") and "." not in k)
        if e["state"] != "COMPLETED":
            result = (e.get("error") or "").replace("|", "/")[:200]
        lines.append(f"| epoch {e['epoch']} | {shown} | {e['state']} | {result} |")
    lines += ["", f"Run directory: `{run_dir}`"]
    return "\n".join(lines)
