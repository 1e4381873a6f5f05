"""A SLURM sweep's own record: which sweep point became which job, and how to submit it again.

The ``caco_slurm`` launcher writes ``<sweep_dir>/sweep.json`` (atomically) once a sweep is
submitted: per sweep point its number, overrides, run directory, submitit folder, the
launcher parameters it was submitted with and every job id it has had. ``dag.py status``,
``dag.py cancel`` and ``dag.py retry --pretraining`` read it; a resubmitted point runs the same
pickled job callable in the same run directory, so it resumes from its ``last.pt``.

A sweep directory holds no ``config.yaml`` of its own, so no tool mistakes it for a run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caco.errors import ConfigError
from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"
# Launcher parameters that are not submitit's.
NOT_SUBMITIT = ("_target_", "wait", "preflight", "config_keys", "submitit_folder",
                "max_num_timeout")


def build_executor(folder: str, params: Mapping[str, Any]):
    """A submitit SLURM executor from ``hydra.launcher`` parameters (as the stock launcher
    maps them: shared keys as they are, the rest with a ``slurm_`` prefix)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=int(params.get("max_num_timeout", 0)))
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v
                                  for k, v in params.items() if k not in NOT_SUBMITIT})
    return executor


def read(sweep_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(sweep_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); it records the sweep's jobs") from None


def record(sweep_dir: str | os.PathLike, points: list[dict[str, Any]]) -> Path:
    """Add (or update, by sweep point number) the submitted points to the manifest."""
    sweep_dir = Path(sweep_dir)
    data = read(sweep_dir) or {"version": 1, "sweep_dir": str(sweep_dir), "points": []}
    by_num = {p["num"]: p for p in data["points"]}
    for point in points:
        old = by_num.get(point["num"], {})
        jobs = [*old.get("jobs", []), point["job_id"]]
        by_num[point["num"]] = {**old, **point, "jobs": list(dict.fromkeys(jobs)),
                                "submitted": time.time()}
    data["points"] = [by_num[n] for n in sorted(by_num)]
    return atomic_write_text(sweep_dir / MANIFEST, json.dumps(data, indent=1))


def point_of_run(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(sweep_dir, point)`` when ``run_dir`` is a point of a recorded sweep."""
    data = read(run_dir.parent)
    if data is None:
        return None
    for point in data["points"]:
        if Path(point["run_dir"]).resolve() == run_dir.resolve():
            return run_dir.parent, point
    return None


def submitted_pickle(point: Mapping[str, Any]) -> Path:
    folder = str(point["submitit_folder"])
    job = str(point["job_id"])
    return Path(folder.replace("%j", job)) / f"{job}_submitted.pkl"


def resubmit(sweep_dir: str | os.PathLike, point: Mapping[str, Any]) -> str:
    """Submit a sweep point's job callable again (same overrides, same run directory)."""
    import submitit

    from caco.sbatch import submit_with_retry

    pickle = submitted_pickle(point)
    if not pickle.exists():
        raise ConfigError(f"cannot resubmit sweep point #{point['num']}: {pickle} is gone")
    delayed = submitit.helpers.DelayedSubmission.load(pickle)
    executor = build_executor(str(point["submitit_folder"]), point["params"])
    with submitit.helpers.clean_env():
        job = submit_with_retry(
            lambda: executor.submit(delayed.function, *delayed.args, **delayed.kwargs),
            keys={}, what=f"sweep point #{point['num']}")
    record(sweep_dir, [{**point, "job_id": str(job.job_id)}])
    return str(job.job_id)
