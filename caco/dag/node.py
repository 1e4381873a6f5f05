"""One evaluation node of one checkpoint, run where the executor put it (a local process or a
SLURM job): ``python -m caco.dag.node <job.json>`` or ``NodeRunner()(job)`` through submitit.

The node marks itself RUNNING in the ledger, runs its evaluator (the module the registry
names, imported here only: a pure function of checkpoint + config; or the DAG's report
roll-up) with up to ``retries`` attempts in-process, writes
``<run_dir>/evals/e<epoch>/<node>/metrics.json`` atomically, records COMPLETED or FAILED, and
tracks the result in MLflow: a child run nested under the pretraining run (parent id passed
explicitly), and the headline numbers (the registry's) on the parent as ``eval/<metric>``
with step = epoch (metrics only: the parent is never re-opened, that would flip its status
while it trains).
Tracking goes through the node's own buffered writer, so an outage delays it, never loses it.

Every ledger write carries the node's key: a job superseded by ``dag.py retry`` records
nothing. SIGTERM (the local executor stopping it on Ctrl-C, or its trainer dying) ends the
node CANCELLED (interrupted) and its child run KILLED; the next launch runs it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger, StaleKey
from caco.errors import CacoError
from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

@dataclass
class NodeJob:
    """Everything a node needs, picklable and JSON-able (no config objects, no clients)."""

    run_dir: str
    epoch: int
    node: str
    evaluator: str
    checkpoint: str
    key: str
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    threads: int = 0
    retries: int = 2
    needs: list[str] = field(default_factory=list)
    tracking: dict[str, Any] | None = None  # uri, experiment(_id), parent_state, ...
    tasks: int = 1  # processes (one per GPU); the linear probe trains with DDP across them
    module: str = ""  # the evaluator's module (from the run's registry; empty: today's)
    headline: list[str] = field(default_factory=list)  # metrics also logged on the parent
    output_root: str = ""  # where shared evaluation data (e.g. generated scenes) lives
    final: bool = True  # the run's final checkpoint (baselines are computed next to it)
    cache: str = ""  # a result cache file (evaluate.py backfill): read if there, else written
    use_cache: bool = True  # False (--force): recompute, then replace the cached result
    metric_prefix: str = ""  # parent metrics are eval/<prefix><metric>

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / "evals" / f"e{self.epoch:04d}" / self.node

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> NodeJob:
        return cls(**json.loads(text))


def _slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _cached(job: NodeJob) -> dict[str, Any] | None:
    if not (job.cache and job.use_cache):
        return None
    try:
        return json.loads(Path(job.cache).read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def _store(job: NodeJob, metrics: dict[str, Any]) -> None:
    if job.cache:
        atomic_write_text(Path(job.cache), json.dumps(
            {"metrics": metrics, "evaluator": job.evaluator, "settings": job.settings,
             "checkpoint": job.checkpoint, "created": time.time()}, indent=1, default=str))


def _evaluate(job: NodeJob) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if job.threads:
        import torch

        torch.set_num_threads(int(job.threads))
    from caco.dag.plan import REPORT

    if job.evaluator == REPORT:  # the DAG's own roll-up
        from caco.dag.report import report

        return report(job.run_dir, job.epoch, exclude=job.node)
    from caco.evaluators import load, registered_module

    cfg = OmegaConf.create({"eval": {job.evaluator: job.settings}, "data": job.data,
                            "device": job.device, "output_root": job.output_root or None,
                            "final_checkpoint": job.final})
    return load(job.module or registered_module(job.evaluator)).evaluate(job.checkpoint, cfg)


def child_writer(run_dir: str | os.PathLike, epoch: int, node: str, key: str,
                 tracking: dict[str, Any] | None = None):
    """The MLflow writer of one node run (its child run and its metrics on the parent), from
    the node's job settings or, for a node that is gone, from the run's tracking.json."""
    from caco import tracking as trk

    run_dir = Path(run_dir)
    t = dict(tracking or {})
    if not t:
        info = trk.read_run_file(run_dir) or {}
        if not info.get("uri"):
            return None
        t = {"uri": info["uri"], "experiment_id": info.get("experiment_id"),
             "experiment": info.get("experiment"), "parent_state": str(run_dir / trk.RUN_FILE)}
    trk.use_credentials(t)
    return trk.Tracker(
        t["uri"], t.get("experiment_id"), run_dir / "evals" / f"e{epoch:04d}" / node / "tracking",
        experiment=t.get("experiment"), artifact_root=t.get("artifact_root"),
        state_file=f"{key}.json", pending_file=f"{key}.pending.jsonl",
        parent_state=t.get("parent_state"), http_retries=int(t.get("http_retries", 1)),
        http_timeout=int(t.get("http_timeout", 10)),
        retry_interval_s=float(t.get("retry_interval_s", 30)))


def close_child_run(run_dir: str | os.PathLike, entry: dict[str, Any], status: str) -> None:
    """End the child run of a node whose process is gone (its records are sent first)."""
    writer = child_writer(run_dir, entry["epoch"], entry["node"], entry["key"])
    if writer is not None and writer.state_path.exists():
        writer.end(status)


def _child_tracker(job: NodeJob):
    """The node's MLflow child run: a buffered writer of its own (see caco.tracking), not yet
    started (nothing here talks to the backend)."""
    t = job.tracking
    if not t or not t.get("parent_state"):
        return None
    return child_writer(job.run_dir, job.epoch, job.node, job.key, t)


def _start_child(tracker, job: NodeJob) -> None:
    if tracker is None:
        return
    from caco.tracking import default_tags

    fresh = not tracker.state_path.exists()
    tracker.start(run_name=f"e{job.epoch:04d}-{job.node}", nested=True, tags=default_tags({
        "evaluator": job.evaluator, "node": job.node, "checkpoint_epoch": job.epoch,
        "checkpoint": job.checkpoint, "slurm_job_id": _slurm_job_id() or "none",
        "idempotency_key": job.key}))
    if fresh:
        params = {f"{job.evaluator}.{k}": str(v)[:500] for k, v in job.settings.items()}
        params["checkpoint_epoch"] = str(job.epoch)
        tracker.log_params(params)


def _headline(job: NodeJob) -> list[str]:
    if job.headline:
        return list(job.headline)
    from caco.dag.plan import REPORT
    from caco.dag.report import REPORT_HEADLINE
    from caco.evaluators import get, today_config

    return list(REPORT_HEADLINE if job.evaluator == REPORT else
                get(today_config(), job.evaluator).headline)


def _finish_child(tracker, job: NodeJob, metrics: dict[str, Any], status: str) -> None:
    if tracker is None:
        return
    numbers = _numbers(metrics)
    if numbers:
        tracker.log_metrics(numbers, job.epoch)
    headline = {f"eval/{job.metric_prefix}{k}": numbers[k] for k in _headline(job)
                if k in numbers}
    if headline:
        tracker.log_metrics(headline, job.epoch, parent=True)
    from caco.dag.plan import REPORT

    if job.evaluator == REPORT and status == "FINISHED":
        _publish_report(tracker, job)
    tracker.end(status)


def _publish_report(tracker, job: NodeJob) -> None:
    """The run's report as artifacts of the pretraining run (``report/``), and the run's
    description (its evaluations, linked) as its MLflow note: tags and artifacts only, the
    parent's status is left alone."""
    from caco.dag.report import description
    from caco.report.page import REPORT_DIR
    from caco.tracking import read_run_file

    info = read_run_file(job.run_dir) or {}
    folder = Path(job.run_dir) / REPORT_DIR
    if folder.is_dir():
        tracker.log_artifacts(folder, REPORT_DIR, parent=True)
    tracker.set_tags({"mlflow.note.content": description(
        job.run_dir, info.get("experiment_id"), info.get("run_id"), exclude=job.node)},
        parent=True)


def _process_group(job: NodeJob) -> tuple[int, int]:
    """(rank, world) of this node's processes; a process group when there are several."""
    from omegaconf import OmegaConf

    from caco.distributed import init_distributed

    return init_distributed(OmegaConf.create(
        {"cluster": {"backend": "auto", "dist_timeout_s": 900}, "device": job.device}))


def _follow(job: NodeJob) -> None:
    """A non-zero rank: the same attempts as rank 0 (collectives must match), no records."""
    for _ in range(max(1, int(job.retries) + 1)):
        try:
            _evaluate(job)
            return
        except Exception as e:
            log.warning("rank attempt failed: %s", e)


def run_node(job: NodeJob) -> dict[str, Any]:
    """Run one node with bounded in-process retries; raises when every attempt failed."""
    import torch.distributed as dist

    rank, world = _process_group(job)
    try:
        if rank != 0:
            _follow(job)
            return {}
        return _run_and_record(job, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run_and_record(job: NodeJob, world: int) -> dict[str, Any]:
    ledger = EvalLedger(job.run_dir)
    where = _slurm_job_id()
    # key=: a job whose node was resubmitted since (dag.py retry) must not write over it.
    ledger.update(job.epoch, job.node, key=job.key, state="RUNNING",
                  host=socket.gethostname(), started=time.time(),
                  **({"job_id": where} if where else {}))
    child = _child_tracker(job)
    try:
        _start_child(child, job)
        return _attempts(job, world, ledger, child)
    except (KeyboardInterrupt, SystemExit, Interrupted):
        if child is not None and child.state_path.exists():  # its run exists, or will
            _finish_child(child, job, {}, "KILLED")
        with contextlib.suppress(Exception):
            ledger.update(job.epoch, job.node, key=job.key, state="CANCELLED",
                          error="interrupted before it finished; relaunch the run or "
                          "`dag.py retry` runs it again", interrupted=True,
                          finished=time.time())
        raise


def _attempts(job: NodeJob, world: int, ledger: EvalLedger, child) -> dict[str, Any]:
    attempts = max(1, int(job.retries) + 1)
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        ledger.update(job.epoch, job.node, key=job.key, attempts=attempt)
        t0 = time.perf_counter()
        cached = _cached(job)
        if cached is not None:
            log.info("node %s (epoch %d): cached result of these weights and settings (%s); "
                     "computed nothing", job.node, job.epoch, job.cache)
        try:
            metrics = cached if cached is not None else _evaluate(job)
        except Exception as e:
            message = str(e) if isinstance(e, CacoError) else f"{type(e).__name__}: {e}"
            errors.append(message)
            # A bug shows its traceback in the node's log; a CacoError is its own message.
            log.error("node %s (epoch %d) attempt %d/%d failed: %s", job.node, job.epoch,
                      attempt, attempts, message, exc_info=not isinstance(e, CacoError))
            continue
        if cached is None:
            metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 2),
                       "processes": world}
            _store(job, metrics)
        result = {"node": job.node, "evaluator": job.evaluator, "epoch": job.epoch,
                  "checkpoint": job.checkpoint, "attempts": attempt, **metrics,
                  **({"cached": job.cache} if cached is not None else {})}
        atomic_write_text(job.out_dir / "metrics.json", json.dumps(result, indent=1))
        _finish_child(child, job, metrics, "FINISHED")
        ledger.update(job.epoch, job.node, key=job.key, state="COMPLETED",
                      metrics=_numbers(metrics), child_run_id=child.run_id if child else None,
                      error=None, finished=time.time(), cached=cached is not None)
        log.info("node %s (epoch %d) completed: %s", job.node, job.epoch, _numbers(metrics))
        return result
    _finish_child(child, job, {}, "FAILED")
    ledger.update(job.epoch, job.node, key=job.key, state="FAILED", error=errors[-1],
                  child_run_id=child.run_id if child else None, finished=time.time())
    raise NodeFailed(f"node {job.node} (epoch {job.epoch}) failed {attempts} time(s): "
                     f"{errors[-1]}")


class Interrupted(BaseException):
    """SIGTERM: the process that started this node stops it (Ctrl-C, or it died)."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def _die_with_parent() -> None:
    """A local node ends when the process that started it ends (the trainer's kill -9 or OOM
    must not leave evaluations running that nobody waits for): SIGTERM on its death."""
    parent = os.environ.get("CACO_PARENT_PID")
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise Interrupted()  # it is gone already


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


class NodeFailed(CacoError, RuntimeError):
    """Every attempt of an evaluation node failed (the message has the last error)."""


class NodeRunner:
    """submitit entry point: timeouts and preemptions requeue the node (``checkpoint``)."""

    def __call__(self, job: NodeJob) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO,
                            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        try:
            return run_node(job)
        except Exception:
            log.exception("evaluation node %s (epoch %d) failed", job.node, job.epoch)
            raise

    def checkpoint(self, job: NodeJob):
        import submitit

        return submitit.helpers.DelayedSubmission(NodeRunner(), job)


def main(argv: list[str] | None = None) -> int:
    """``python -m caco.dag.node <job.json>`` (the local executor's process)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    job = NodeJob.from_json(Path(argv[0]).read_text())
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _die_with_parent()
        run_node(job)
    except (NodeFailed, StaleKey) as e:
        log.error("%s", e)
        return 1
    except Interrupted:
        log.warning("node %s (epoch %d) interrupted; recorded CANCELLED", job.node, job.epoch)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
