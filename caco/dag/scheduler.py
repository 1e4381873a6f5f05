"""``DagScheduler``: the trainer's milestone hook that fans a checkpoint out into its DAG.

Called on rank 0 right after a milestone checkpoint is written. The call only enqueues: a
background thread plans the checkpoint's nodes (:func:`caco.dag.plan.plan_checkpoint`),
claims each in the ledger (SUBMITTING + idempotency key) BEFORE handing it to the executor,
then records SUBMITTED with the job id. So training never waits on submission, and a job
killed anywhere in between is recognised on restart:

- a node already in the ledger is never submitted again;
- a SUBMITTING node (crash between claim and record) is looked up by its key in the cluster
  (``executor.lookup``) and only submitted if it is not there (and not while SLURM cannot be
  asked);
- milestone checkpoints on disk without ledger entries (crash before the hook ran) are
  scheduled on the next call or at ``close``;
- local evaluations that were queued or running when an earlier trainer was interrupted
  (Ctrl-C, kill -9, OOM) and whose process is gone run again.

Claim, submit and record happen under the ledger's submission lock, so ``dag.py retry`` and
the scheduler never submit the same node twice. A submission SLURM refuses is recorded FAILED
with SLURM's words; the checkpoint's other nodes are still submitted (those that need it
``afterok`` are recorded CANCELLED; ``report`` runs and lists it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caco.dag.ledger import EvalLedger
from caco.dag.node import NodeJob
from caco.dag.plan import REPORT, NodeSpec, dag_nodes, parse_dag, plan_checkpoint
from caco.dag.report import REPORT_HEADLINE
from caco.dag.worker import Worker
from caco.evaluators import registry
from caco.job_states import FINAL
from caco.processes import alive, identity

log = logging.getLogger(__name__)


def eval_settings(cfg: DictConfig, spec: NodeSpec) -> dict[str, Any]:
    """The run's ``eval.<evaluator>`` (its registry defaults, composed by Hydra, with the
    experiment's values) < the node's ``settings`` (so kNN uses the experiment's k)."""
    if spec.evaluator == REPORT:
        return dict(spec.settings)
    base = registry(cfg)[spec.evaluator].settings
    merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(dict(spec.settings)))
    return OmegaConf.to_container(merged, resolve=True)


def make_executor(cfg: DictConfig, run_dir: Path):
    from caco.dag.executors import LocalExecutor, SlurmExecutor

    name = str(cfg.cluster.get("name", "local"))
    if name == "slurm":
        # Evaluation jobs go where the pretraining job went (partition, account, qos, ...)
        # unless the DAG or the node says otherwise.
        extra = {**dict(cfg.cluster.get("additional_parameters") or {}),
                 **dict(cfg.dag.get("additional_parameters") or {})}
        return SlurmExecutor(run_dir, max_num_timeout=int(cfg.dag.get("max_num_timeout", 3)),
                             additional_parameters=extra,
                             partition=cfg.cluster.get("partition"))
    return LocalExecutor(run_dir)


def local_node_gone(entry: dict[str, Any]) -> bool:
    """A local evaluation that was queued or running and whose process is gone: an earlier
    trainer was interrupted (its queue died with it), or the node process itself died."""
    if entry.get("backend") != "local":
        return False
    state = entry.get("state")
    if state == "CANCELLED":
        return bool(entry.get("interrupted"))
    if state not in ("SUBMITTED", "RUNNING"):
        return False
    if entry.get("process"):  # it was started: is its process still there?
        return alive(entry["process"]) is False
    return alive(entry.get("owner")) is False  # queued: is the queue's process there?


class DagScheduler:
    def final_knn_node(self) -> str | None:
        """The kNN node that evaluates the final checkpoint, if any (then the trainer's own
        final kNN would only repeat it)."""
        final = int(self.cfg.epochs)
        for spec in plan_checkpoint(self.specs, final, final, is_milestone=True):
            if spec.evaluator == "knn":
                return spec.name
        return None

    def __init__(self, cfg: DictConfig, run_dir: str | Path, executor=None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.evaluators = registry(cfg)
        self.specs = parse_dag(dag_nodes(cfg), self.evaluators)
        self.ledger = EvalLedger(self.run_dir)
        self.executor = executor or make_executor(cfg, self.run_dir)
        self.retries = int((cfg.get("dag") or {}).get("retries", 2))
        self._worker = Worker(self._handle, "caco-dag")
        self._caught_up = False
        self._stopped = False  # the job is being ended: submit nothing more
        self.latencies: list[float] = []  # checkpoint written -> all its nodes submitted
        self.hook_seconds = 0.0  # time the training thread spent in this hook

    # ------------------------------------------------------------------ the hook
    def __call__(self, checkpoint: str | Path, epoch: int) -> None:
        t0 = time.perf_counter()
        self._worker.put((str(checkpoint), int(epoch), time.time()))
        self.hook_seconds += time.perf_counter() - t0

    def _handle(self, item: tuple[str, int, float]) -> None:
        checkpoint, epoch, written = item
        try:
            if not self._caught_up:
                self.catch_up()
            self.schedule(checkpoint, epoch, written)
        except Exception:
            log.exception("evaluation DAG of epoch %d not scheduled", epoch)

    # ------------------------------------------------------------------ scheduling
    def _tracking(self) -> dict[str, Any] | None:
        """What a node needs to track its child run under this run (no credentials: the
        node reads tracking.credentials_file itself)."""
        from caco.tracking import RUN_FILE, read_run_file

        info = read_run_file(self.run_dir)
        if info is None:
            return None  # tracking disabled for this run
        t = self.cfg.get("tracking") or {}
        return {"uri": info["uri"], "experiment": info.get("experiment") or t.get("experiment"),
                "experiment_id": info.get("experiment_id"),
                "artifact_root": info.get("artifact_root"),
                "parent_state": str(self.run_dir / RUN_FILE),
                "credentials_file": t.get("credentials_file"),
                "http_retries": t.get("http_retries", 1), "http_timeout": t.get("http_timeout", 10),
                "retry_interval_s": t.get("retry_interval_s", 30)}

    def _job(self, spec: NodeSpec, checkpoint: str, epoch: int, key: str) -> NodeJob:
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.update(dict(spec.data))
        evaluator = self.evaluators.get(spec.evaluator)
        return NodeJob(
            run_dir=str(self.run_dir), epoch=epoch, node=spec.name, evaluator=spec.evaluator,
            checkpoint=checkpoint, key=key, settings=eval_settings(self.cfg, spec), data=data,
            device=str(spec.resources.get("device", "auto")),
            threads=int(spec.resources.get("threads", 0) or 0), retries=self.retries,
            needs=list(spec.needs), tracking=self._tracking(),
            tasks=int(spec.resources.get("tasks", 1) or 1),
            module=evaluator.module if evaluator else "",
            headline=list(evaluator.headline) if evaluator else list(REPORT_HEADLINE),
            output_root=str(self.cfg.output_root), final=epoch == int(self.cfg.epochs))

    def schedule(self, checkpoint: str, epoch: int, written: float | None = None) -> list[dict]:
        """Submit the checkpoint's nodes that the ledger does not hold yet."""
        from caco.dag.executors import LookupUnavailable

        written = written or time.time()
        plan = plan_checkpoint(self.specs, epoch, int(self.cfg.epochs), is_milestone=True)
        done = []
        for spec in plan:
            if self._stopped:
                log.warning("the job is ending: evaluations of epoch %d not submitted (its "
                            "next start or `dag.py retry` submits them)", epoch)
                break
            try:
                entry = self.submit_node(spec, checkpoint, epoch)
            except LookupUnavailable as e:
                log.warning("evaluation %s of epoch %d may have been submitted; SLURM "
                            "cannot be asked now (%s): left for `dag.py retry`",
                            spec.name, epoch, e)
                continue
            if entry is not None:
                done.append(entry)
        submitted = [e for e in done if e["state"] == "SUBMITTED"]
        if submitted:
            latency = time.time() - written
            self.latencies.append(latency)
            log.info("epoch %d: %d evaluation job(s) submitted %.2f s after the checkpoint "
                     "(%s)", epoch, len(submitted), latency,
                     ", ".join(f"{e['node']}={e['job_id']}" for e in submitted))
        return done

    def submit_node(self, spec: NodeSpec, checkpoint: str, epoch: int,
                    **job_fields: Any) -> dict | None:
        """Claim, submit and record one node under the ledger's submission lock; None when
        the ledger holds it already (never twice). ``job_fields`` go into its NodeJob.
        Raises LookupUnavailable when a half-recorded submission cannot be checked."""
        with self.ledger.submission_lock():
            entry = self.ledger.claim(epoch, spec.name, checkpoint)
            if entry is None:
                entry = self.ledger.get(epoch, spec.name)
                if entry["state"] != "SUBMITTING":
                    return None  # submitted before: never twice
                found = self.executor.lookup(entry["key"])
                if found is not None:
                    self.ledger.update(epoch, spec.name, state="SUBMITTED", job_id=found,
                                       backend=self.executor.kind)
                    log.info("evaluation %s of epoch %d was already submitted as job %s",
                             spec.name, epoch, found)
                    return None
            return self._submit(spec, checkpoint, epoch, entry["key"], **job_fields)

    def _submit(self, spec: NodeSpec, checkpoint: str, epoch: int, key: str,
                **job_fields: Any) -> dict:
        from caco.sbatch import SubmissionRefused

        after = []
        for need in spec.needs:
            dep = self.ledger.get(epoch, need) or {}
            state = dep.get("state")
            if state == "COMPLETED" or (spec.dependency == "afterany" and state in FINAL):
                continue  # satisfied already (and SLURM may have forgotten the job)
            if spec.dependency == "afterok" and state in FINAL:
                return self._record_failure(spec, epoch, "CANCELLED",
                                            f"dependency {need} ended {state}")
            if not dep.get("job_id"):
                if spec.dependency == "afterany":
                    continue  # never submitted: nothing to wait for
                return self._record_failure(spec, epoch, "CANCELLED",
                                            f"dependency {need} was never submitted")
            after.append((spec.dependency, need, str(dep.get("job_id"))))
        job = self._job(spec, checkpoint, epoch, key)
        for name, value in job_fields.items():
            setattr(job, name, value)
        try:
            job_id = self.executor.submit(job, spec.resources, after)
        except SubmissionRefused as e:
            return self._record_failure(spec, epoch, "FAILED", str(e))
        except Exception as e:  # e.g. the job cannot be pickled: a state, not a lost node
            log.exception("evaluation %s of epoch %d not submitted", spec.name, epoch)
            return self._record_failure(spec, epoch, "FAILED",
                                        f"not submitted: {type(e).__name__}: {e}")
        return self.ledger.update(epoch, spec.name, state="SUBMITTED", job_id=job_id,
                                  backend=self.executor.kind, submitted=time.time(),
                                  owner=identity())

    def _record_failure(self, spec: NodeSpec, epoch: int, state: str, error: str) -> dict:
        log.error("evaluation %s of epoch %d %s: %s", spec.name, epoch,
                  "not submitted" if state == "FAILED" else "cancelled", error)
        return self.ledger.update(epoch, spec.name, state=state, error=error,
                                  backend=self.executor.kind, submitted=time.time(),
                                  finished=time.time())

    def recover_local(self) -> list[dict]:
        """Move local evaluations whose process is gone back to the queue (new key)."""
        from caco.dag.node import close_child_run

        gone = [e for e in self.ledger.entries() if local_node_gone(e)]
        for e in gone:
            log.warning("evaluation %s of epoch %d was %s when its process went away; "
                        "running it again", e["node"], e["epoch"],
                        "interrupted" if e["state"] == "CANCELLED" else e["state"].lower())
            close_child_run(self.run_dir, e, "KILLED")  # its run says so, once delivered
            self.ledger.reset(e["epoch"], e["node"])
        return gone

    def catch_up(self) -> list[dict]:
        """Schedule what the milestone checkpoints on disk are missing: nodes the ledger has
        not seen (or only half: SUBMITTING), and local evaluations an interrupted trainer
        left behind. Returns the entries submitted now."""
        self._caught_up = True
        if self.executor.kind == "local":
            self.recover_local()
        from caco.checkpoint import milestones

        done = []
        for epoch, path in milestones(self.run_dir / "checkpoints"):
            done += self.schedule(str(path), epoch)
        return done

    # ------------------------------------------------------------------ end of training
    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Drain the submission queue; with a local executor, wait for its evaluations."""
        self._worker.join()
        self.catch_up()  # also whatever a failed hand-off left unclaimed
        log.info("evaluation DAG: %s", self.summary())
        pending = self.executor.pending()
        if wait and pending:
            log.info("waiting for %d local evaluation job(s) to finish", pending)
            if not self.executor.wait(timeout):
                log.warning("local evaluations still running after %.0f s", timeout)
        self.deliver_tracking()

    def deliver_tracking(self, epoch: int | None = None) -> None:
        """Send what evaluation nodes buffered during a tracking outage and could not send
        themselves before they ended (best effort: what stays pending waits for the next
        try or ``sync_tracking.py``)."""
        from caco.tracking import sync

        try:
            left = sync(self.run_dir, epoch=epoch, trainer=False)
        except FileNotFoundError:
            return  # tracking disabled
        if left:
            log.warning("%d tracking record(s) of evaluations still pending; `python "
                        "launch/sync_tracking.py %s` sends them", left, self.run_dir)

    def stop_submitting(self) -> None:
        """The job is being ended (SIGTERM): what is not submitted yet is left to the next
        incarnation's catch-up or ``dag.py retry`` instead of orphaned jobs."""
        self._stopped = True

    def interrupt(self) -> None:
        """Ctrl-C: stop local evaluations cleanly (recorded CANCELLED, run again later)."""
        self.executor.interrupt()

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        return {"checkpoints": len(lat), "max_submit_latency_s": round(max(lat), 3) if lat
                else None, "hook_seconds": round(self.hook_seconds, 6)}
