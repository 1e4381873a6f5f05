"""What ``launch/dag.py`` does: show runs and their evaluation DAGs, recover what failed, stop
what runs. Each command takes a run directory or a sweep directory (every run in it).

- ``status``: per run, the pretraining job (its SLURM state, or the local trainer's process)
  and its last completed epoch, then one line per checkpoint x node from the ledger with the
  SLURM state of its job (a job's row is trusted only when its name is the node's key). With
  SLURM unreachable the ledger is shown and the SLURM column says ``unavailable``.
- ``retry``: resubmits FAILED, CANCELLED and TIMEOUT nodes, nodes whose job died without
  reporting, stranded submissions (SUBMITTING, in neither squeue nor sacct) and local nodes
  whose process is gone, each with its checkpoint's report; ``key=value`` overrides of
  ``dag.*``/``eval.*`` settings apply to the resubmission. ``--pretraining`` resubmits failed,
  cancelled or timed-out sweep points instead (they resume from their ``last.pt``).
- ``cancel``: stops the pretraining jobs and every evaluation job still queued or running;
  the ledger records CANCELLED and MLflow KILLED.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caco.dag.ledger import EvalLedger
from caco.errors import ConfigError
from caco.fileio import read_json
from caco.job_states import ACTIVE, RETRYABLE, SLURM_FINAL, ledger_state

log = logging.getLogger(__name__)

COLUMNS = ["epoch", "node", "state", "slurm", "job", "attempts", "result"]
UNAVAILABLE = "unavailable"
# Sweep points `retry --pretraining` resubmits (sacct's words for "did not finish").
PRETRAINING_RETRYABLE = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                         "PREEMPTED", "BOOT_FAIL", "DEADLINE")


# ---------------------------------------------------------------------------------- where
def run_dirs(path: str | Path) -> tuple[list[Path], Path | None]:
    """The run directories ``path`` stands for, and its sweep directory if it is one."""
    path = Path(path).expanduser().resolve()
    if (path / "config.yaml").exists():
        return [path], None
    from caco import sweep

    manifest = sweep.read(path)
    runs = sorted(p.parent for p in path.glob("*/config.yaml"))
    if manifest is not None:
        recorded = [Path(p["run_dir"]) for p in manifest["points"]]
        runs = sorted(set(runs) | {r for r in recorded})
    if not runs and manifest is None:
        raise ConfigError(f"{path} is not a pretraining run directory (no config.yaml) nor a "
                          "sweep directory (no sweep.json, no run directories)")
    return runs, path


def _run_dir(path: str | Path) -> Path:
    run_dir = Path(path).expanduser().resolve()
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a pretraining run directory (no config.yaml)")
    return run_dir


# ---------------------------------------------------------------------------------- SLURM
def _slurm_rows(job_ids: list[str]) -> dict[str, dict[str, str]] | None:
    """sacct's latest row per job id, or None when SLURM cannot be asked."""
    ids = [str(j) for j in job_ids if j and str(j)[0].isdigit()]
    if not ids:
        return {}
    from caco.slurm_accounting import SlurmUnavailable, latest_rows

    try:
        return latest_rows(ids)
    except SlurmUnavailable:
        return None


def slurm_state(entry: dict[str, Any], rows: dict[str, dict] | None) -> str:
    """The SLURM state of a node's job, if its row is really that node's (name = key)."""
    job = str(entry.get("job_id") or "")
    if not job or not job[0].isdigit():
        return "-"
    if rows is None:
        return UNAVAILABLE
    row = rows.get(job)
    if row is None or row.get("name") != entry.get("key"):
        return "-"
    return row["state"]


def _pretraining(run_dir: Path, point: dict | None, rows: dict | None) -> dict[str, Any]:
    from caco.checkpoint import progress
    from caco.lease import LEASE_FILE
    from caco.processes import alive

    info: dict[str, Any] = {"run_dir": str(run_dir)}
    lease = read_json(run_dir / LEASE_FILE) or {}
    job = (point or {}).get("job_id") or lease.get("slurm_job_id")
    if job:
        info["job_id"] = str(job)
        info["slurm"] = UNAVAILABLE if rows is None else (rows.get(str(job)) or {}).get(
            "state", "-")
        # Not in sacct yet ("-") counts as on its way; unavailable as unknown.
        info["active"] = None if rows is None else info["slurm"] not in SLURM_FINAL
    elif lease:
        running = bool(alive(lease.get("process"))) and not lease.get("released")
        info["process"] = (f"pid {lease.get('pid')} on {lease.get('host')}: "
                           + ("running" if running else lease.get("status") or "gone"))
        info["active"] = running
    else:
        info["active"] = False
    p = progress(run_dir) or {}
    info["epoch"], info["epochs"] = p.get("epoch"), p.get("epochs")
    info["step_in_epoch"] = p.get("step_in_epoch")
    return info


def _pretraining_line(info: dict[str, Any]) -> str:
    if "job_id" in info:
        where = f"SLURM job {info['job_id']} {info['slurm']}"
    else:
        where = f"local trainer {info['process']}" if "process" in info else "not started"
    if info.get("epoch") is None:
        done = "no checkpoint yet"
    else:
        done = f"epoch {info['epoch']}/{info.get('epochs') or '?'} done"
        if info.get("step_in_epoch"):
            done += f" (+{info['step_in_epoch']} steps)"
    return f"pretraining: {where}, {done}"


# ---------------------------------------------------------------------------------- status
_ASK = object()


def status_rows(run_dir: str | Path, rows: Any = _ASK) -> list[dict[str, Any]]:
    """One row per checkpoint x node; ``rows`` are sacct's (None: SLURM did not answer)."""
    from caco.dag.scheduler import local_node_gone

    run_dir = _run_dir(run_dir)
    entries = EvalLedger(run_dir).entries()
    if rows is _ASK:
        rows = _slurm_rows([e.get("job_id") for e in entries])
    out = []
    for e in entries:
        metrics = e.get("metrics") or {}
        shown = ", ".join(f"{k} {v:g}" for k, v in metrics.items()
                          if k not in ("epoch", "seconds") and "." not in k)
        result = shown if e["state"] == "COMPLETED" else (e.get("error") or "")
        if e.get("backend") == "local" and e["state"] in ACTIVE and local_node_gone(e):
            result = "its process is gone: relaunch the run or `dag.py retry` runs it again"
        out.append({"epoch": e["epoch"], "node": e["node"], "state": e["state"],
                    "slurm": slurm_state(e, rows), "job": e.get("job_id") or "-",
                    "attempts": e.get("attempts", 0), "result": result,
                    "error": e.get("error"), "key": e.get("key")})
    return out


def format_table(rows: list[dict[str, Any]], width: int = 110) -> str:
    """Plain columns; a long result is cut to ``width`` characters (``--json`` has it all)."""
    if not rows:
        return "no evaluation nodes recorded yet"
    from caco.table import format_table as table

    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    for row in cells:
        if len(row[-1]) > width:
            row[-1] = row[-1][:width - 3] + "..."
    return table(COLUMNS, cells)


def snapshot(path: str | Path) -> tuple[list[dict[str, Any]], bool, bool]:
    """``(runs, is_sweep, slurm_answered)``: per run its ``pretraining`` info (SLURM job and
    state, or the local trainer's process; epochs done) and its ledger ``rows``; SLURM is
    asked once for every job."""
    from caco import sweep

    runs, sweep_dir = run_dirs(path)
    points = {Path(p["run_dir"]).resolve(): p
              for p in ((sweep.read(sweep_dir) or {}).get("points", []) if sweep_dir else [])}
    if sweep_dir is None:
        found = sweep.point_of_run(runs[0])
        if found:
            points[runs[0]] = found[1]
    ledgers = {r: EvalLedger(r).entries() if (r / "config.yaml").exists() else [] for r in runs}
    jobs = [e.get("job_id") for es in ledgers.values() for e in es]
    jobs += [p.get("job_id") for p in points.values()]
    for r in runs:
        lease = read_json(r / "lease.json") or {}
        jobs.append(lease.get("slurm_job_id"))
    rows = _slurm_rows([j for j in jobs if j])
    out = [{"run_dir": r, "pretraining": _pretraining(r, points.get(r), rows),
            "rows": status_rows(r, rows) if (r / "config.yaml").exists() else []}
           for r in runs]
    return out, sweep_dir is not None, rows is not None


def status(path: str | Path, *, as_json: bool = False) -> str:
    """The text ``dag.py status`` prints (JSON lines, one per node, with ``as_json``)."""
    import json

    runs, is_sweep, answered = snapshot(path)
    blocks, lines = [], []
    for run in runs:
        r, table = run["run_dir"], run["rows"]
        if as_json:
            lines += [json.dumps({"run": str(r), "epoch": t["epoch"], "node": t["node"],
                                  "state": t["state"], "job_id": None if t["job"] == "-"
                                  else t["job"], "attempts": t["attempts"],
                                  "error": t["error"]}) for t in table]
            continue
        head = _pretraining_line(run["pretraining"])
        block = [f"== {r.name}"] if is_sweep else []
        blocks.append("\n".join([*block, head, format_table(table)]))
    if not answered and not as_json:
        blocks.append("(SLURM did not answer: its states are shown as 'unavailable')")
    return "\n".join(lines) if as_json else "\n\n".join(blocks)


# ---------------------------------------------------------------------------------- retry
def _apply_overrides(cfg: DictConfig, overrides: list[str], run_dir: Path) -> DictConfig:
    """``key=value`` (an existing key) / ``+key=value`` (a new one) of dag.* or eval.*,
    checked against the run's config: a wrong key is refused naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar error, as its own words
        raise ConfigError(f"cannot parse the overrides {overrides}: {e}") from None
    for o in parsed:
        key = o.key_or_group
        if not (key.startswith("dag.") or key.startswith("eval.")):
            raise ConfigError(f"{o.input_line}: only dag.* and eval.* settings can change on a "
                              "retry (the run itself is fixed)")
        exists = OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING
        if o.is_add() and exists:
            raise ConfigError(f"{o.input_line}: {key} exists in {run_dir / 'config.yaml'}; "
                              f"drop the +")
        if not o.is_add() and not exists:
            raise ConfigError(f"{o.input_line}: {key} is not a key of {run_dir / 'config.yaml'}"
                              f"; use +{key}=... to add it")
        OmegaConf.update(cfg, key, o.value(), merge=True, force_add=True)
    return cfg


_MISSING = object()


def _needs_retry(entry: dict[str, Any], rows: dict | None) -> bool:
    from caco.dag.scheduler import local_node_gone

    if entry["state"] in RETRYABLE:
        return True
    if local_node_gone(entry):
        return True
    state = slurm_state(entry, rows)
    return entry["state"] in ("SUBMITTED", "RUNNING") and state in SLURM_FINAL and \
        ledger_state(state) != "COMPLETED"


def retry(run_dir: str | Path, overrides: list[str] | None = None, *,
          wait: bool = True) -> list[dict[str, Any]]:
    """Resubmit every node that did not complete (and its checkpoint's report)."""
    from caco.dag.scheduler import DagScheduler

    run_dir = _run_dir(run_dir)
    cfg = _apply_overrides(OmegaConf.load(run_dir / "config.yaml"), list(overrides or []),
                           run_dir)
    ledger = EvalLedger(run_dir)
    scheduler = DagScheduler(cfg, run_dir)
    entries = ledger.entries()
    rows = _slurm_rows([e.get("job_id") for e in entries])
    failed = [e for e in entries if _needs_retry(e, rows)]
    epochs = sorted({e["epoch"] for e in failed})
    for e in failed:
        ledger.reset(e["epoch"], e["node"])
    superseded = []
    for epoch in epochs:
        for e in ledger.entries():
            spec = scheduler.specs.get(e["node"])
            if e["epoch"] == epoch and spec is not None and spec.evaluator == "report":
                ledger.reset(epoch, e["node"])
                if e["state"] in ACTIVE and str(e.get("job_id") or "")[:1].isdigit():
                    superseded.append(str(e["job_id"]))  # it would report the old round
    if superseded:
        import subprocess

        subprocess.run(["scancel", *superseded], capture_output=True, timeout=60)
    submitted = []
    for epoch in epochs:
        checkpoint = next(e["checkpoint"] for e in failed if e["epoch"] == epoch)
        submitted += scheduler.schedule(checkpoint, epoch)
    # Stranded submissions (SUBMITTING: found by key, or submitted now) and nodes of
    # milestones on disk that were never claimed (a scheduler killed half-way).
    submitted += scheduler.catch_up()
    if not submitted:
        log.info("nothing to retry in %s", run_dir)
        scheduler.close(wait=False)
        return []
    if overrides:
        for e in submitted:
            ledger.update(e["epoch"], e["node"], overrides=list(overrides))
    scheduler.close(wait=wait)
    return submitted


def retry_pretraining(path: str | Path) -> list[tuple[int, str, str]]:
    """Resubmit the sweep points whose job did not finish: ``[(num, old job, new job)]``."""
    from caco import sweep

    path = Path(path).expanduser().resolve()
    sweep_dir = path
    manifest = sweep.read(path)
    if manifest is None and (path / "config.yaml").exists():
        found = sweep.point_of_run(path)
        if found:
            sweep_dir, point = found
            manifest = {"points": [point]}
    if manifest is None:
        raise ConfigError(f"{path} is not a SLURM sweep directory (no sweep.json): --pretraining "
                          "resubmits sweep points submitted with -m cluster=slurm")
    rows = _slurm_rows([p["job_id"] for p in manifest["points"]])
    if rows is None:
        raise ConfigError("SLURM did not answer (sacct); cannot tell which sweep points failed")
    done = []
    for point in manifest["points"]:
        state = (rows.get(str(point["job_id"])) or {}).get("state", "UNKNOWN")
        if state not in PRETRAINING_RETRYABLE:
            continue
        new = sweep.resubmit(sweep_dir, point)
        log.info("#%d (%s) was %s -> SLURM job %s", point["num"], point["run_dir"], state, new)
        done.append((point["num"], str(point["job_id"]), new))
    if not done:
        log.info("no sweep point to resubmit (none FAILED, CANCELLED or TIMEOUT)")
    return done


# ---------------------------------------------------------------------------------- cancel
def cancel(path: str | Path, *, wait_s: float = 90.0) -> dict[str, list[str]]:
    """Cancel the pretraining jobs and every evaluation still queued or running.

    The trainers go first (and are waited for): until it ends, a trainer may still schedule
    evaluations of its newest checkpoint.
    """
    from caco import sweep

    runs, sweep_dir = run_dirs(path)
    manifest = sweep.read(sweep_dir) if sweep_dir else None
    points = {Path(p["run_dir"]).resolve(): p for p in (manifest or {}).get("points", [])}
    if sweep_dir is None and (found := sweep.point_of_run(runs[0])):
        points[runs[0]] = found[1]
    slurm_jobs: list[str] = []
    local: list[tuple[Path, dict]] = []
    for r in runs:
        if r in points:
            slurm_jobs.append(str(points[r]["job_id"]))
        else:
            lease = read_json(r / "lease.json") or {}
            if lease.get("slurm_job_id") and not lease.get("released"):
                slurm_jobs.append(str(lease["slurm_job_id"]))
            elif lease and not lease.get("released"):
                local.append((r, lease))
    rows = _slurm_rows(slurm_jobs) or {}
    live = [j for j in slurm_jobs if (rows.get(j) or {}).get("state") not in SLURM_FINAL]
    _scancel(live)
    for r, lease in local:
        _interrupt_local_trainer(r, lease)
    ended = _wait_ended(live, wait_s) or {}
    nodes = [(r, e) for r in runs if (r / "config.yaml").exists()
             for e in EvalLedger(r).entries() if e["state"] in ACTIVE]
    node_jobs = [str(e["job_id"]) for _, e in nodes if str(e.get("job_id") or "")[:1].isdigit()]
    _scancel(node_jobs)
    ended.update(_wait_ended(node_jobs, wait_s) or {})
    for r, e in nodes:
        _close_node(r, e, ended)
    for r in runs:
        if r in points and str(points[r]["job_id"]) in live and \
                ended.get(str(points[r]["job_id"])) != "COMPLETED":
            _close_run(r, "KILLED")
    return {"pretraining": live + [str(r) for r, _ in local], "evaluations": node_jobs}


def _scancel(job_ids: list[str]) -> None:
    import subprocess

    if not job_ids:
        return
    proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(f"scancel failed: {proc.stderr.strip()}")


def _interrupt_local_trainer(run_dir: Path, lease: dict) -> None:
    """A cluster=local trainer: Ctrl-C it (it stops its evaluations and records why)."""
    import os

    from caco.processes import alive

    if alive(lease.get("process")):
        os.kill(int(lease["pid"]), signal.SIGINT)
        log.info("sent Ctrl-C to the trainer of %s (pid %s)", run_dir.name, lease["pid"])


def _wait_ended(job_ids: list[str], wait_s: float) -> dict[str, str] | None:
    """Wait until the jobs' processes are gone (squeue lists a cancelled job as COMPLETING
    until then: accounting says CANCELLED at once), then their final states."""
    from caco.slurm_accounting import SlurmUnavailable, run_command

    deadline = time.monotonic() + wait_s
    while job_ids and time.monotonic() < deadline:
        try:
            proc = run_command(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], 10)
        except SlurmUnavailable:
            break
        if proc.returncode == 0 and not proc.stdout.split():
            break
        time.sleep(1)
    rows = _slurm_rows(job_ids)
    if rows is None:
        return None
    return {j: (rows.get(j) or {}).get("state", "UNKNOWN") for j in job_ids}


def _close_node(run_dir: Path, entry: dict, ended: dict | None) -> None:
    ledger = EvalLedger(run_dir)
    state = (ended or {}).get(str(entry.get("job_id")))
    if state == "COMPLETED":
        return  # it finished before the cancel reached it; it recorded itself
    now = ledger.get(entry["epoch"], entry["node"]) or {}
    if now.get("key") != entry["key"] or now.get("state") not in ACTIVE:
        return
    from caco.dag.node import close_child_run

    ledger.update(entry["epoch"], entry["node"], key=entry["key"], state="CANCELLED",
                  error="cancelled by dag.py cancel", finished=time.time())
    close_child_run(run_dir, entry, "KILLED")


def _close_run(run_dir: Path, status: str) -> None:
    """End a killed pretraining job's MLflow run (through its journal, after what it left)."""
    from caco.tracking import Tracker, read_run_file

    info = read_run_file(run_dir) or {}
    if info.get("uri"):
        Tracker(info["uri"], info.get("experiment_id"), run_dir,
                experiment=info.get("experiment"), retry_interval_s=0).end(status)
