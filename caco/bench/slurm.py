"""SLURM latencies on the cluster at hand (the one-node test cluster or a real one).

- submission -> running: ``n_jobs`` trivial submitit jobs, each returning the time it
  started; latency = start - moment before ``submit``.
- checkpoint + requeue + resume overhead: the ``smoke`` experiment run once uninterrupted and
  once preempted with ``scancel --signal=USR2`` right after its first checkpoint; overhead =
  difference of their first-submission-to-end times (sacct), which includes the USR2
  checkpoint, the requeue wait and the resumed job's start-up.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from caco.config import project_root
from caco.slurm_accounting import job_history, wait_final

log = logging.getLogger(__name__)
LAUNCH = project_root() / "launch" / "pretrain.py"


@dataclass
class SlurmBenchConfig:
    n_jobs: int = 5
    epochs: int = 2
    output_root: str = "outputs/benchmarks/slurm"
    timeout_s: int = 900


def _started_at() -> float:
    return time.time()


def submission_latency(folder: Path, n_jobs: int) -> list[float]:
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, nodes=1,
                               tasks_per_node=1, name="caco-latency")
    latencies = []
    for _ in range(n_jobs):
        t0 = time.time()
        job = executor.submit(_started_at)
        started = job.result()
        latencies.append(started - t0)
        log.info("job %s: running %.2f s after submission", job.job_id, latencies[-1])
    return latencies


def _submit_smoke(root: Path, epochs: int) -> tuple[str, Path]:
    proc = subprocess.run(
        [sys.executable, str(LAUNCH), "-m", "cluster=slurm", "experiment=smoke",
         f"epochs={epochs}", "eval.knn.final=false", f"output_root={root}"],
        capture_output=True, text=True, timeout=300, cwd=root)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"submission failed:\n{out}")
    job = out.split("-> SLURM job ")[1].split(",")[0]
    return job, root


def _span_s(job: str) -> float:
    rows = job_history(job, duplicates=True)
    fmt = "%Y-%m-%dT%H:%M:%S"
    first = datetime.strptime(rows[0]["submit"], fmt)
    last = datetime.strptime(rows[-1]["end"], fmt)
    return (last - first).total_seconds()


def requeue_overhead(root: Path, epochs: int, timeout: float) -> dict:
    plain_root, pre_root = root / "uninterrupted", root / "preempted"
    plain_root.mkdir(parents=True, exist_ok=True)
    pre_root.mkdir(parents=True, exist_ok=True)
    plain, _ = _submit_smoke(plain_root, epochs)
    wait_final([plain], timeout)
    pre, _ = _submit_smoke(pre_root, epochs)
    deadline = time.time() + timeout
    while not list(pre_root.glob("sweeps/*/*/checkpoints/last.pt")):
        if time.time() > deadline:
            raise TimeoutError(f"job {pre} wrote no checkpoint")
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", pre], check=True)
    states = wait_final([pre], timeout)
    runs = [r["state"] for r in job_history(pre, duplicates=True)]
    plain_s, pre_s = _span_s(plain), _span_s(pre)
    return {"uninterrupted_s": plain_s, "preempted_s": pre_s,
            "requeue_overhead_s": pre_s - plain_s, "preempted_runs": runs,
            "final_state": states[pre]}


def run(cfg: SlurmBenchConfig) -> dict:
    root = Path(cfg.output_root).resolve() / time.strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    lat = submission_latency(root / "latency", cfg.n_jobs)
    overhead = requeue_overhead(root, cfg.epochs, cfg.timeout_s)
    return {
        "bench": "slurm",
        "submit_to_running_median_s": round(statistics.median(lat), 3),
        "submit_to_running_max_s": round(max(lat), 3),
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in overhead.items()},
    }
