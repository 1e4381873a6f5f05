"""The pretraining engine: epochs of ``caco_step`` with schedules, checkpoints, resume, tracking.

Run directory layout (one per pretraining run)::

    <run_dir>/
      .hydra/                 Hydra's composed config and overrides
      config.yaml             the resolved config of this run
      tracking.json           MLflow uri / experiment id / run id (written at run creation)
      tracking-pending.jsonl  records buffered while the tracking backend was unreachable
      checkpoints/last.pt     written atomically after every epoch (and on preemption)
      checkpoints/epoch_NNNN.pt  milestone checkpoints (what the evaluation DAG consumes)
      pretrain.log            the log

Re-running in the same run directory resumes from ``checkpoints/last.pt``; on CPU with the
torchvision loader the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from caco.checkpoint import CheckpointError, publish_milestone, read_checkpoint, save_last
from caco.errors import ConfigError, TrainingDiverged
from caco.lease import LeaseHeld, RunLease
from caco.model import CaCo, build_model
from caco.optim import LARS, set_lr
from caco.runtime import Runtime, resolve_runtime, show_progress
from caco.schedules import Schedules
from caco.step import caco_step, init_bank

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "caco-toolkit-1"
# Changing these makes a checkpoint unusable for the run; anything else only warns.
STRUCTURAL_KEYS = ("model.arch", "model.dim", "model.mlp_dim", "model.bank_size",
                   "model.small_stem", "model.width", "model.blocks")
REPLICA_KEYS = ("epochs", "batch_size", "seed", "optim", "data.augment", "data.image_size",
                "data.train_subset", "data.kind")

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


def _get(container: dict, dotted: str):
    node: Any = container
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """Refuse a checkpoint whose structure differs; warn about run-changing differences."""
    bad = [f"{k}: checkpoint {_get(saved, k)!r} vs now {_get(current, k)!r}"
           for k in STRUCTURAL_KEYS if _get(saved, k) != _get(current, k)]
    if bad:
        raise ConfigError(
            f"cannot resume from {path}: the config differs where it matters ({'; '.join(bad)}). "
            "Use the checkpoint's settings, or start a new run (another run_name).")
    changed = [k for k in REPLICA_KEYS if _get(saved, k) != _get(current, k)]
    if changed:
        log.warning("resuming %s with changed %s: the run will differ from an uninterrupted "
                    "one", path, ", ".join(changed))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _interactive(cfg: DictConfig) -> bool:
    return show_progress(cfg.get("progress", "auto"))


class Pretrainer:
    """One pretraining run in ``run_dir`` (fresh or resumed). ``run()`` returns a summary.

    ``milestone_hooks`` are called on rank 0 with (checkpoint path, epoch) after each
    milestone checkpoint is written (the evaluation DAG's entry point). ``should_stop`` is
    polled after every step; when it returns True the engine writes ``last.pt`` mid-epoch and
    returns with ``status='stopped'`` (preemption).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, *,
                 milestone_hooks: Sequence[MilestoneHook] = (),
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.milestone_hooks = list(milestone_hooks)
        self.should_stop = should_stop
        self.rt: Runtime = resolve_runtime(cfg)
        validate(cfg, self.rt.world)
        self.tracker = None
        self.lease: RunLease | None = None

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        from caco.data.pretrain import build_device_augment, build_pretrain_loader

        self.per_rank_batch = cfg.batch_size // rt.world
        self.loader = build_pretrain_loader(
            cfg.data, self.per_rank_batch, rank=rt.rank, world=rt.world, seed=cfg.seed,
            pin_memory=rt.device.type == "cuda")
        self.augment = build_device_augment(cfg.data)
        self.core = build_model(cfg.model, cfg.seed)
        if rt.world > 1 and rt.device.type == "cuda":
            # PyTorch's SyncBatchNorm is GPU-only; on CPU each rank normalises its own half.
            self.core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.core)
        self.core = self.core.to(rt.device)
        if rt.channels_last:
            self.core = self.core.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.schedules = Schedules(
            lr=o.lr, final_lr=o.final_lr, memory_lr=o.memory_lr,
            memory_lr_final=o.memory_lr_final, m0=o.ema_momentum,
            warmup_epochs=o.warmup_epochs, epochs=cfg.epochs, global_batch=cfg.batch_size)
        self.optimizer = LARS(self.core.encoder_q.parameters(), lr=self.schedules.base_lr,
                              weight_decay=o.weight_decay, momentum=o.momentum,
                              trust_coefficient=o.trust_coefficient)
        self.model: torch.nn.Module = self.core
        if rt.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # The bank is identical on every rank by construction (averaged gradient);
            # broadcasting it as a buffer at every forward would cost a full copy per step.
            ids = [rt.device] if rt.device.type == "cuda" else None
            try:
                self.model = DDP(self.core, device_ids=ids, forward_sync_buffers=False)
            except TypeError:  # torch before forward_sync_buffers
                self.model = DDP(self.core, device_ids=ids, broadcast_buffers=False)
        if rt.compile:
            self.core.encoder_q.compile()
            self.core.encoder_k.compile()

    def _resolved_config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    def _load_last(self) -> dict | None:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return None
        ckpt = read_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a checkpoint of this toolkit "
                                  f"(format {ckpt.get('format')!r}); move it away to start over")
        check_compatible(ckpt["config"], self._resolved_config(), path)
        try:
            self.core.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit the model: {str(e).splitlines()[0]}") \
                from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        log.info("resuming from %s: %d epochs done, step %d of the next", path, ckpt["epoch"],
                 ckpt["step_in_epoch"])
        return ckpt

    def _start_tracking(self, ckpt: dict | None) -> None:
        if not (self.rt.is_main and self.cfg.tracking.enabled):
            return
        from caco import tracking

        t = self.cfg.tracking
        tracking.use_credentials(t)
        uri = tracking.resolve_uri(t.uri, self.cfg.output_root)
        artifacts = str(Path(self.cfg.output_root) / "mlartifacts")
        tracking.configure_http(t.http_retries, t.http_timeout)
        try:
            exp_id = tracking.prepare_experiment(uri, t.experiment, artifacts)
        except Exception as e:  # training goes on; the run is created when the backend is back
            log.warning("tracking backend %s unavailable at start (%s: %s); training goes on "
                        "and every record is buffered in %s", tracking.redact(uri),
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                        self.run_dir / tracking.PENDING_FILE)
            exp_id = None
        self.tracker = tracking.Tracker(uri, exp_id, self.run_dir, experiment=t.experiment,
                                        artifact_root=artifacts, http_retries=t.http_retries,
                                        http_timeout=t.http_timeout,
                                        retry_interval_s=t.retry_interval_s)
        saved_id = (ckpt or {}).get("mlflow_run_id")
        fresh = saved_id is None and tracking.read_run_file(self.run_dir) is None
        self.tracker.start(run_id=saved_id, run_name=self.run_dir.name,
                           tags=tracking.default_tags(self._run_tags()))
        if fresh:
            self.tracker.log_params(tracking.flatten(self._resolved_config()))
            self.tracker.log_artifact(self.run_dir / "config.yaml")

    def _run_tags(self) -> dict:
        tags = {"run_dir": str(self.run_dir)}
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = HydraConfig.get().overrides.task
            tags["overrides"] = " ".join(overrides)
        except (ImportError, ValueError):
            pass
        return tags

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "arch": self.cfg.model.arch, "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(), "config": self._resolved_config(),
            "schedules": asdict(self.schedules), "data_seed": int(self.cfg.seed),
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
            "rng": _rng_state(),
        }

    def _save_last(self, epoch: int, step_in_epoch: int = 0) -> Path | None:
        if not self.rt.is_main:
            return None
        self._check_lease()
        return save_last(self._state(epoch, step_in_epoch), self.ckpt_dir / "last.pt")

    def _is_milestone(self, epoch: int) -> bool:
        c = self.cfg.checkpoint
        return (epoch == self.cfg.epochs or epoch in set(c.milestones or [])
                or (c.every and epoch % c.every == 0))

    def _publish_milestone(self, last: Path, epoch: int) -> None:
        self._check_lease()
        path = publish_milestone(last, epoch)
        log.info("milestone checkpoint %s", path)
        for hook in self.milestone_hooks:
            hook(path, epoch)

    def _publish_missed_milestone(self, ckpt: dict) -> None:
        """A kill between writing ``last.pt`` at the end of a milestone epoch and publishing
        ``epoch_NNNN.pt`` would lose that milestone and its whole DAG: publish it now."""
        epoch = int(ckpt["epoch"])
        if not (self.rt.is_main and epoch > 0 and ckpt["step_in_epoch"] == 0
                and self._is_milestone(epoch)):
            return
        if (self.ckpt_dir / f"epoch_{epoch:04d}.pt").exists():
            return
        log.warning("milestone epoch %d was never published (interrupted after last.pt was "
                    "written); publishing it now", epoch)
        self._publish_milestone(self.ckpt_dir / "last.pt", epoch)

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost:
            raise LeaseHeld(f"another trainer took over {self.run_dir}; this one stops without "
                            "writing a checkpoint")

    # ------------------------------------------------------------------ data
    def _to_device(self, views: Sequence[torch.Tensor], epoch: int, step: int
                   ) -> list[torch.Tensor]:
        """uint8 views -> the device -> colour stage seeded by (seed, epoch, step, rank)."""
        from caco.device_augment import batch_seed

        fmt = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        on_device = [v.to(self.rt.device, non_blocking=True) for v in views]
        out = self.augment(on_device, batch_seed(self.cfg.seed, epoch, step, self.rt.rank))
        return [v.contiguous(memory_format=fmt) for v in out]

    def _init_batches(self) -> Iterator[list[torch.Tensor]]:
        """Deterministic batches for the bank initialisation (epochs -1, -2, ...)."""
        for e in itertools.count(1):
            self.loader.set_epoch(-e)
            for step, (views, _) in enumerate(self.loader):
                yield self._to_device(views, -e, step)[:2]

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
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

    def _run(self) -> dict:
        cfg, rt = self.cfg, self.rt
        if rt.is_main:
            OmegaConf.save(self._resolved_config(), self.run_dir / "config.yaml")
        self._setup()
        ckpt = self._load_last()
        self._start_tracking(ckpt)
        if ckpt is not None:
            self._publish_missed_milestone(ckpt)
        start_epoch = ckpt["epoch"] if ckpt else 0
        start_step = ckpt["step_in_epoch"] if ckpt else 0
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "status": "finished",
                                   "run_id": self.tracker.run_id if self.tracker else None}
        try:
            if ckpt is None and cfg.optim.bank_init:
                t0 = time.perf_counter()
                losses = init_bank(self.model, self.optimizer, self._init_batches(),
                                   lr=self.schedules.base_lr,
                                   autocast_dtype=rt.autocast_dtype)
                log.info("bank initialised from %d batches in %.1f s (loss %.3f -> %.3f)",
                         len(losses), time.perf_counter() - t0, losses[0], losses[-1])
                self._log({"init/loss": losses[-1]}, 0)
                self._save_last(0)
                if self.should_stop():
                    summary["status"] = "stopped"
                    return summary
            for epoch in range(start_epoch, cfg.epochs):
                stopped = self._train_epoch(epoch, start_step if epoch == start_epoch else 0)
                if stopped:
                    summary["status"] = "stopped"
                    return summary
                self._check_replicas(epoch + 1)
                last = self._save_last(epoch + 1)
                if last is not None and self._is_milestone(epoch + 1):
                    self._publish_milestone(last, epoch + 1)
                self._maybe_knn_monitor(epoch + 1)
            summary.update(self._final_eval())
        except BaseException as e:
            if self.tracker:
                self.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if self.tracker:
            self.tracker.end("FINISHED")
            self.tracker.flush()
        summary["epochs"] = cfg.epochs
        return summary

    def _check_replicas(self, epoch: int) -> None:
        """Every rank must hold the same weights and bank; a silent divergence (a missed
        all-reduce, a rank-dependent bank) would otherwise only show up as bad results."""
        if self.rt.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            tensors = [p.detach() for p in self.core.encoder_q.parameters()]
            tensors += [self.core.bank.W, self.core.bank.V]
            digest = torch.stack([t.double().sum() for t in tensors] +
                                 [t.double().abs().sum() for t in tensors]).to(self.rt.device)
        gathered = [torch.empty_like(digest) for _ in range(self.rt.world)]
        dist.all_gather(gathered, digest)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"ranks diverged after epoch {epoch}: weights or bank differ")
        if self.rt.is_main:
            log.info("epoch %d: all %d ranks hold identical weights and bank", epoch,
                     self.rt.world)

    def _log(self, metrics: dict, step: int) -> None:
        if self.tracker:
            self.tracker.log_metrics(metrics, step)

    def _train_epoch(self, epoch: int, start_step: int) -> bool:
        cfg, rt = self.cfg, self.rt
        s = self.schedules.at(epoch)
        set_lr(self.optimizer, s["lr"])
        self.loader.set_epoch(epoch, start_step)
        steps = self.loader.steps_per_epoch
        self.core.train()
        sums = {"loss": 0.0, "positive_prob": 0.0, "positive_columns_frac": 0.0}
        n, t0 = 0, time.perf_counter()
        batches = self.loader
        bar = None
        if rt.is_main and _interactive(cfg):
            from tqdm.auto import tqdm

            bar = batches = tqdm(self.loader, total=steps - start_step, initial=0,
                                 desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        every = int(cfg.log_every_steps or 0)
        for i, (views, _) in enumerate(batches, start=start_step):
            out = caco_step(self.model, self.optimizer, self._to_device(views, epoch, i),
                            memory_lr=s["memory_lr"], ema_momentum=s["ema_momentum"],
                            autocast_dtype=rt.autocast_dtype)
            if not math.isfinite(out.loss):
                last = self.ckpt_dir / "last.pt"
                raise TrainingDiverged(
                    f"loss became {out.loss} at epoch {epoch + 1}, step {i + 1}; stopped without "
                    f"saving. The last good checkpoint is {last if last.exists() else 'none'}; "
                    "lower optim.lr / optim.memory_lr or check the data, then rerun to resume")
            sums["loss"] += out.loss
            sums["positive_prob"] += out.positive_prob
            sums["positive_columns_frac"] += out.positive_columns_frac
            n += 1
            if bar is not None:
                bar.set_postfix(loss=f"{out.loss:.3f}")
            if every and (i + 1) % every == 0 and rt.is_main:
                global_step = epoch * steps + i + 1
                if bar is None:
                    log.info("epoch %d/%d step %d/%d loss %.4f positive_prob %.4f",
                             epoch + 1, cfg.epochs, i + 1, steps, out.loss, out.positive_prob)
                self._log({"train_step/loss": out.loss,
                           "train_step/positive_prob": out.positive_prob}, global_step)
            if self.should_stop():
                if bar is not None:
                    bar.close()
                log.warning("stop requested: saving epoch %d step %d and exiting", epoch, i + 1)
                self._save_last(epoch, i + 1)
                return True
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        if n == 0:
            return False
        metrics = {f"train/{k}": v / n for k, v in sums.items()}
        metrics.update({"train/lr": s["lr"], "train/memory_lr": s["memory_lr"],
                        "train/ema_momentum": s["ema_momentum"],
                        "train/images_per_sec": n * cfg.batch_size / elapsed,
                        "train/epoch_time_s": elapsed})
        if rt.is_main:
            log.info("epoch %d/%d: loss %.4f, positive_prob %.4f, distinct positives %.3f, "
                     "%.1f images/s", epoch + 1, cfg.epochs, metrics["train/loss"],
                     metrics["train/positive_prob"], metrics["train/positive_columns_frac"],
                     metrics["train/images_per_sec"])
            self._log(metrics, epoch + 1)
        return False

    # ------------------------------------------------------------------ kNN
    def _knn(self, model: CaCo) -> dict:
        from caco.knn import knn_accuracy, knn_loaders
        from caco.model import Backbone

        k = self.cfg.eval.knn
        if not hasattr(self, "_knn_data"):
            self._knn_data = knn_loaders(self.cfg.data, k)
        return knn_accuracy(Backbone(model.encoder_q), *self._knn_data, k=k.k,
                            temperature=k.temperature, device=self.rt.device,
                            channels_last=self.rt.channels_last,
                            autocast_dtype=self.rt.autocast_dtype,
                            progress=_interactive(self.cfg))

    def _maybe_knn_monitor(self, epoch: int) -> None:
        knn = self.cfg.eval.get("knn")
        every = int(knn.every or 0) if knn is not None else 0
        if self.rt.is_main and every and epoch % every == 0:
            result = self._knn(self.core)
            self._last_knn = (epoch, result)
            log.info("kNN monitor after epoch %d: top-1 %.2f", epoch, result["top1"])
            self._log({"train/knn_top1": result["top1"]}, epoch)

    def _final_eval(self) -> dict:
        """The run's own proof: kNN of the final encoder, and of the same random init."""
        k = self.cfg.eval.get("knn")
        out: dict[str, float] = {}
        if k is None or not (self.rt.is_main and k.final):
            return out
        cached = getattr(self, "_last_knn", None)
        epochs = self.cfg.epochs
        result = cached[1] if cached and cached[0] == epochs else self._knn(self.core)
        out["eval/knn_top1"], out["eval/knn_top5"] = result["top1"], result["top5"]
        if k.random_init_baseline:
            base = self._knn(build_model(self.cfg.model, self.cfg.seed).to(self.rt.device))
            out["eval/knn_top1_random_init"] = base["top1"]
            out["eval/knn_top5_random_init"] = base["top5"]
        log.info("kNN (k=%d, T=%g) after %d epochs: %s", k.k, k.temperature, epochs,
                 ", ".join(f"{name} {v:.2f}" for name, v in out.items()))
        self._log(out, epochs)
        return out
