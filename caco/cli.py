"""What the launch scripts call: turn a composed Hydra config into a run, errors into messages."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, open_dict

from caco.errors import CacoError

log = logging.getLogger("caco")


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def finalize_config(cfg: DictConfig, run_dir: Path) -> None:
    """Pin values that must not change while the job runs or on resume."""
    with open_dict(cfg):
        cfg.output_root = os.path.abspath(str(cfg.output_root))
        cfg.run_name = run_dir.name


def user_message(error: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, which embeds the
    worker's traceback, only its last line (the original message)."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _dag_scheduler(cfg: DictConfig, run_dir: Path):
    """Rank 0's evaluation-DAG scheduler, when the run has any evaluation node."""
    import torch.distributed as dist

    from caco.dag.plan import dag_nodes

    if not dag_nodes(cfg):
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    from caco.dag.scheduler import DagScheduler

    scheduler = DagScheduler(cfg, run_dir)
    node = scheduler.final_knn_node()
    knn = cfg.get("eval", {}).get("knn")
    if node and knn is not None and knn.get("final"):
        extra = "".join(f", eval/knn_top1_{name}" for name, key in (
            ("random_init", "random_init_baseline"), ("pixels", "pixels_baseline"))
            if knn.get(key))
        log.info("the final kNN (eval/knn_top1%s) comes from the DAG's %s node", extra, node)
    return scheduler


EXIT_STOPPED = 128 + 15  # as a process ended by SIGTERM: it did not finish


def _local_stop_request():
    """SIGTERM outside SLURM as a stop request (signals can be set in the main thread only)."""
    import threading

    from caco.distributed import StopRequest

    if threading.current_thread() is not threading.main_thread():
        return None
    return StopRequest()


def pretrain_main(cfg: DictConfig) -> dict:
    """Entry of ``launch/pretrain.py`` in every process of a job.

    Sets up torch.distributed when the job has several tasks, turns SIGUSR2 into a
    checkpoint-and-requeue inside SLURM jobs, makes user-facing errors exit with status 2 and
    one message, and any other error fail the job with its traceback in the log (or, when a
    peer rank vanished, requeue it: :mod:`caco.job_failure`).
    """
    from caco.distributed import PreemptionGuard, in_submitit_job, init_distributed

    run_dir = _run_dir()
    finalize_config(cfg, run_dir)
    scheduler = None
    try:
        from caco.preflight import check_pretrain
        from caco.train import Pretrainer

        check_pretrain(cfg)
        init_distributed(cfg)
        guard = PreemptionGuard() if in_submitit_job() else _local_stop_request()
        stop = {"should_stop": guard.should_stop, "requeued_after_stop": guard.requeued} \
            if guard is not None else {}
        scheduler = _dag_scheduler(cfg, run_dir)
        if isinstance(guard, PreemptionGuard) and scheduler is not None:
            guard.on_terminate(scheduler.stop_submitting)
        trainer = Pretrainer(cfg, run_dir, milestone_hooks=[scheduler] if scheduler else [],
                             **stop)
        summary = trainer.run()
        stopped = summary["status"] == "stopped"
        if guard is not None and not guard.requeued:
            guard.immediate()
        if scheduler is not None:
            if stopped and not guard.requeued:
                scheduler.interrupt()  # as Ctrl-C: a relaunch runs them again
            scheduler.close(wait=not stopped and bool((cfg.get("dag") or {}).get("wait", True)))
            summary["dag"] = scheduler.summary()
        if stopped and isinstance(guard, PreemptionGuard):
            guard.hand_over()
        elif stopped:
            log.warning("stopped by SIGTERM at epoch %d step %d: last.pt is saved and the run "
                        "is resumable; relaunch the same command (run_name=%s) to go on",
                        trainer.state.epoch, trainer.state.step_in_epoch, run_dir.name)
            sys.exit(EXIT_STOPPED)
    except CacoError as e:
        from caco.job_failure import record_own_failure

        record_own_failure(run_dir, e)
        log.error("%s", user_message(e))
        sys.exit(2)
    except KeyboardInterrupt as e:
        log.warning("interrupted (%s): %s", str(e) or "Ctrl-C", "stopping local evaluations; the "
                    "run resumes from its last checkpoint when relaunched with the same run_name")
        if scheduler is not None:
            scheduler.interrupt()
        raise
    except Exception as e:
        _fail(cfg, run_dir, e)
        raise
    finally:
        _shutdown_quietly()
    log.info("run directory: %s", summary["run_dir"])
    return summary


def _fail(cfg: DictConfig, run_dir: Path, error: Exception) -> None:
    """An uncaught error: requeue when a peer vanished (returns only when it did not),
    otherwise record it for the other ranks and log its traceback (job log, pretrain.log)."""
    import torch.distributed as dist

    from caco import job_failure as jf

    if dist.is_available() and dist.is_initialized() and jf.is_lost_peer(error):
        peers = jf.peer_failures(run_dir)
        if peers:
            p = peers[0]
            log.error("rank %s on %s failed with %s: %s (its traceback is in its log); this "
                      "rank stops too", p["rank"], p["host"], p["type"], p["message"])
            return
        max_requeues = int(cfg.cluster.get("max_num_timeout", 0) or 0)
        if jf.requeue_after_lost_peer(run_dir, max_requeues):
            sys.exit(jf.EXIT_REQUEUED)
    jf.record_own_failure(run_dir, error)
    log.exception("pretraining failed: %s: %s", type(error).__name__, error)


def _shutdown_quietly() -> None:
    """Leave the process group; after a failed collective that may fail too, and must not
    hide the error that matters."""
    import contextlib

    from caco.distributed import shutdown_distributed

    with contextlib.suppress(Exception):
        shutdown_distributed()


def prepare_data_main(cfg: DictConfig) -> list:
    """Entry of ``launch/prepare_data.py``: each split to a .beton, errors as one message."""
    from caco.data.beton import convert_split, options_from_config
    from caco.data.ffcv_loader import require_ffcv

    with open_dict(cfg):
        cfg.output_root = os.path.abspath(str(cfg.output_root))
    from caco.runtime import show_progress

    show = show_progress(cfg.get("progress", "auto"))
    results = []
    try:
        require_ffcv()
        if not cfg.data.get("ffcv"):
            from caco.errors import ConfigError

            raise ConfigError(f"data={cfg.data.get('name')} has no ffcv block to convert with")
        opts = options_from_config(cfg.data.ffcv)
        for split in cfg.splits:
            if split not in ("train", "val"):
                from caco.errors import ConfigError

                raise ConfigError(f"splits: {split!r} is not a split; use train and/or val")
            results.append(convert_split(cfg.data, split, opts, progress=show))
    except CacoError as e:
        log.error("%s", user_message(e))
        sys.exit(2)
    for r in results:
        state = "written" if r.written else "up to date"
        log.info("%s: %d samples, %d skipped (%s)", r.path, r.samples, len(r.skipped), state)
    return results
