"""The pretraining engine: epochs of ``caco_step`` with schedules, checkpoints, resume, tracking.

Run directory layout (one per pretraining run)::

    <run_dir>/
      .hydra/                 Hydra's composed config and overrides
      config.yaml             the resolved config of this run
      lease.json              which trainer owns the directory (caco.lease)
      tracking.json           MLflow uri / experiment / run id (caco.tracking)
      tracking-pending.jsonl  records buffered while the tracking backend was unreachable
      checkpoints/last.pt     written atomically after every epoch (and on preemption)
      checkpoints/epoch_NNNN.pt  milestone checkpoints (what the evaluation DAG consumes)
      progress.json           epoch and step of last.pt
      train_history.jsonl     one line per epoch: its train/* metrics (what the report plots)
      pretrain.log            the log

The trainer trains: the checkpoint format lives in :mod:`caco.checkpoint`, the lease in
:mod:`caco.lease`, tracking in :mod:`caco.tracking`, the in-loop kNN monitor in
:mod:`caco.monitor`; evaluations (the final kNN included) are the DAG's, reached only through
``milestone_hooks``. Re-running in the same run directory resumes from ``checkpoints/last.pt``;
on CPU with the torchvision loader the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import caco.step as steps
from caco.checkpoint import CheckpointError, CheckpointManager, TrainState
from caco.errors import ConfigError, TrainingDiverged
from caco.lease import LeaseHeld, RunLease
from caco.model import build_model
from caco.optim import LARS, set_lr
from caco.runtime import Runtime, resolve_runtime, show_progress
from caco.schedules import Schedules

log = logging.getLogger(__name__)

__all__ = ["HISTORY_FILE", "Pretrainer", "build_model", "validate"]

HISTORY_FILE = "train_history.jsonl"

MilestoneHook = Callable[[Path, int], None]


def validate(cfg: DictConfig, world: int) -> None:
    """Refuse settings that cannot work, naming the key and the fix."""
    epochs, batch = cfg.epochs, cfg.batch_size
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer (e.g. epochs=200)")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigError(f"batch_size={batch!r} must be a positive integer (the global batch)")
    if batch < world:
        raise ConfigError(
            f"batch_size={batch} is smaller than the world size {world}: every rank needs at "
            "least one image; raise batch_size or use fewer GPUs/tasks")
    if batch % world:
        raise ConfigError(
            f"batch_size={batch} is not divisible by the world size {world}; use a multiple "
            f"of {world} (e.g. {batch - batch % world or world})")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be >= 0")


class Pretrainer:
    """One pretraining run in ``run_dir`` (fresh or resumed). ``run()`` returns a summary.

    ``milestone_hooks`` are called on rank 0 with (checkpoint path, epoch) after each
    milestone checkpoint is written (the evaluation DAG's entry point). ``should_stop`` is
    polled every ``stop_poll_steps`` steps; when it returns True the engine writes ``last.pt``
    mid-epoch and returns with ``status='stopped'``. With ``requeued_after_stop`` (SLURM's
    preemption) the tracking run stays RUNNING for the requeued job; without it (a local
    SIGTERM) it ends KILLED until a relaunch resumes it.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, *,
                 milestone_hooks: Sequence[MilestoneHook] = (),
                 should_stop: Callable[[], bool] = lambda: False,
                 requeued_after_stop: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.milestone_hooks = list(milestone_hooks)
        self.should_stop = should_stop
        self.requeued_after_stop = requeued_after_stop
        self.rt: Runtime = resolve_runtime(cfg)
        validate(cfg, self.rt.world)
        self.tracker = None
        self.lease: RunLease | None = None
        self.state = TrainState()

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from caco.data.pretrain import build_device_augment, build_pretrain_loader
        from caco.distributed import wrap_for_training
        from caco.monitor import KnnMonitor

        cfg, rt, o = self.cfg, self.rt, self.cfg.optim
        self.loader = build_pretrain_loader(
            cfg.data, cfg.batch_size // rt.world, rank=rt.rank, world=rt.world, seed=cfg.seed,
            pin_memory=rt.device.type == "cuda", device=str(rt.device))
        self.augment = build_device_augment(cfg.data)
        self.core, self.model = wrap_for_training(build_model(cfg.model, cfg.seed), rt.device,
                                                  rt.world)
        if rt.channels_last:
            self.core = self.core.to(memory_format=torch.channels_last)
        self.schedules = Schedules(
            lr=o.lr, final_lr=o.final_lr, memory_lr=o.memory_lr,
            memory_lr_final=o.memory_lr_final, m0=o.ema_momentum,
            warmup_epochs=o.warmup_epochs, epochs=cfg.epochs, global_batch=cfg.batch_size)
        self.optimizer = LARS(self.core.encoder_q.parameters(), lr=self.schedules.base_lr,
                              weight_decay=o.weight_decay, momentum=o.momentum,
                              trust_coefficient=o.trust_coefficient)
        if rt.compile:
            self.core.encoder_q.compile()
            self.core.encoder_k.compile()
            self.augment.compile()
        c = cfg.checkpoint
        self.ckpts = CheckpointManager(self.run_dir, OmegaConf.to_container(cfg, resolve=True),
                                       milestones=c.milestones or (), every=c.every,
                                       epochs=cfg.epochs, before_write=self._check_lease,
                                       background=bool(c.get("background", True)))
        self.monitor = KnnMonitor(cfg, rt)

    def _start_tracking(self) -> None:
        if not (self.rt.is_main and self.cfg.tracking.enabled):
            return
        from caco import tracking

        self.tracker = tracking.start_run(
            self.cfg.tracking, self.cfg.output_root, self.run_dir,
            run_id=self.state.mlflow_run_id, params=tracking.flatten(self.ckpts.config),
            artifact=self.run_dir / "config.yaml")
        self.state.mlflow_run_id = self.tracker.run_id

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost:
            raise LeaseHeld(f"another trainer took over {self.run_dir}; this one stops without "
                            "writing a checkpoint")

    # ------------------------------------------------------------------ checkpoints
    def _save(self, epoch: int, step_in_epoch: int = 0) -> Path | None:
        self.state.epoch, self.state.step_in_epoch = epoch, step_in_epoch
        if self.tracker is not None:
            self.state.mlflow_run_id = self.tracker.run_id
        if not self.rt.is_main:
            return None
        return self.ckpts.save(self.core, self.optimizer, self.state, asdict(self.schedules))

    def _publish(self, epoch: int) -> None:
        path = self.ckpts.publish(epoch)
        log.info("milestone checkpoint %s", path)
        for hook in self.milestone_hooks:
            hook(path, epoch)

    # ------------------------------------------------------------------ data
    def _to_device(self, views: Sequence[torch.Tensor], epoch: int, step: int
                   ) -> list[torch.Tensor]:
        """uint8 views -> the device -> colour stage seeded by (seed, epoch, step, rank)."""
        from caco.device_augment import batch_seed

        fmt = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        on_device = [v.to(self.rt.device, non_blocking=True) for v in views]
        out = self.augment(on_device, batch_seed(self.cfg.seed, epoch, step, self.rt.rank))
        return [v.contiguous(memory_format=fmt) for v in out]

    def _prepared(self, batches, epoch: int, start_step: int
                  ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """``(step, views on the device)``; with ``prefetch`` one batch ahead (on CUDA on a
        side stream, overlapping the step)."""
        if not self.rt.prefetch:
            for i, (views, _) in enumerate(batches, start=start_step):
                yield i, self._to_device(views, epoch, i)
            return
        from caco.prefetch import prefetch, stream_for

        yield from prefetch(batches, lambda views, i: self._to_device(views, epoch, i),
                            start_step, stream_for(self.rt.device))

    def _init_batches(self) -> Iterator[list[torch.Tensor]]:
        """Deterministic batches for the bank initialisation (epochs -1, -2, ...)."""
        for e in itertools.count(1):
            self.loader.set_epoch(-e)
            for step, (views, _) in enumerate(self.loader):
                yield self._to_device(views, -e, step)[:2]

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Hold the run directory's lease for the whole run (rank 0), then train."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rt.is_main:
            lease = self.cfg.get("lease") or {}
            self.lease = RunLease(self.run_dir, heartbeat_s=float(lease.get("heartbeat_s", 30)),
                                  stale_s=float(lease.get("stale_s", 300))).acquire()
        status = "failed"
        try:
            summary = self._run()
            status = summary["status"]
            return summary
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            if self.lease is not None:
                self.lease.release(status)

    def _run(self) -> dict[str, Any]:
        if self.rt.is_main:
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        self._setup()
        resumed = self.ckpts.load(self.core, self.optimizer)
        self.state = resumed or TrainState()
        self._start_tracking()
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "status": "finished",
                                   "run_id": self.state.mlflow_run_id}
        try:
            self._train(summary, resumed is not None)
            self.ckpts.wait()  # a stop hands over to a requeue that must find last.pt
        except BaseException as e:
            try:
                self.ckpts.wait()
            except CheckpointError as write_error:
                log.error("%s", write_error)
            if self.tracker:
                self.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if summary["status"] == "finished":
            if self.tracker:
                self.tracker.end("FINISHED")
            summary["epochs"] = self.cfg.epochs
        elif self.tracker and not self.requeued_after_stop:
            self.tracker.end("KILLED")
        return summary

    def _train(self, summary: dict[str, Any], resumed: bool) -> None:
        """The bank initialisation (a fresh run) and the epochs; ``summary['status']`` is
        set to ``'stopped'`` when a stop request ends it early."""
        missed = self.ckpts.missed_milestone(self.state) if resumed else None
        if missed is not None and self.rt.is_main:
            log.warning("milestone epoch %d was never published (interrupted after last.pt "
                        "was written); publishing it now", missed)
            self._publish(missed)
        if not resumed and self.cfg.optim.bank_init:
            self._init_bank()
            if self.should_stop():
                summary["status"] = "stopped"
                return
        start, start_step = self.state.epoch, self.state.step_in_epoch
        for epoch in range(start, self.cfg.epochs):
            if self._train_epoch(epoch, start_step if epoch == start else 0):
                summary["status"] = "stopped"
                return
            summary.update(self._end_epoch(epoch + 1))
            if epoch + 1 < self.cfg.epochs and self.should_stop():
                log.warning("stop requested: last.pt of epoch %d is saved; exiting", epoch + 1)
                summary["status"] = "stopped"
                return

    def _init_bank(self) -> None:
        t0 = time.perf_counter()
        losses = steps.init_bank(self.model, self.optimizer, self._init_batches(),
                                 lr=self.schedules.base_lr, autocast_dtype=self.rt.autocast_dtype)
        log.info("bank initialised from %d batches in %.1f s (loss %.3f -> %.3f)",
                 len(losses), time.perf_counter() - t0, losses[0], losses[-1])
        self._log({"init/loss": losses[-1]}, 0)
        self._save(0)

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        """After a completed epoch: replicas agree, last.pt, the milestone, the monitor."""
        from caco.distributed import check_replicas

        check_replicas([p.detach() for p in self.core.encoder_q.parameters()]
                       + [self.core.bank.W, self.core.bank.V], self.rt.device, epoch)
        self._save(epoch)
        if self.rt.is_main and self.ckpts.is_milestone(epoch):
            self._publish(epoch)
        monitored = self.monitor.after_epoch(self.core, epoch)
        self._log(monitored, epoch)
        if monitored and self.rt.is_main:
            self._history(epoch, monitored)
        return monitored

    def _history(self, epoch: int, metrics: dict[str, Any]) -> None:
        """One line of ``train_history.jsonl`` (a resumed epoch appends again: readers keep
        the last line of each epoch; a line torn by a kill is skipped)."""
        import json

        line = json.dumps({"epoch": epoch, "time": time.time(), **metrics})
        with open(self.run_dir / HISTORY_FILE, "a") as f:
            f.write(line + "\n")

    def _log(self, metrics: dict, step: int) -> None:
        if self.tracker and metrics:
            self.tracker.log_metrics(metrics, step)

    def _train_epoch(self, epoch: int, start_step: int) -> bool:
        """One epoch from ``start_step``; True when a stop request ended it early.

        The step's results stay on the device: they are read (which waits for the device)
        only on logging steps and at the end of the epoch, where finiteness is checked, and
        the stop request is polled every ``stop_poll_steps`` steps (the same steps on every
        rank, since with several ranks a poll is a collective)."""
        cfg, rt = self.cfg, self.rt
        s = self.schedules.at(epoch)
        set_lr(self.optimizer, s["lr"])
        self.loader.set_epoch(epoch, start_step)
        total = self.loader.steps_per_epoch
        self.core.train()
        sums: dict[str, torch.Tensor] = {}
        n, t0, batches, bar = 0, time.perf_counter(), self.loader, None
        if rt.is_main and show_progress(cfg.get("progress", "auto")):
            from tqdm.auto import tqdm

            bar = batches = tqdm(self.loader, total=total - start_step,
                                 desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        every = int(cfg.log_every_steps or 0)
        poll = max(1, int(cfg.get("stop_poll_steps", 1)))
        for i, views in self._prepared(batches, epoch, start_step):
            out = steps.caco_step(self.model, self.optimizer, views,
                                  memory_lr=s["memory_lr"], ema_momentum=s["ema_momentum"],
                                  autocast_dtype=rt.autocast_dtype)
            for key in ("loss", "positive_prob", "positive_columns_frac"):
                value = getattr(out, key).detach().float()
                sums[key] = value if key not in sums else sums[key] + value
            n += 1
            if every and (i + 1) % every == 0:
                self._check_finite(sums["loss"], epoch, i, every)
                if rt.is_main:
                    loss, prob = out.loss.item(), out.positive_prob.item()
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}")
                    else:
                        log.info("epoch %d/%d step %d/%d loss %.4f positive_prob %.4f",
                                 epoch + 1, cfg.epochs, i + 1, total, loss, prob)
                    self._log({"train_step/loss": loss, "train_step/positive_prob": prob},
                              epoch * total + i + 1)
            if (i + 1) % poll == 0 and i + 1 < total and self.should_stop():
                if bar is not None:
                    bar.close()
                self._check_finite(sums["loss"], epoch, i, every)
                log.warning("stop requested: saving epoch %d step %d and exiting", epoch, i + 1)
                self._save(epoch, i + 1)
                return True
        if bar is not None:
            bar.close()
        if n:
            self._check_finite(sums["loss"], epoch, start_step + n - 1, every)
        if n and rt.is_main:
            elapsed = time.perf_counter() - t0
            metrics = {f"train/{k}": v.item() / n for k, v in sums.items()}
            metrics.update({"train/lr": s["lr"], "train/memory_lr": s["memory_lr"],
                            "train/ema_momentum": s["ema_momentum"],
                            "train/images_per_sec": n * cfg.batch_size / elapsed,
                            "train/epoch_time_s": elapsed})
            log.info("epoch %d/%d: loss %.4f, positive_prob %.4f, distinct positives %.3f, "
                     "%.1f images/s", epoch + 1, cfg.epochs, metrics["train/loss"],
                     metrics["train/positive_prob"], metrics["train/positive_columns_frac"],
                     metrics["train/images_per_sec"])
            self._log(metrics, epoch + 1)
            self._history(epoch + 1, {**metrics, "world": rt.world, "device": rt.device.type,
                                      "threads": torch.get_num_threads()})
        return False

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, step: int, every: int) -> None:
        """A NaN or inf loss at any step since the last check makes the running sum
        non-finite: stop before anything is saved."""
        value = loss_sum.item()
        if math.isfinite(value):
            return
        last = self.ckpts.last
        since = f" (checked every {every} steps)" if every > 1 else ""
        raise TrainingDiverged(
            f"loss became {value} at epoch {epoch + 1}, step {step + 1} or before{since}; "
            f"stopped without saving. The last good checkpoint is "
            f"{last if last.exists() else 'none'}; lower optim.lr / optim.memory_lr or check "
            "the data, then rerun to resume")
