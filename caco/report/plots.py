"""The report's charts, drawn with matplotlib's object API (no pyplot state, no display).

Each function takes the collected runs (:mod:`caco.report.collect`) and writes one PNG,
returning its path, or None when there is nothing to draw (a run with no evaluation yet has
no metric chart; the page says so instead of showing an empty frame).
"""

from __future__ import annotations

import math
from pathlib import Path

from caco.report.collect import TRAIN_CURVES, Run, short_names

STATE_COLOURS = {"COMPLETED": "#2e7d32", "FAILED": "#c62828", "TIMEOUT": "#c62828",
                 "CANCELLED": "#9e9e9e", "RUNNING": "#1565c0", "SUBMITTED": "#90caf9",
                 "SUBMITTING": "#90caf9"}
_DPI = 100


def _figure(n: int, per_row: int = 3, size: tuple[float, float] = (4.6, 3.2)):
    from matplotlib.figure import Figure

    cols = min(per_row, max(1, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def labels(runs: list[Run], width: int = 40) -> dict[str, str]:
    """Legend names (see :func:`caco.report.collect.short_names`) by run directory."""
    return dict(zip((r.run_dir for r in runs), short_names([r.name for r in runs], width)))


def _colours(runs: list[Run]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {r.run_dir: cmap(i % 10) for i, r in enumerate(runs)}


def eval_metrics(runs: list[Run], path: Path) -> Path | None:
    """Every evaluation metric against checkpoint epoch, a line per run; its baselines
    (random init, raw pixels, ...) as dashed lines in the run's colour."""
    metrics: list[str] = []
    for r in runs:
        metrics += [m for m in r.metrics() if m not in metrics]
    if not metrics:
        return None
    fig, axes = _figure(len(metrics))
    colours, names = _colours(runs), labels(runs)
    styles = {"random_init": "--", "pixels": ":", "pixels_centred": "-.", "supervised": "--"}
    for ax, metric in zip(axes, metrics):
        for r in runs:
            series = r.series(metric)
            if not series:
                continue
            xs, ys = zip(*series)
            ax.plot(xs, ys, marker="o", color=colours[r.run_dir], label=names[r.run_dir])
            for name, value in r.baselines(metric).items():
                ax.axhline(value, color=colours[r.run_dir], linestyle=styles.get(name, "--"),
                           linewidth=1.2, label=f"{names[r.run_dir]}: {name.replace('_', ' ')}")
        ax.set_title(f"eval/{metric}")
        ax.set_xlabel("checkpoint epoch")
        _integer_epochs(ax, {e for r in runs for e, _ in r.series(metric)})
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def training_curves(runs: list[Run], path: Path) -> Path | None:
    curves = [c for c in TRAIN_CURVES if any(c in row for r in runs for row in r.history)]
    if not curves:
        return None
    fig, axes = _figure(len(curves))
    colours, names = _colours(runs), labels(runs)
    for ax, curve in zip(axes, curves):
        for r in runs:
            points = [(row["epoch"], row[curve]) for row in r.history if curve in row]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=".", color=colours[r.run_dir], label=names[r.run_dir])
        ax.set_title(curve)
        ax.set_xlabel("epoch")
        _integer_epochs(ax, {row["epoch"] for r in runs for row in r.history if curve in row})
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def matrix(runs: list[Run], path: Path) -> Path | None:
    """Per run, checkpoints (rows) x nodes (columns): the state as colour, the headline
    number (or the state's name) as text."""
    cells = {r.run_dir: [c for c in r.cells if c.evaluation] for r in runs}
    shown = [r for r in runs if cells[r.run_dir]]
    if not shown:
        return None
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    heights = [max(1, len({c.epoch for c in cells[r.run_dir]})) for r in shown]
    width = max(4.0, 1.6 * max(len({c.node for c in cells[r.run_dir]}) for r in shown) + 1.5)
    fig = Figure(figsize=(width, sum(0.55 * h + 0.9 for h in heights) + 0.6), dpi=_DPI,
                 layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, r in zip(axes, shown):
        mine = cells[r.run_dir]
        epochs = sorted({c.epoch for c in mine})
        nodes = list(dict.fromkeys(c.node for c in sorted(mine, key=lambda c: c.epoch)))
        ax.set_xlim(0, len(nodes))
        ax.set_ylim(len(epochs), 0)
        for c in mine:
            x, y = nodes.index(c.node), epochs.index(c.epoch)
            ax.add_patch(_rect(x, y, STATE_COLOURS.get(c.state, "#ffb300")))
            text = f"{c.headline}\n{c.value:.4g}" if c.state == "COMPLETED" and \
                c.value is not None else c.state
            ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=9,
                    color="white" if c.state in ("COMPLETED", "FAILED", "RUNNING") else "black")
        ax.set_xticks([i + 0.5 for i in range(len(nodes))], nodes)
        ax.set_yticks([i + 0.5 for i in range(len(epochs))], [f"epoch {e}" for e in epochs])
        ax.tick_params(length=0)
        ax.set_title(labels(runs, 80)[r.run_dir], fontsize=10, loc="left")
    states = sorted({c.state for r in shown for c in cells[r.run_dir]})
    fig.legend(handles=[Patch(color=STATE_COLOURS.get(s, "#ffb300"), label=s) for s in states],
               loc="outside lower center", ncols=len(states), fontsize=8)
    fig.savefig(path)
    return path


def _integer_epochs(ax, epochs: set[int]) -> None:
    """Epoch ticks are whole numbers: the epochs themselves when there are few."""
    from matplotlib.ticker import MaxNLocator

    if 0 < len(epochs) <= 12:
        ax.set_xticks(sorted(epochs))
        if len(epochs) == 1:
            e = next(iter(epochs))
            ax.set_xlim(e - 1, e + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _rect(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.03, y + 0.05), 0.94, 0.9, color=colour)


def cost(runs: list[Run], path: Path) -> Path | None:
    """CPU-hours (and GPU-hours, when any GPU was used) per run, pretraining and
    evaluations stacked."""
    if not runs:
        return None
    units = ["cpu_s"]
    if any(r.pretraining.get("gpu_s") or any(c.gpu_s for c in r.cells) for r in runs):
        units.append("gpu_s")
    fig, axes = _figure(len(units), per_row=2, size=(max(4.6, 1.2 * len(runs) + 2), 3.4))
    names = [labels(runs, 24)[r.run_dir] for r in runs]
    for ax, unit in zip(axes, units):
        pre = [r.pretraining.get(unit, 0) / 3600 for r in runs]
        ev = [sum((c.__dict__.get(unit) or 0) for c in r.cells) / 3600 for r in runs]
        ax.bar(names, pre, label="pretraining", color="#5c6bc0")
        ax.bar(names, ev, bottom=pre, label="evaluations", color="#ffa726")
        ax.set_title("CPU-hours" if unit == "cpu_s" else "GPU-hours")
        ax.tick_params(axis="x", labelrotation=20)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return path
