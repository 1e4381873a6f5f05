"""One evaluation node of one checkpoint, run where the executor put it (a local process or a
SLURM job): ``python -m caco.dag.node <job.json>`` or ``NodeRunner()(job)`` through submitit.

The node marks itself RUNNING in the ledger, runs its evaluator (``evals.<evaluator>``, a pure
function of checkpoint + config) with up to ``retries`` attempts in-process, writes
``<run_dir>/evals/e<epoch>/<node>/metrics.json`` atomically, records COMPLETED or FAILED, and
tracks the result in MLflow: a child run nested under the pretraining run (parent id passed
explicitly), and the headline numbers on the parent as ``eval/<metric>`` with step = epoch,
through ``MlflowClient.log_metric`` (the parent is never re-opened: that would flip its status
while it is still training).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.errors import CacoError
from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

# Metrics of each evaluator that also go on the parent run (eval/<name>, step = epoch).
HEADLINE = {
    "knn": ("knn_top1", "knn_top5", "knn_top1_random_init"),
    "linear": ("linear_top1", "linear_top5", "linear_cached_top1", "linear_cached_top5"),
    "detection": ("det_AP", "det_AP50", "det_AP75", "det_AP50_random_init",
                  "det_AP50_supervised"),
    "report": ("dag_failed_nodes",),
}


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
    tracking: dict[str, str] | None = None  # uri, experiment_id, parent_run_id
    tasks: int = 1  # processes (one per GPU); the linear probe trains with DDP across them

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


def _evaluate(job: NodeJob) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if job.threads:
        import torch

        torch.set_num_threads(int(job.threads))
    if job.evaluator == "report":
        from evals.report import report

        return report(job.run_dir, job.epoch, exclude=job.node)
    module = importlib.import_module(f"evals.{job.evaluator}")
    cfg = OmegaConf.create({"eval": {job.evaluator: job.settings}, "data": job.data,
                            "device": job.device})
    return module.evaluate(job.checkpoint, cfg)


class _ChildRun:
    """The node's MLflow child run; tracking failures are logged, never fatal."""

    def __init__(self, job: NodeJob) -> None:
        self.job, self.run_id, self.client = job, None, None
        t = job.tracking
        if not t or not t.get("parent_run_id"):
            return
        try:
            from caco.tracking import _client, default_tags

            self.client = _client(t["uri"])
            tags = default_tags({
                "mlflow.parentRunId": t["parent_run_id"], "evaluator": job.evaluator,
                "node": job.node, "checkpoint_epoch": job.epoch, "checkpoint": job.checkpoint,
                "slurm_job_id": _slurm_job_id() or "none", "idempotency_key": job.key})
            run = self.client.create_run(t["experiment_id"], tags=tags,
                                         run_name=f"e{job.epoch:04d}-{job.node}")
            self.run_id = run.info.run_id
            params = {f"{job.evaluator}.{k}": str(v)[:500] for k, v in job.settings.items()}
            params["checkpoint_epoch"] = str(job.epoch)
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                                  synchronous=True)
        except Exception as e:  # tracking must not decide whether an evaluation runs
            log.warning("MLflow child run not created (%s: %s)", type(e).__name__, e)
            self.client = None

    def finish(self, metrics: dict[str, Any], ok: bool) -> None:
        if self.client is None or self.run_id is None:
            return
        job = self.job
        try:
            numbers = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)}
            ts = int(time.time() * 1000)
            from mlflow.entities import Metric

            if numbers:
                self.client.log_batch(self.run_id, metrics=[
                    Metric(k, v, ts, job.epoch) for k, v in numbers.items()], synchronous=True)
            parent = job.tracking["parent_run_id"]
            for name in HEADLINE.get(job.evaluator, ()):
                if name in numbers:
                    self.client.log_metric(parent, f"eval/{name}", numbers[name], timestamp=ts,
                                           step=job.epoch)
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")
        except Exception as e:
            log.warning("MLflow results not logged (%s: %s)", type(e).__name__, e)


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
    ledger.update(job.epoch, job.node, state="RUNNING", host=socket.gethostname(),
                  started=time.time(), **({"job_id": where} if where else {}))
    child = _ChildRun(job)
    attempts = max(1, int(job.retries) + 1)
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        ledger.update(job.epoch, job.node, attempts=attempt)
        t0 = time.perf_counter()
        try:
            metrics = _evaluate(job)
        except Exception as e:
            message = str(e) if isinstance(e, CacoError) else f"{type(e).__name__}: {e}"
            errors.append(message)
            log.error("node %s (epoch %d) attempt %d/%d failed: %s", job.node, job.epoch,
                      attempt, attempts, message)
            if not isinstance(e, CacoError):
                log.debug("%s", traceback.format_exc())
            continue
        metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 2), "processes": world}
        result = {"node": job.node, "evaluator": job.evaluator, "epoch": job.epoch,
                  "checkpoint": job.checkpoint, "attempts": attempt, **metrics}
        atomic_write_text(job.out_dir / "metrics.json", json.dumps(result, indent=1))
        child.finish(metrics, ok=True)
        ledger.update(job.epoch, job.node, state="COMPLETED", metrics=_numbers(metrics),
                      child_run_id=child.run_id, error=None, finished=time.time())
        log.info("node %s (epoch %d) completed: %s", job.node, job.epoch, _numbers(metrics))
        return result
    child.finish({}, ok=False)
    ledger.update(job.epoch, job.node, state="FAILED", error=errors[-1],
                  child_run_id=child.run_id, finished=time.time())
    raise NodeFailed(f"node {job.node} (epoch {job.epoch}) failed {attempts} time(s): "
                     f"{errors[-1]}")


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
        return run_node(job)

    def checkpoint(self, job: NodeJob):
        import submitit

        return submitit.helpers.DelayedSubmission(NodeRunner(), job)


def main(argv: list[str] | None = None) -> int:
    """``python -m caco.dag.node <job.json>`` (the local executor's process)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    job = NodeJob.from_json(Path(argv[0]).read_text())
    try:
        run_node(job)
    except NodeFailed as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
