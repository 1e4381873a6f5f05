"""``hydra/launcher=caco_slurm``: submit a sweep to SLURM, truthfully, and return.

A subclass of the stock ``submitit_slurm`` launcher (same job callable, so requeue and
checkpoint behave the same) that changes what the user sees:

- **Checked before anything is submitted.** Every sweep point's config is composed in the
  launching process (a bad key fails here) and given to ``preflight`` (a dotted path, e.g.
  ``caco.preflight.check_pretrain``) when set; its errors are printed as one line each and the
  launch exits 2 with nothing submitted.
- **Submitted whole or not at all.** Points that resolve to different launcher parameters
  (e.g. a swept ``cluster.gpus_per_node``) go to one job array each; transient sbatch errors
  are retried with backoff; a refusal cancels whatever this sweep had already submitted and
  exits 2 with SLURM's words and the config key to change (``config_keys`` names them).
- **A failed job is FAILED.** Hydra's ``run_job`` turns a task's exception into a return value;
  the job callable re-raises it, so the job exits non-zero, SLURM records FAILED and the
  traceback is in the job's log.
- **Returns what is true.** Without ``wait`` the returns say "submitted, not finished"
  (:class:`SubmittedJobReturn`; Hydra's sweepers read ``return_value`` right away); with
  ``wait: true`` it blocks, logs which sweep points failed, and their returns are FAILED.
- Only ``hydra.sweep.dir`` is pinned (made absolute) in each job's overrides; jobs start in the
  launching directory (``--chdir``), so relative paths mean the same thing there.
"""

import contextlib
import importlib
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

_PINNED = "hydra.sweep.dir="
# The launcher parameters a refusal can be about -> the launcher key (the app may rename them).
_DEFAULT_KEYS = {"gpus": "hydra.launcher.gpus_per_node", "partition": "hydra.launcher.partition",
                 "cpus": "hydra.launcher.cpus_per_task", "mem": "hydra.launcher.mem_gb",
                 "nodes": "hydra.launcher.nodes", "tasks": "hydra.launcher.tasks_per_node",
                 "time": "hydra.launcher.timeout_min",
                 "account": "hydra.launcher.additional_parameters.account",
                 "qos": "hydra.launcher.additional_parameters.qos",
                 "constraint": "hydra.launcher.additional_parameters.constraint",
                 "nodelist": "hydra.launcher.additional_parameters.nodelist"}


@dataclass
class CacoSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.caco_slurm_launcher.caco_slurm_launcher.CacoSlurmLauncher"
    wait: bool = False
    preflight: Optional[str] = None
    config_keys: Dict[str, str] = field(default_factory=dict)
    srun_args: Optional[List[str]] = None


ConfigStore.instance().store(group="hydra/launcher", name="caco_slurm",
                             node=CacoSlurmQueueConf(), provider="caco")


@dataclass
class SubmittedJob:
    """The return of a sweep point that was submitted and has not finished: ask SLURM
    (``sacct -j <job_id>``) or ``python launch/dag.py status <run_dir>`` how it ends."""

    job_id: str
    stdout: str
    run_dir: str | None
    state: str = "SUBMITTED"


class SubmittedJobReturn(JobReturn):
    """Status UNKNOWN (the job has not run), yet readable: Hydra's sweepers read every
    ``return_value`` right after ``launch()``, and the stock one asserts on UNKNOWN."""

    @property
    def return_value(self) -> Any:
        return self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


class SweepPointFailed(CompactHydraException):
    """A sweep point's job ended without a result (its state and log are in the message;
    Hydra prints it as one line, the traceback is in the job's log)."""


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class CacoSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = False, preflight: str | None = None,
                 config_keys: dict | None = None, **params: Any) -> None:
        self.wait = bool(wait)
        self.preflight = preflight
        self.config_keys = {**_DEFAULT_KEYS, **dict(config_keys or {})}
        self._submitted: list[str] = []  # every job id of this sweep (all batches)
        super().__init__(**params)

    # ------------------------------------------------------------------ in the job
    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if ret.status == JobStatus.FAILED:
            # run_job caught the task's exception; a job that returns normally would end
            # COMPLETED with exit code 0. Raise it: submitit logs the traceback, the job
            # exits non-zero and SLURM records FAILED.
            raise ret._return_value
        return ret

    # ------------------------------------------------------------------ in the launcher
    def _point(self, overrides: list[str], num: int, sweep_dir: Path) -> dict[str, Any]:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = f"job_id_for_{num}"
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        params.pop("_target_", None)
        params["submitit_folder"] = str(params["submitit_folder"]).replace(
            str(self.config.hydra.sweep.dir), str(sweep_dir))
        # Jobs (and their requeues) resolve relative paths as the launch did.
        params["additional_parameters"] = {"chdir": os.getcwd(),
                                           **dict(params.get("additional_parameters") or {})}
        subdir = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        return {"num": num, "overrides": overrides, "cfg": cfg, "params": params,
                "run_dir": str(sweep_dir / subdir)}

    def _check(self, points: list[dict[str, Any]]) -> None:
        from caco.cli import user_message
        from caco.errors import CacoError

        check = None
        if self.preflight:
            module, _, name = self.preflight.rpartition(".")
            check = getattr(importlib.import_module(module), name)
        problems: dict[str, list[int]] = {}
        for p in points:
            longest = max(Path(p["run_dir"]).parts, key=lambda part: len(part.encode()))
            if len(longest.encode()) > 255:  # the job would die creating it
                problems.setdefault(
                    f"its run directory name is {len(longest.encode())} characters long (a "
                    "file name may have 255): name sweep points by number with "
                    "hydra.sweep.subdir='${hydra.job.num}', or leave long overrides out of "
                    "the name with hydra.job.config.override_dirname.exclude_keys",
                    []).append(p["num"])
                continue
            if check is None:
                continue
            try:
                check(p["cfg"])
            except CacoError as e:
                problems.setdefault(user_message(e), []).append(p["num"])
        if problems:
            for message, nums in problems.items():
                which = "every sweep point" if len(nums) == len(points) else \
                    "sweep point " + ", ".join(f"#{n}" for n in nums)
                log.error("%s: %s", which, message)
            log.error("nothing was submitted")
            _remove_if_unused(Path(str(self.config.hydra.sweep.dir)).resolve())
            sys.exit(2)

    def _submit(self, group: list[dict[str, Any]], sweep_dir: Path, state) -> list:
        import submitit

        from caco.sbatch import SubmissionRefused, submit_with_retry

        params = group[0]["params"]
        try:
            executor = _executor(params)
        except RuntimeError as e:  # submitit finds no srun/sbatch here
            raise _Refused(f"cannot submit to SLURM from this machine ({e}); run the launch "
                           "on a SLURM login node, or use cluster=local") from None
        args = [([*[o for o in p["overrides"] if not o.startswith(_PINNED)],
                  f"hydra.sweep.dir={sweep_dir}"], "hydra.sweep.dir", p["num"],
                 f"job_id_for_{p['num']}", state) for p in group]
        what = "the sweep" if len(group) > 1 else f"sweep point #{group[0]['num']}"
        try:
            # submitit prints sbatch's stderr itself; the refusal below says it once.
            with contextlib.redirect_stderr(io.StringIO()), submitit.helpers.clean_env():
                # A person is waiting: retry a busy controller briefly, not for minutes.
                return submit_with_retry(lambda: executor.map_array(self, *zip(*args)),
                                         keys=self.config_keys, what=what, backoff=(2, 5))
        except SubmissionRefused as e:
            raise _Refused(str(e)) from None

    def launch(self, job_overrides, initial_job_idx):
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        points = [self._point(list(ovr), initial_job_idx + i, sweep_dir)
                  for i, ovr in enumerate(job_overrides)]
        self._check(points)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in points:
            groups.setdefault(repr(sorted(p["params"].items())), []).append(p)
        state = Singleton.get_state()
        jobs: dict[int, Any] = {}
        try:
            for group in groups.values():
                for p, job in zip(group, self._submit(group, sweep_dir, state)):
                    jobs[p["num"]] = job
                    self._submitted.append(str(job.job_id))
        except _Refused as e:
            log.error("%s", e)
            self._cancel_submitted()
            _remove_if_unused(sweep_dir)
            sys.exit(2)
        from caco.sweep import record

        record(sweep_dir, [{"num": p["num"], "overrides": p["overrides"],
                            "run_dir": p["run_dir"], "job_id": str(jobs[p["num"]].job_id),
                            "submitit_folder": p["params"]["submitit_folder"],
                            "params": p["params"]} for p in points])
        for p in points:
            job = jobs[p["num"]]
            log.info("#%d %s -> SLURM job %s, log %s", p["num"],
                     " ".join(filter_overrides(p["overrides"])), job.job_id, job.paths.stdout)
        log.info("sweep directory %s (one run directory per job); tracking: %s", sweep_dir,
                 self._tracking_note())
        if not self.wait:
            log.info("submitted %d job(s); not waiting (cluster.wait=true waits)", len(jobs))
            return [SubmittedJobReturn(
                overrides=list(p["overrides"]), status=JobStatus.UNKNOWN,
                _return_value=SubmittedJob(str(jobs[p["num"]].job_id),
                                           str(jobs[p["num"]].paths.stdout), p["run_dir"]))
                for p in points]
        return self._wait(points, jobs)

    def _wait(self, points: list[dict[str, Any]], jobs: dict[int, Any]) -> list[JobReturn]:
        returns, failed = [], []
        for p in points:
            job = jobs[p["num"]]
            try:
                returns.append(job.results()[0])
                continue
            except Exception as e:  # submitit: FailedJobError / UncompletedJobError
                detail = _last_line(e)
            state = _state(job)
            what = " ".join(filter_overrides(p["overrides"])) or "(no overrides)"
            failed.append(f"#{p['num']} {what}: {state}, job {job.job_id}, log "
                          f"{job.paths.stderr}")
            ret = JobReturn(overrides=list(p["overrides"]), status=JobStatus.FAILED)
            ret._return_value = SweepPointFailed(
                f"sweep point #{p['num']} ({what}) ended {state} (job {job.job_id}): {detail}; "
                f"log {job.paths.stderr}")
            returns.append(ret)
        if failed:
            log.error("%d of %d sweep point(s) failed:\n  %s", len(failed), len(points),
                      "\n  ".join(failed))
        return returns

    def _cancel_submitted(self) -> None:
        if not self._submitted:
            return
        import subprocess

        ids = [j.split("_")[0] for j in self._submitted]
        subprocess.run(["scancel", *dict.fromkeys(ids)], capture_output=True, timeout=60)
        log.error("cancelled the %d job(s) this sweep had already submitted (%s)",
                  len(self._submitted), ", ".join(self._submitted))
        self._submitted = []

    def _tracking_note(self) -> str:
        t = self.config.get("tracking") if self.config is not None else None
        if t is None or not t.get("enabled", True):
            return "disabled"
        from caco.tracking import redact, resolve_uri

        root = os.path.abspath(str(self.config.get("output_root", "outputs")))
        return f"experiment {t.get('experiment')!r} at {redact(resolve_uri(t.get('uri'), root))}"


def _remove_if_unused(sweep_dir: Path) -> None:
    """A refused sweep leaves no directory that looks like a sweep (Hydra wrote its
    multirun.yaml before the launch; nothing else is there)."""
    with contextlib.suppress(OSError):
        if {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml", ".submitit"}:
            import shutil

            shutil.rmtree(sweep_dir)


def _executor(params: dict[str, Any]):
    from caco.sweep import build_executor

    return build_executor(params["submitit_folder"], params)


def _state(job, wait_s: float = 20.0) -> str:
    """The job's final state from accounting (which may lag the job's end by a moment)."""
    import time

    from caco.job_states import SLURM_FINAL
    from caco.slurm_accounting import job_state

    deadline = time.monotonic() + wait_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        try:
            state = job_state(str(job.job_id))
        except (OSError, RuntimeError):
            return state
        if state in SLURM_FINAL:
            return state
        time.sleep(1)
    return state


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [type(error).__name__])[-1][:400]
