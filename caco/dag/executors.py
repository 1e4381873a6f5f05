"""Where evaluation nodes run: the one small interface the scheduler talks to.

- :class:`LocalExecutor` (``cluster=local``): one background thread runs the nodes one at a
  time, in submission order (the scheduler submits each checkpoint's nodes dependencies
  first), each as its own process (``python -m caco.dag.node``), so an evaluation crash never
  takes the training process with it. A node whose ``afterok`` dependency did not complete is
  recorded CANCELLED without running; ``afterany`` nodes (report) always run.
- :class:`SlurmExecutor` (``cluster=slurm``): one submitit job per node, named by its
  idempotency key, with SLURM dependencies (``afterok``/``afterany`` on the job ids of the
  nodes it needs, ``--kill-on-invalid-dep=yes`` so a failed dependency cancels instead of
  pending forever); submitted with the submitting job's SLURM_* variables hidden
  (``submitit.helpers.clean_env``). ``lookup`` finds a job by that name (squeue, then sacct),
  which is how a submission interrupted by a crash is recognised instead of repeated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.dag.node import NodeJob
from caco.dag.worker import Worker
from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

Dependency = tuple[str, str, str]  # (afterok|afterany, node name, job id)


class LocalExecutor:
    kind = "local"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._worker = Worker(lambda item: self._run(*item), "caco-dag-local")

    def submit(self, job: NodeJob, resources: Mapping[str, Any],
               after: Sequence[Dependency]) -> str:
        path = self.run_dir / "dag" / "jobs" / f"e{job.epoch:04d}-{job.node}.json"
        atomic_write_text(path, job.to_json())
        self._worker.put((job, path, list(after)))
        return f"local-e{job.epoch:04d}-{job.node}"

    def lookup(self, key: str) -> str | None:
        return None  # local node processes end with the process that ran them

    def pending(self) -> int:
        return self._worker.pending()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted node has run; False if ``timeout`` passed first."""
        return self._worker.join(timeout)

    def _run(self, job: NodeJob, path: Path, after: Sequence[Dependency]) -> None:
        ledger = EvalLedger(job.run_dir)
        for kind, node, _ in after:
            state = (ledger.get(job.epoch, node) or {}).get("state")
            if kind == "afterok" and state != "COMPLETED":
                ledger.update(job.epoch, job.node, state="CANCELLED",
                              error=f"dependency {node} ended {state}")
                log.warning("evaluation %s of epoch %d cancelled: %s ended %s", job.node,
                            job.epoch, node, state)
                return
        logfile = self.run_dir / "dag" / "logs" / f"e{job.epoch:04d}-{job.node}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        log.info("evaluation %s of epoch %d running (log %s)", job.node, job.epoch, logfile)
        launcher = [sys.executable]
        if job.tasks > 1:  # one process per task, as the SLURM job would have
            launcher += ["-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={job.tasks}"]
        with open(logfile, "ab") as out:
            proc = subprocess.run([*launcher, "-m", "caco.dag.node", str(path)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=Path(__file__).resolve().parents[2])
        entry = ledger.get(job.epoch, job.node) or {}
        if proc.returncode != 0 and entry.get("state") not in ("FAILED", "COMPLETED"):
            ledger.update(job.epoch, job.node, state="FAILED",
                          error=f"process exited with status {proc.returncode} (see {logfile})")
        log.info("evaluation %s of epoch %d: %s", job.node, job.epoch,
                 (ledger.get(job.epoch, job.node) or {}).get("state"))


class SlurmExecutor:
    kind = "slurm"

    def __init__(self, run_dir: str | os.PathLike, *, max_num_timeout: int = 3,
                 additional_parameters: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "dag" / "slurm" / "%j"
        self.max_num_timeout = max_num_timeout
        self.additional = dict(additional_parameters or {})

    def submit(self, job: NodeJob, resources: Mapping[str, Any],
               after: Sequence[Dependency]) -> str:
        import submitit

        from caco.dag.node import NodeRunner

        executor = submitit.AutoExecutor(folder=str(self.folder), cluster="slurm",
                                         slurm_max_num_timeout=self.max_num_timeout)
        extra = dict(self.additional)
        groups: dict[str, list[str]] = {}
        for kind, _, job_id in after:
            groups.setdefault(kind, []).append(str(job_id))
        if groups:
            extra["dependency"] = ",".join(f"{k}:{':'.join(ids)}" for k, ids in groups.items())
            extra["kill_on_invalid_dep"] = "yes"
        params: dict[str, Any] = {
            "name": job.key,
            "timeout_min": int(resources.get("timeout_min", 60)),
            "cpus_per_task": int(resources.get("cpus", 1)),
            "gpus_per_node": int(resources.get("gpus", 0)),
            "mem_gb": float(resources.get("mem_gb", 4)),
            "tasks_per_node": int(resources.get("tasks", 1)), "nodes": 1,
            "slurm_additional_parameters": extra,
        }
        if resources.get("partition"):
            params["slurm_partition"] = resources["partition"]
        executor.update_parameters(**params)
        with submitit.helpers.clean_env():
            submitted = executor.submit(NodeRunner(), job)
        return str(submitted.job_id)

    def lookup(self, key: str) -> str | None:
        """The id of a job already submitted under ``key`` (pending, running or ended)."""
        for cmd in (["squeue", "-h", "-o", "%i", "--name", key],
                    ["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "2000-01-01",
                     "--name", key]):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            ids = [line.strip() for line in out.splitlines() if line.strip()]
            if ids:
                return ids[-1]
        return None

    def pending(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> bool:
        return True  # SLURM runs them; the pretraining job need not outlive its evaluations
