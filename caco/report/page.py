"""``<dir>/report/index.html``: the report of a run or a sweep, one file that opens from disk.

The charts are PNG files beside it and embedded in it (data URIs), so the page needs no server
and no network, also when MLflow shows it as an artifact. Links to the MLflow UI are plain
links. ``summary.json`` beside it has the numbers the page shows.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from caco.fileio import atomic_write_text
from caco.report import collect as c
from caco.report import plots

REPORT_DIR = "report"
CHARTS = (("eval_metrics.png", "Evaluation metrics by checkpoint", plots.eval_metrics),
          ("matrix.png", "Checkpoint x evaluation", plots.matrix),
          ("training.png", "Training curves", plots.training_curves),
          ("cost.png", "Cost", plots.cost))
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.cell { color: #fff; text-align: center; min-width: 6em; }
img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; } .err { color: #c62828; font-size: .85em; }
"""


# Each chart records its decoded size once the page has loaded (a check that a browser really
# drew it: tests read it from the rendered DOM).
_LOADED = ("<script>window.addEventListener('load', () => document.querySelectorAll('img')"
           ".forEach(i => i.dataset.drawn = i.naturalWidth + 'x' + i.naturalHeight));</script>")


def ui_base(uri: str | None) -> str:
    """Where the MLflow UI of ``uri`` is: the server itself, or ``mlflow ui``'s default."""
    from caco.tracking import redact

    if uri and str(uri).startswith("http"):
        return redact(uri).replace("***@", "").rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(run: c.Run) -> str | None:
    m = run.mlflow
    if not m or not m.get("run_id") or not m.get("experiment_id"):
        return None
    from caco.tracking import ui_link

    return ui_link(f"experiments/{m['experiment_id']}/runs/{m['run_id']}", ui_base(m.get("uri")))


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.3f}"


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _img(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{data}">')


def _runs_table(runs: list[c.Run]) -> str:
    rows = ["<tr><th>run</th><th>epochs done</th><th>last kNN top-1</th><th>MLflow</th>"
            "<th>directory</th></tr>"]
    for r in runs:
        done = r.history[-1]["epoch"] if r.history else "-"
        knn = r.series("knn_top1")
        url = run_url(r)
        link = f'<a href="{html.escape(url)}">open run</a>' if url else \
            '<span class="muted">not tracked</span>'
        rows.append(f"<tr><td>{html.escape(r.name)}</td><td>{done}/{r.epochs or '?'}</td>"
                    f"<td>{f'{knn[-1][1]:.2f}' if knn else '-'}</td><td>{link}</td>"
                    f"<td><code>{html.escape(r.run_dir)}</code></td></tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _matrix_tables(runs: list[c.Run]) -> str:
    out = []
    for r in runs:
        cells = [cell for cell in r.cells if cell.evaluation]
        if not cells:
            out.append(f"<p><b>{html.escape(r.name)}</b>: <span class='muted'>no evaluation "
                       "recorded yet</span></p>")
            continue
        nodes = list(dict.fromkeys(cell.node for cell in sorted(cells, key=lambda x: x.epoch)))
        epochs = sorted({cell.epoch for cell in cells})
        at = {(cell.epoch, cell.node): cell for cell in cells}
        rows = ["<tr><th>" + html.escape(r.name) + "</th>"
                + "".join(f"<th>{html.escape(n)}</th>" for n in nodes) + "</tr>"]
        for e in epochs:
            tds = []
            for n in nodes:
                cell = at.get((e, n))
                if cell is None:
                    tds.append("<td class='muted'>-</td>")
                    continue
                colour = plots.STATE_COLOURS.get(cell.state, "#ffb300")
                text = f"{cell.headline} {cell.value:.4g}" if cell.state == "COMPLETED" \
                    and cell.value is not None else cell.state
                tip = html.escape(cell.error or json.dumps(cell.metrics), quote=True)
                err = f"<div class='err'>{html.escape((cell.error or '')[:160])}</div>" \
                    if cell.state != "COMPLETED" and cell.error else ""
                tds.append(f"<td class='cell' style='background:{colour}' title=\"{tip}\">"
                           f"{html.escape(text)}{err}</td>")
            rows.append(f"<tr><th>epoch {e}</th>{''.join(tds)}</tr>")
        out.append("<table>" + "\n".join(rows) + "</table>")
    return "\n".join(out)


def _cost_tables(runs: list[c.Run]) -> str:
    rows = ["<tr><th>run</th><th>what</th><th>wall</th><th>CPU-hours</th><th>GPU-hours</th>"
            "<th>source</th></tr>"]
    for r in runs:
        p = r.pretraining
        rows.append(f"<tr><td>{html.escape(r.name)}</td><td>pretraining</td>"
                    f"<td>{_wall(p['wall_s'])}</td><td>{_hours(p['cpu_s'])}</td>"
                    f"<td>{_hours(p['gpu_s'])}</td><td>{html.escape(p['source'])}</td></tr>")
        for cell in sorted(r.cells, key=lambda x: (x.epoch, x.node)):
            source = "sacct" if cell.job_id and cell.job_id[:1].isdigit() else "ledger"
            rows.append(f"<tr><td>{html.escape(r.name)}</td><td>epoch {cell.epoch} "
                        f"{html.escape(cell.node)}</td><td>{_wall(cell.wall_s)}</td>"
                        f"<td>{_hours(cell.cpu_s)}</td><td>{_hours(cell.gpu_s)}</td>"
                        f"<td>{source}</td></tr>")
    milestones = ["<tr><th>run</th><th>checkpoint</th><th>kNN top-1</th><th>wall to reach"
                  "</th><th>CPU-hours</th><th>GPU-hours</th></tr>"]
    for r in runs:
        for m in c.milestone_costs(r):
            milestones.append(f"<tr><td>{html.escape(r.name)}</td><td>epoch {m['epoch']}</td>"
                              f"<td>{m['knn_top1']:.2f}</td><td>{_wall(m['wall_s'])}</td>"
                              f"<td>{_hours(m['cpu_s'])}</td><td>{_hours(m['gpu_s'])}</td></tr>")
    return ("<table>" + "\n".join(rows) + "</table>\n<h2>Cost to reach each milestone's kNN"
            "</h2>\n<p class='muted'>pretraining up to that checkpoint plus its kNN evaluation"
            "</p>\n<table>" + "\n".join(milestones) + "</table>")


def summary(runs: list[c.Run]) -> dict[str, Any]:
    from dataclasses import asdict

    return {"generated": time.time(), "runs": [
        {**{k: v for k, v in asdict(r).items() if k not in ("history", "cells")},
         "cells": [{**asdict(cell), "value": cell.value} for cell in r.cells],
         "history_epochs": [row["epoch"] for row in r.history],
         "milestones": c.milestone_costs(r)} for r in runs]}


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run or sweep directory ``path`` into ``<path>/report/`` (or
    ``out``); returns the path of its ``index.html``."""
    path = Path(path).expanduser().resolve()
    runs, is_sweep = c.collect(path)
    return render(runs, Path(out) if out else path / REPORT_DIR,
                  f"{'sweep' if is_sweep else 'run'} report: {path.name}", str(path))


def write_runs_report(run_dirs: list[str | Path], out: str | Path, title: str) -> Path:
    """The same report over chosen run directories (``compare.py --html``)."""
    return render(c.collect_dirs([Path(d) for d in run_dirs]), Path(out), title,
                  f"{len(run_dirs)} run directories")


def render(runs: list[c.Run], out_dir: Path, title: str, where: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>CaCo {html.escape(title)}</h1>",
             f"<p class='muted'>{html.escape(where)} &middot; generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')} &middot; {len(runs)} run(s)</p>",
             _runs_table(runs)]
    for name, chart_title, draw in CHARTS:
        png = draw(runs, out_dir / name)
        if png is None:
            (out_dir / name).unlink(missing_ok=True)
            parts.append(f"<h2>{html.escape(chart_title)}</h2><p class='muted'>nothing to show "
                         "yet</p>")
            continue
        parts.append(_img(png, chart_title))
        if name == "matrix.png":
            parts.append(_matrix_tables(runs))
        if name == "cost.png":
            parts.append(_cost_tables(runs))
    page = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + f"\n{_LOADED}\n</body></html>\n")
    atomic_write_text(out_dir / "summary.json", json.dumps(summary(runs), indent=1, default=str))
    index = out_dir / "index.html"
    atomic_write_text(index, page)
    return index
