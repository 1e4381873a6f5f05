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

LAST_COLUMNS = ("eval/dag_failed_nodes", "train/loss")


def columns(runs: list) -> list[str]:
    """The runs' evaluation metrics, in the order of their registry's headline metrics (each
    run records ``eval.<name>.headline`` in its params), then any other eval/* metric."""
    import ast

    ordered: list[str] = []
    for r in runs:
        for key, value in r.data.params.items():
            if key.startswith("eval.") and key.endswith(".headline"):
                try:
                    names = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    continue
                ordered += [f"eval/{n}" for n in names if f"eval/{n}" not in ordered]
    seen = sorted({k for r in runs for k in r.data.metrics if k.startswith("eval/")})
    ordered += [k for k in seen if k not in ordered and k not in LAST_COLUMNS]
    return [*ordered, *LAST_COLUMNS]


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
    from caco.tracking import ui_link

    return ui_link("compare-runs", ui, f"runs={runs}&experiments={exps}")


def table(runs: list, wanted: Sequence[str] | None = None) -> str:
    wanted = columns(runs) if wanted is None else wanted
    shown = [c for c in wanted if any(c in r.data.metrics for r in runs)]
    from caco.table import format_table

    rows: list[list[Any]] = []
    for r in runs:
        cells: list[Any] = [r.info.run_name, r.info.status, r.data.params.get("epochs", "-")]
        cells += [f"{r.data.metrics[c]:.2f}" if c in r.data.metrics else "-" for c in shown]
        rows.append(cells)
    return format_table(["run", "status", "epochs", *shown], rows)


def sort_runs(runs: list, metric: str, *, descending: bool = True) -> list:
    """Runs ordered by ``metric`` (runs without it last, in their order); a metric no run
    has is refused, naming the ones they have."""
    have = [r for r in runs if metric in r.data.metrics]
    if not have:
        known = sorted({k for r in runs for k in r.data.metrics if k.startswith("eval/")})
        raise ConfigError(f"--sort {metric}: no listed run has this metric; eval metrics "
                          f"there: {known or 'none yet'}")
    have.sort(key=lambda r: r.data.metrics[metric], reverse=descending)
    return have + [r for r in runs if metric not in r.data.metrics]


def write_html(runs: list, out: str) -> tuple[str, list[str]]:
    """The report of these runs (their run directories, from the ``run_dir`` tag) in
    ``out``; returns its index.html and the runs whose directory is not here."""
    from pathlib import Path

    from caco.report.page import write_runs_report

    dirs, missing = [], []
    for r in runs:
        d = r.data.tags.get("run_dir")
        if d and (Path(d) / "config.yaml").exists():
            dirs.append(d)
        else:
            missing.append(r.info.run_name)
    index = write_runs_report(dirs, out, f"comparison of {len(dirs)} run(s)")
    return str(index), missing
