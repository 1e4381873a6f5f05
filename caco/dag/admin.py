"""What ``launch/dag.py`` does: show a run's evaluation DAG, resubmit what failed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.errors import ConfigError

log = logging.getLogger(__name__)

RETRYABLE = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def _run_dir(path: str | Path) -> Path:
    run_dir = Path(path).expanduser().resolve()
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a pretraining run directory (no config.yaml)")
    return run_dir


def _slurm_states(entries: list[dict[str, Any]]) -> dict[str, str]:
    ids = [str(e["job_id"]) for e in entries if str(e.get("job_id") or "").isdigit()]
    if not ids:
        return {}
    from caco.slurm_accounting import job_state

    try:
        return {i: job_state(i) for i in ids}
    except OSError:  # no sacct on this machine
        return {}


def status_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    run_dir = _run_dir(run_dir)
    entries = EvalLedger(run_dir).entries()
    slurm = _slurm_states(entries)
    rows = []
    for e in entries:
        metrics = e.get("metrics") or {}
        shown = ", ".join(f"{k} {v:g}" for k, v in metrics.items()
                          if k not in ("epoch", "seconds") and "." not in k)
        rows.append({"epoch": e["epoch"], "node": e["node"], "state": e["state"],
                     "slurm": slurm.get(str(e.get("job_id")), "-"),
                     "job": e.get("job_id") or "-", "attempts": e.get("attempts", 0),
                     "result": shown if e["state"] == "COMPLETED" else (e.get("error") or "")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no evaluation nodes recorded yet"
    cols = ["epoch", "node", "state", "slurm", "job", "attempts", "result"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def retry(run_dir: str | Path, *, wait: bool = True) -> list[dict[str, Any]]:
    """Resubmit every failed/cancelled node (and its checkpoint's report)."""
    from omegaconf import OmegaConf

    from caco.dag.scheduler import DagScheduler

    run_dir = _run_dir(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ledger = EvalLedger(run_dir)
    slurm = _slurm_states(ledger.entries())
    failed = [e for e in ledger.entries()
              if e["state"] in RETRYABLE or slurm.get(str(e.get("job_id"))) in RETRYABLE]
    if not failed:
        log.info("nothing to retry in %s", run_dir)
        return []
    scheduler = DagScheduler(cfg, run_dir)
    epochs = sorted({e["epoch"] for e in failed})
    for e in failed:
        ledger.reset(e["epoch"], e["node"])
    for epoch in epochs:
        for e in ledger.entries():
            if e["epoch"] == epoch and scheduler.specs.get(e["node"]) is not None \
                    and scheduler.specs[e["node"]].evaluator == "report":
                ledger.reset(epoch, e["node"])
    submitted = []
    for epoch in epochs:
        checkpoint = next(e["checkpoint"] for e in failed if e["epoch"] == epoch)
        submitted += scheduler.schedule(checkpoint, epoch)
    scheduler.close(wait=wait)
    return submitted
