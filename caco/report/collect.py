"""What a report shows, read from run directories (nothing here draws or talks to MLflow).

A run is a directory with a ``config.yaml``; a sweep is a directory of runs (``sweep.json``
and/or ``*/config.yaml``). Per run: its evaluation cells (checkpoint epoch x DAG node, from
the ledger: state, metrics, error, job), its training history (``train_history.jsonl``), and
its cost: SLURM jobs from sacct (every requeued run counted), local work from the ledger's
start/end times and the history's epoch times.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caco.fileio import read_json

log = logging.getLogger(__name__)

BASELINE_SUFFIXES = ("_random_init", "_pixels", "_pixels_centred", "_supervised")
TRAIN_CURVES = ("train/loss", "train/lr", "train/positive_prob", "train/positive_columns_frac",
                "train/images_per_sec")


@dataclass
class Cell:
    """One checkpoint x evaluation node."""

    epoch: int
    node: str
    evaluator: str
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    job_id: str | None = None
    headline: str | None = None  # the metric shown in the matrix
    wall_s: float | None = None
    cpu_s: float | None = None
    gpu_s: float | None = None

    @property
    def value(self) -> float | None:
        return self.metrics.get(self.headline) if self.headline else None

    @property
    def evaluation(self) -> bool:
        """An evaluation (what the matrix shows), not the DAG's own roll-up."""
        return self.evaluator != "report"


@dataclass
class Run:
    name: str
    run_dir: str
    epochs: int | None
    cells: list[Cell]
    history: list[dict[str, Any]]  # one row per epoch, the last line of each epoch
    headline: dict[str, list[str]]  # evaluator -> its headline metrics
    pretraining: dict[str, Any]  # jobs, wall_s, cpu_s, gpu_s, source
    mlflow: dict[str, Any] | None  # uri, experiment_id, run_id

    def series(self, metric: str) -> list[tuple[int, float]]:
        """``(epoch, value)`` of an evaluation metric over the checkpoints (COMPLETED cells)."""
        points = {c.epoch: c.metrics[metric] for c in self.cells
                  if c.state == "COMPLETED" and metric in c.metrics}
        return sorted(points.items())

    def metrics(self) -> list[str]:
        """Evaluation metrics to plot: each evaluator's headline metrics that are not
        baselines, in registry order."""
        out: list[str] = []
        for cell in self.cells:
            if not cell.evaluation:
                continue
            for m in self.headline.get(cell.evaluator, []):
                if m not in out and not is_baseline(m) and m in cell.metrics:
                    out.append(m)
        return out

    def baselines(self, metric: str) -> dict[str, float]:
        """The baselines of ``metric`` this run has (``<metric><suffix>``, latest value)."""
        found: dict[str, float] = {}
        for suffix in BASELINE_SUFFIXES:
            series = self.series(metric + suffix)
            if series:
                found[suffix.lstrip("_")] = series[-1][1]
        return found


def is_baseline(metric: str) -> bool:
    return metric.endswith(BASELINE_SUFFIXES)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """``train_history.jsonl``: the last line of each epoch, epochs in order (a torn line, from
    a kill mid-write, is skipped)."""
    path = Path(run_dir) / "train_history.jsonl"
    rows: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = {**rows.get(row["epoch"], {}), **row}
    return [rows[e] for e in sorted(rows)]


def run_dirs(path: str | Path) -> tuple[list[Path], bool]:
    """The run directories ``path`` stands for and whether it is a sweep."""
    from caco.dag.admin import run_dirs as dirs

    runs, sweep_dir = dirs(path)
    return [r for r in runs if (r / "config.yaml").exists()], sweep_dir is not None


def _config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    except Exception as e:  # a run directory whose config cannot be read is still reported
        log.warning("%s/config.yaml is unreadable (%s)", run_dir, e)
        return {}


def _headlines(config: dict[str, Any]) -> dict[str, list[str]]:
    from caco.dag.report import REPORT_HEADLINE

    out = {name: list(node.get("headline") or []) for name, node in
           (config.get("eval") or {}).items() if isinstance(node, dict)}
    out["report"] = list(REPORT_HEADLINE)
    return out


def _node_settings(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dict(node or {}) for name, node in
            ((config.get("dag") or {}).get("nodes") or {}).items()}


def _pretraining_jobs(run_dir: Path) -> list[str]:
    from caco import sweep

    jobs: list[str] = []
    found = sweep.point_of_run(run_dir)
    if found:
        point = found[1]
        jobs += [str(j) for j in point.get("jobs") or [point.get("job_id")] if j]
    lease = read_json(run_dir / "lease.json") or {}
    if lease.get("slurm_job_id"):
        jobs.append(str(lease["slurm_job_id"]))
    return sorted(set(jobs))


def collect_run(run_dir: str | Path, costs: dict[str, dict[str, float]] | None = None) -> Run:
    """One run's record; ``costs`` are sacct's (see :func:`collect`), None: not asked."""
    from caco.dag.ledger import EvalLedger, LedgerError

    run_dir = Path(run_dir).resolve()
    config = _config(run_dir)
    headline = _headlines(config)
    nodes = _node_settings(config)
    try:
        entries = EvalLedger(run_dir).entries()
    except LedgerError as e:
        log.warning("%s", e)
        entries = []
    cells = []
    for e in entries:
        spec = nodes.get(e["node"], {})
        evaluator = str(spec.get("evaluator") or e.get("evaluator") or e["node"])
        names = headline.get(evaluator) or []
        metrics = dict(e.get("metrics") or {})
        shown = [n for n in names if n in metrics and not is_baseline(n)] or names
        cell = Cell(epoch=int(e["epoch"]), node=e["node"], evaluator=evaluator,
                    state=e["state"], metrics=metrics, error=e.get("error"),
                    job_id=str(e["job_id"]) if e.get("job_id") else None,
                    headline=shown[0] if shown else None)
        _cell_cost(cell, e, spec.get("resources") or {}, costs)
        cells.append(cell)
    history = read_history(run_dir)
    info = read_json(run_dir / "tracking.json") or {}
    mlflow = ({"uri": info.get("uri"), "experiment_id": info.get("experiment_id"),
               "run_id": info.get("run_id")} if info.get("run_id") else None)
    epochs = config.get("epochs")
    return Run(name=run_dir.name, run_dir=str(run_dir),
               epochs=int(epochs) if isinstance(epochs, int) else None, cells=cells,
               history=history, headline=headline,
               pretraining=_pretraining_cost(run_dir, history, costs), mlflow=mlflow)


def _cell_cost(cell: Cell, entry: dict[str, Any], resources: dict[str, Any],
               costs: dict[str, dict[str, float]] | None) -> None:
    sacct = (costs or {}).get(cell.job_id or "")
    if sacct:
        cell.wall_s, cell.cpu_s, cell.gpu_s = sacct["wall_s"], sacct["cpu_s"], sacct["gpu_s"]
        return
    if entry.get("started") and entry.get("finished"):
        wall = max(0.0, float(entry["finished"]) - float(entry["started"]))
        tasks = int(resources.get("tasks") or 1)
        threads = int(resources.get("threads") or resources.get("cpus") or 1)
        gpus = int(resources.get("gpus") or 0) if str(resources.get("device", "auto")) != "cpu" \
            else 0
        cell.wall_s, cell.cpu_s, cell.gpu_s = wall, wall * tasks * threads, wall * gpus


def _pretraining_cost(run_dir: Path, history: list[dict[str, Any]],
                      costs: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    jobs = _pretraining_jobs(run_dir)
    sacct = [costs[j] for j in jobs if costs and j in costs]
    if sacct:
        return {"jobs": jobs, "source": "sacct", "wall_s": sum(c["wall_s"] for c in sacct),
                "cpu_s": sum(c["cpu_s"] for c in sacct), "gpu_s": sum(c["gpu_s"] for c in sacct)}
    wall = cpu = gpu = 0.0
    for row in history:
        t = float(row.get("train/epoch_time_s") or 0.0)
        world = int(row.get("world") or 1)
        wall += t
        cpu += t * world * int(row.get("threads") or 1)
        gpu += t * world if row.get("device") == "cuda" else 0.0
    return {"jobs": jobs, "source": "epoch times", "wall_s": wall, "cpu_s": cpu, "gpu_s": gpu}


def collect(path: str | Path) -> tuple[list[Run], bool]:
    """Every run of ``path`` (a run or a sweep directory) and whether it is a sweep."""
    dirs, is_sweep = run_dirs(path)
    return collect_dirs(dirs), is_sweep


def collect_dirs(dirs: list[Path]) -> list[Run]:
    """The runs of these directories; SLURM is asked once for all their jobs' costs (without
    an answer, local times are used)."""
    from caco.dag.ledger import EvalLedger, LedgerError
    from caco.slurm_accounting import SlurmUnavailable, job_costs

    jobs: list[str] = []
    for d in dirs:
        jobs += _pretraining_jobs(d)
        with contextlib.suppress(LedgerError):  # collect_run says so
            jobs += [str(e["job_id"]) for e in EvalLedger(d).entries() if e.get("job_id")]
    costs = None
    if any(j[:1].isdigit() for j in jobs):
        try:
            costs = job_costs(jobs)
        except SlurmUnavailable as e:
            log.warning("SLURM accounting unavailable (%s): costs from local times", e)
    return [collect_run(d, costs) for d in dirs]


def milestone_costs(run: Run) -> list[dict[str, Any]]:
    """Per checkpoint with a completed kNN: its top-1 and what reaching it cost (pretraining
    up to that epoch, pro rata of the epoch times, plus that kNN's own cost)."""
    total = sum(float(r.get("train/epoch_time_s") or 0) for r in run.history)
    out = []
    for cell in sorted(run.cells, key=lambda c: c.epoch):
        if cell.evaluator != "knn" or cell.state != "COMPLETED" or "knn_top1" not in cell.metrics:
            continue
        upto = sum(float(r.get("train/epoch_time_s") or 0) for r in run.history
                   if int(r["epoch"]) <= cell.epoch)
        share = upto / total if total else (cell.epoch / run.epochs if run.epochs else 1.0)
        p = run.pretraining
        out.append({"epoch": cell.epoch, "node": cell.node, "knn_top1": cell.metrics["knn_top1"],
                    "wall_s": p["wall_s"] * share + (cell.wall_s or 0),
                    "cpu_s": p["cpu_s"] * share + (cell.cpu_s or 0),
                    "gpu_s": p["gpu_s"] * share + (cell.gpu_s or 0)})
    return out


def short_names(names: list[str], width: int = 40) -> list[str]:
    """Short names of sweep points: the number and the whole ``key=value`` items in which the
    directory names differ (``0 seed=0``); a lone name is cut to ``width``."""
    def cut(text: str) -> str:
        return text if len(text) <= width else text[:width - 1] + "…"

    if len(names) < 2:
        return [cut(n) for n in names]
    parts = []
    for name in names:
        num, sep, rest = name.partition("_")
        parts.append((num, rest) if sep and num.isdigit() else ("", name))
    rests = [rest for _, rest in parts]
    lo, hi = _common(rests), _common([x[::-1] for x in rests])
    out = []
    for num, rest in parts:
        start = rest.rfind(",", 0, lo) + 1
        end = rest.find(",", max(lo, len(rest) - hi))
        middle = rest[start:end if end >= 0 else len(rest)] if lo + hi < len(rest) else rest
        out.append(cut(" ".join(x for x in (num, middle) if x)))
    return out


def _common(texts: list[str]) -> int:
    """How many leading characters all texts share."""
    n = 0
    while all(len(t) > n for t in texts) and len({t[n] for t in texts}) == 1:
        n += 1
    return n
