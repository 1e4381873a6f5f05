"""Pretraining runs side by side with their evaluation metrics (``launch/compare.py``).

Reads the MLflow store the runs logged to, keeps the pretraining (parent) runs, optionally
of one sweep or matching an MLflow filter, and builds the MLflow UI link of their compare page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from caco.errors import ConfigError

COLUMNS = ("eval/knn_top1", "eval/knn_top1_random_init", "eval/linear_top1",
           "eval/linear_cached_top1", "eval/det_AP50", "eval/det_AP50_random_init",
           "eval/dag_failed_nodes", "train/loss")


def pretraining_runs(uri: str, experiment: str, *, sweep: str | None = None,
                     filter_string: str = "") -> tuple[str, list]:
    """``(experiment_id, runs)``: the experiment's parent runs, newest first."""
    from caco.tracking import client as tracking_client

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri}; pass --experiment or "
                          "--tracking-uri (the runs' output_root holds mlflow.db by default)")
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string,
                              max_results=1000, order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if sweep:
        runs = [r for r in runs if f"/sweeps/{sweep}/" in r.data.tags.get("run_dir", "")]
    return exp.experiment_id, runs


def compare_url(ui: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    exps = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{ui.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"


def table(runs: list, columns: Sequence[str] = COLUMNS) -> str:
    shown = [c for c in columns if any(c in r.data.metrics for r in runs)]
    header = ["run", "status", "epochs", *shown]
    rows: list[list[str]] = []
    for r in runs:
        cells: list[Any] = [r.info.run_name, r.info.status, r.data.params.get("epochs", "-")]
        cells += [f"{r.data.metrics[c]:.2f}" if c in r.data.metrics else "-" for c in shown]
        rows.append([str(c) for c in cells])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
