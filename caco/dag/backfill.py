"""Evaluate the existing checkpoints of past runs (``launch/evaluate.py eval=<name> runs=<dir>``).

Each (run, checkpoint) becomes a DAG node of that run: claimed in its ledger under the
submission lock (as the trainer's scheduler does, so a run still training is never gone
around), run by the same executors (local processes, or SLURM jobs with ``cluster=slurm``),
tracked as a child run of the pretraining run with its headline numbers on the parent as
``eval/<metric>`` at step = epoch.

Results are cached in ``<output_root>/evals/cache/<key>.json`` by (the checkpoint's weights
digest, the evaluator, its settings, the data, the model config and seed, whether it is the
final checkpoint): asking again computes nothing and says so, yet every asking run still gets
its own metrics.json, ledger entry, child run and parent metrics. ``force=true`` (``--force``)
recomputes. The node is named after the evaluator, plus the settings given on the command
line (``eval.knn.k=20`` -> ``knn_k20``, its parent metrics ``eval/knn_k20.<metric>``), so new
settings never overwrite the DAG's own results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caco.config import plain
from caco.errors import ConfigError

log = logging.getLogger(__name__)

CHOICES = ("all", "milestones", "last")


def checkpoints_of(run_dir: Path, which: str) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of a run's milestone checkpoints: every one (``all``, also
    ``milestones``), or the newest (``last``). ``all`` adds ``last.pt`` when its epoch has no
    milestone file and the run is not training (a file being rewritten is no checkpoint)."""
    if which not in CHOICES:
        raise ConfigError(f"checkpoints={which!r}: use one of {list(CHOICES)}")
    from caco.checkpoint import milestones, progress
    from caco.fileio import read_json
    from caco.lease import LEASE_FILE

    found = milestones(run_dir / "checkpoints")
    if which == "all":
        last = run_dir / "checkpoints" / "last.pt"
        done = progress(run_dir) or {}
        epoch = done.get("epoch")
        released = (read_json(run_dir / LEASE_FILE) or {}).get("released")
        if last.exists() and epoch and epoch not in dict(found) and released \
                and not done.get("step_in_epoch"):
            found.append((int(epoch), last))
    return found[-1:] if which == "last" else found


def given_settings(name: str, overrides: list[str]) -> dict[str, Any]:
    """The ``eval.<name>.*`` settings given on the command line (Hydra's override strings),
    as ``{key: value}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    prefix = f"eval.{name}."
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key.startswith(prefix):
            out[key[len(prefix):]] = yaml.safe_load(value) if value else None
    return out


def node_name(name: str, settings: dict[str, Any], given: str | None) -> str:
    if given:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(given)):
            raise ConfigError(f"node={given!r}: use letters, digits, '_', '.' or '-'")
        return str(given)
    if not settings:
        return name
    parts = [f"{k.replace('.', '_')}{v}" for k, v in sorted(settings.items())]
    return re.sub(r"[^A-Za-z0-9_.-]", "", "_".join([name, *parts]))[:80]


def cache_key(job) -> str:
    """What an evaluation's result depends on: the weights (not the file: identical weights
    from another run hit), the evaluator and its settings, the data, the model and seed."""
    from caco.checkpoint import read_checkpoint, weights_digest

    ckpt = read_checkpoint(job.checkpoint)
    config = ckpt.get("config") or {}
    what = {"weights": weights_digest(ckpt), "evaluator": job.evaluator, "module": job.module,
            "settings": job.settings, "data": job.data, "final": job.final,
            "model": config.get("model"), "seed": config.get("seed")}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _run_config(run_dir: Path, name: str, cluster: str | None, cfg: DictConfig) -> DictConfig:
    """The run's own config, with the evaluator (today's registry entry if the run predates
    it) and the executor this command asks for (``cluster``: the command's local|slurm with
    its partition and sbatch options, or None: the run's own)."""
    from caco.evaluators import registry, today_config

    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    if name not in registry(run_cfg):
        today = registry(today_config())
        if name not in today:
            raise ConfigError(f"eval={name}: no such evaluator (configs/eval/ has "
                              f"{sorted(today)})")
        OmegaConf.update(run_cfg, f"eval.{name}", OmegaConf.to_container(
            today_config().eval[name], resolve=True), force_add=True)
    if cluster and cluster != OmegaConf.select(run_cfg, "cluster.name", default=None):
        run_cfg.cluster = OmegaConf.create(OmegaConf.to_container(cfg.cluster, resolve=True))
    if not OmegaConf.select(run_cfg, "cluster.name", default=None):
        OmegaConf.update(run_cfg, "cluster.name", "local", force_add=True)
    return run_cfg


def node_resources(run_cfg: DictConfig, node: str, name: str,
                   given: dict[str, Any]) -> dict[str, Any]:
    """The run's DAG resources for this node (or for its evaluator's node), then ``given``."""
    nodes = plain(OmegaConf.select(run_cfg, "dag.nodes", default=None))
    base = (nodes.get(node) or nodes.get(name) or {}).get("resources") or {}
    return {**base, **given}


def backfill(cfg: DictConfig, name: str, overrides: list[str]) -> int:
    """Evaluate ``cfg.runs``'s checkpoints with evaluator ``name``; returns the exit status
    (0: every evaluation completed or was submitted, 1: one failed)."""
    from caco.dag.admin import run_dirs
    from caco.dag.plan import NodeSpec
    from caco.dag.scheduler import DagScheduler

    runs, _ = run_dirs(cfg.runs)
    runs = [r for r in runs if (r / "config.yaml").exists()]
    if not runs:
        raise ConfigError(f"runs={cfg.runs}: no run directory (with config.yaml) there")
    settings = given_settings(name, overrides)
    node = node_name(name, settings, cfg.get("node"))
    cluster = OmegaConf.select(cfg, "cluster.name", default=None)
    resources = {k: v for k, v in plain(cfg.get("resources")).items() if v is not None}
    waiting, failed, submitted = [], 0, 0
    for run_dir in runs:
        ckpts = checkpoints_of(run_dir, str(cfg.checkpoints))
        if not ckpts:
            log.warning("%s: no checkpoint to evaluate (checkpoints=%s)", run_dir.name,
                        cfg.checkpoints)
            continue
        run_cfg = _run_config(run_dir, name, cluster, cfg)
        scheduler = DagScheduler(run_cfg, run_dir)
        spec = NodeSpec(node, name, resources=node_resources(run_cfg, node, name, resources),
                        settings=settings)
        for epoch, path in ckpts:
            entry = scheduler.ledger.get(epoch, node)
            if entry is not None and (entry["state"] in ("SUBMITTING", "SUBMITTED", "RUNNING")
                                      or (entry["state"] == "COMPLETED" and not cfg.force)):
                shown = ", ".join(f"{k} {v:g}" for k, v in (entry.get("metrics") or {}).items()
                                  if k not in ("epoch", "seconds", "processes"))
                log.info("%s epoch %d %s: already %s%s (force=true recomputes)", run_dir.name,
                         epoch, node, entry["state"], f": {shown}" if shown else "")
                continue
            if entry is not None:
                scheduler.ledger.reset(epoch, node)  # the old record goes to the history
            job = scheduler._job(spec, str(path), epoch, "")
            key = cache_key(job)
            cache = Path(str(run_cfg.output_root)).expanduser().resolve() / "evals" / \
                "cache" / f"{key}.json"
            hit = cache.exists() and not cfg.force
            fields = {"cache": str(cache), "use_cache": not cfg.force,
                      "metric_prefix": "" if node == name else f"{node}."}
            if hit:
                failed += _record_cached(scheduler, spec, str(path), epoch, fields)
                continue
            entry = scheduler.submit_node(spec, str(path), epoch, **fields)
            if entry is None:
                continue
            submitted += 1
            log.info("%s epoch %d %s: %s as %s", run_dir.name, epoch, node,
                     entry["state"].lower(), entry.get("job_id"))
        waiting.append((run_dir, scheduler, node))
    for _, scheduler, _ in waiting:
        scheduler.executor.wait()
    for run_dir, scheduler, node in waiting:
        for e in scheduler.ledger.entries():
            if e["node"] == node and e["state"] in ("FAILED", "CANCELLED", "TIMEOUT"):
                failed += 1
                log.error("%s epoch %d %s %s: %s", run_dir.name, e["epoch"], node, e["state"],
                          e.get("error"))
        _redraw(run_dir)
    if submitted and cluster == "slurm":
        log.info("follow them with: python launch/dag.py status %s --watch", cfg.runs)
    return 1 if failed else 0


def _record_cached(scheduler, spec, checkpoint: str, epoch: int, fields: dict) -> int:
    """A cache hit: recorded for this run by the node's own code, in this process (no job:
    there is nothing to compute). Returns 1 if recording failed."""
    from caco.dag.node import NodeFailed, _run_and_record

    with scheduler.ledger.submission_lock():
        entry = scheduler.ledger.claim(epoch, spec.name, checkpoint)
    if entry is None:
        return 0
    job = scheduler._job(spec, checkpoint, epoch, entry["key"])
    for k, v in fields.items():
        setattr(job, k, v)
    scheduler.ledger.update(epoch, spec.name, state="SUBMITTED", job_id="cache",
                            backend="cache")
    try:
        result = _run_and_record(job, 1)
    except NodeFailed as e:
        log.error("%s", e)
        return 1
    shown = ", ".join(f"{k} {v:g}" for k, v in result.items() if isinstance(v, int | float)
                      and k not in ("epoch", "seconds", "processes", "attempts"))
    log.info("%s epoch %d %s: cached result, computed nothing (%s)", Path(job.run_dir).name,
             epoch, spec.name, shown)
    return 0


def _redraw(run_dir: Path) -> None:
    from caco.report import write_report

    try:
        write_report(run_dir)
    except Exception as e:  # the evaluations are recorded; only the picture is late
        log.warning("%s: report not redrawn (%s)", run_dir, e)
