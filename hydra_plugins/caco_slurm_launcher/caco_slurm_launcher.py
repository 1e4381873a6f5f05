"""``hydra/launcher=caco_slurm``: submit a sweep as one SLURM job array and return.

The stock ``submitit_slurm`` launcher blocks on every job's result (days, for pretraining).
This subclass keeps its job callable (so requeue/checkpoint behave the same) and only changes
``launch``: the sweep directory and ``output_root`` are pinned to absolute paths in every
job's overrides (a requeued job must land in the same run directory, whatever the time or
working directory), the job ids, log files and run directories are logged, and the call
waits for the results only with ``wait: true``.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

_PINNED = ("hydra.sweep.dir=", "output_root=")


@dataclass
class CacoSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.caco_slurm_launcher.caco_slurm_launcher.CacoSlurmLauncher"
    wait: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="caco_slurm",
                             node=CacoSlurmQueueConf(), provider="caco")


class CacoSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = False, **params: Any) -> None:
        self.wait = bool(wait)
        super().__init__(**params)

    def _executor(self):
        import submitit

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        max_num_timeout = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=max_num_timeout)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v
                                      for k, v in params.items()})
        return executor

    def launch(self, job_overrides, initial_job_idx):
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        output_root = os.path.abspath(str(self.config.get("output_root", "outputs")))
        pins = [f"hydra.sweep.dir={sweep_dir}", f"output_root={output_root}"]
        overrides = [[o for o in job if not o.startswith(_PINNED)] + pins
                     for job in job_overrides]
        # The submitit folder is resolved from the pinned sweep dir, not a second ${now:}.
        self.params["submitit_folder"] = str(self.params["submitit_folder"]).replace(
            str(self.config.hydra.sweep.dir), str(sweep_dir))
        executor = self._executor()
        state = Singleton.get_state()
        args = [(ovr, "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                 state) for i, ovr in enumerate(overrides)]
        jobs = executor.map_array(self, *zip(*args))
        returns = []
        for i, (job, ovr) in enumerate(zip(jobs, job_overrides)):
            num = initial_job_idx + i
            log.info("#%d %s -> SLURM job %s, log %s", num, " ".join(filter_overrides(ovr)),
                     job.job_id, job.paths.stdout)
            ret = JobReturn(overrides=list(ovr), status=JobStatus.COMPLETED)
            ret.return_value = {"job_id": job.job_id, "stdout": str(job.paths.stdout)}
            returns.append(ret)
        log.info("sweep directory %s (one run directory per job); tracking: %s", sweep_dir,
                 self._tracking_note(output_root))
        if not self.wait:
            log.info("submitted %d job(s); not waiting (cluster.wait=true waits)", len(jobs))
            return returns
        return [job.results()[0] for job in jobs]

    def _tracking_note(self, output_root: str) -> str:
        t = self.config.get("tracking")
        if t is None or not t.get("enabled", True):
            return "disabled"
        uri = t.get("uri") or f"sqlite:///{output_root}/mlflow.db"
        return f"experiment {t.get('experiment')!r} at {uri}"
