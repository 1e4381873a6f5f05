"""Where evaluation nodes run: the one small interface the scheduler talks to.

- :class:`LocalExecutor` (``cluster=local``): one background thread runs the nodes one at a
  time, in submission order (the scheduler submits each checkpoint's nodes dependencies
  first), each as its own process (``python -m caco.dag.node``) in its own session, so an
  evaluation crash never takes the training process with it and a Ctrl-C reaches the trainer
  only: :meth:`LocalExecutor.interrupt` then stops the running node and records it and the
  queued ones CANCELLED (interrupted), which a relaunch or ``dag.py retry`` runs again. Each
  node process dies with the process that started it. A node whose ``afterok`` dependency did
  not complete is recorded CANCELLED without running; ``afterany`` nodes (report) always run.
- :class:`SlurmExecutor` (``cluster=slurm``): one submitit job per node, named by its
  idempotency key, with SLURM dependencies (``afterok``/``afterany`` on the job ids of the
  nodes it needs, ``--kill-on-invalid-dep=yes`` so a failed dependency cancels instead of
  pending forever); submitted with the submitting job's SLURM_* variables hidden
  (``submitit.helpers.clean_env``). Transient sbatch errors are retried with backoff; a
  refusal raises :class:`caco.sbatch.SubmissionRefused`. ``lookup`` finds a job by that name
  (squeue, then sacct), which is how a submission interrupted by a crash is recognised
  instead of repeated; when SLURM cannot be asked it raises :class:`LookupUnavailable`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caco.dag.ledger import EvalLedger
from caco.dag.node import NodeJob
from caco.dag.worker import Worker
from caco.fileio import atomic_write_text
from caco.processes import identity

log = logging.getLogger(__name__)

Dependency = tuple[str, str, str]  # (afterok|afterany, node name, job id)
INTERRUPTED = "interrupted before it finished; relaunch the run or `dag.py retry` runs it again"


class LookupUnavailable(RuntimeError):
    """SLURM could not be asked whether a job exists (so it must not be submitted again)."""


class LocalExecutor:
    kind = "local"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._worker = Worker(lambda item: self._run(*item), "caco-dag-local")
        self._interrupted = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._current: NodeJob | None = None

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

    def interrupt(self, timeout: float = 20.0) -> None:
        """Ctrl-C: stop the running node, record it and every queued one CANCELLED
        (interrupted), and return once no node process is left."""
        self._interrupted.set()
        proc, job = self._proc, self._current
        if proc is not None and proc.poll() is None:
            log.warning("stopping evaluation %s of epoch %d (pid %d)", job.node, job.epoch,
                        proc.pid)
            _stop_group(proc)
        self._worker.join(timeout)

    def _cancel(self, job: NodeJob, error: str, **extra: Any) -> None:
        ledger = EvalLedger(job.run_dir)
        entry = ledger.get(job.epoch, job.node) or {}
        if entry.get("key") == job.key and entry.get("state") not in ("COMPLETED", "FAILED"):
            ledger.update(job.epoch, job.node, state="CANCELLED", error=error, **extra)

    def _run(self, job: NodeJob, path: Path, after: Sequence[Dependency]) -> None:
        if self._interrupted.is_set():
            self._cancel(job, INTERRUPTED, interrupted=True)
            return
        ledger = EvalLedger(job.run_dir)
        for kind, node, _ in after:
            state = (ledger.get(job.epoch, node) or {}).get("state")
            if kind == "afterok" and state != "COMPLETED":
                self._cancel(job, f"dependency {node} ended {state}")
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
        else:  # a direct child ends with this process (torchrun's workers finish their work)
            env["CACO_PARENT_PID"] = str(os.getpid())
        with open(logfile, "ab") as out:
            # Its own session: a Ctrl-C in the terminal reaches the trainer, which stops the
            # node itself and records why (see interrupt).
            proc = subprocess.Popen([*launcher, "-m", "caco.dag.node", str(path)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.run_dir, start_new_session=True)
            self._proc, self._current = proc, job
            try:
                ledger.update(job.epoch, job.node, key=job.key, process=identity(proc.pid))
            except Exception as e:  # noted, not fatal: the process is what matters
                log.warning("could not record evaluation %s's process: %s", job.node, e)
            returncode = proc.wait()
            self._proc = self._current = None
        entry = ledger.get(job.epoch, job.node) or {}
        if self._interrupted.is_set() and entry.get("state") not in ("COMPLETED", "FAILED"):
            self._cancel(job, INTERRUPTED, interrupted=True)
        elif returncode != 0 and entry.get("state") not in ("FAILED", "COMPLETED") and \
                entry.get("key") == job.key:
            ledger.update(job.epoch, job.node, state="FAILED",
                          error=f"process exited with status {returncode} (see {logfile})")
        log.info("evaluation %s of epoch %d: %s", job.node, job.epoch,
                 (ledger.get(job.epoch, job.node) or {}).get("state"))


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the node's process group, SIGKILL what is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class SlurmExecutor:
    kind = "slurm"

    def __init__(self, run_dir: str | os.PathLike, *, max_num_timeout: int = 3,
                 additional_parameters: Mapping[str, Any] | None = None,
                 partition: str | None = None,
                 backoff: tuple[float, ...] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "dag" / "slurm" / "%j"
        self.max_num_timeout = max_num_timeout
        self.additional = dict(additional_parameters or {})
        self.partition = partition
        self.backoff = backoff

    def submit(self, job: NodeJob, resources: Mapping[str, Any],
               after: Sequence[Dependency]) -> str:
        import submitit

        from caco.dag.node import NodeRunner
        from caco.sbatch import BACKOFF_S, submit_with_retry

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
        partition = resources.get("partition") or self.partition
        if partition:
            params["slurm_partition"] = partition
        for key in ("nodelist", "exclude", "constraint"):  # placing a node's job explicitly
            if resources.get(key):
                extra[key] = resources[key]
        executor.update_parameters(**params)
        node = f"dag.nodes.{job.node}"
        keys = {"gpus": f"{node}.resources.gpus", "cpus": f"{node}.resources.cpus",
                "mem": f"{node}.resources.mem_gb", "time": f"{node}.resources.timeout_min",
                "tasks": f"{node}.resources.tasks", "partition": f"{node}.resources.partition",
                "account": "dag.additional_parameters.account (or cluster's)",
                "qos": "dag.additional_parameters.qos (or cluster's)"}

        def once() -> str:
            with submitit.helpers.clean_env():
                return str(executor.submit(NodeRunner(), job).job_id)

        return submit_with_retry(once, keys=keys, what=f"evaluation {job.node} of epoch "
                                 f"{job.epoch}", backoff=self.backoff or BACKOFF_S)

    def lookup(self, key: str) -> str | None:
        """The id of a job already submitted under ``key`` (pending, running or ended)."""
        from caco.slurm_accounting import SlurmUnavailable, run_command

        for cmd in (["squeue", "-h", "-o", "%i", "--name", key],
                    ["sacct", "-n", "-X", "-P", "-o", "JobID,JobName", "-S", "2000-01-01",
                     "--name", key]):
            try:
                proc = run_command(cmd, 30)
            except SlurmUnavailable as e:
                raise LookupUnavailable(str(e)) from None
            if proc.returncode != 0:
                raise LookupUnavailable(f"{cmd[0]} failed: {proc.stderr.strip()}")
            ids = []
            for line in proc.stdout.splitlines():
                parts = line.strip().split("|")
                # sacct: trust a row only when its job name is the key itself
                if parts[0] and (len(parts) == 1 or parts[1] == key):
                    ids.append(parts[0])
            if ids:
                return ids[-1]
        return None

    def pending(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> bool:
        return True  # SLURM runs them; the pretraining job need not outlive its evaluations

    def interrupt(self, timeout: float = 20.0) -> None:
        """Nothing runs here: SLURM jobs go on (``dag.py cancel`` stops them)."""
