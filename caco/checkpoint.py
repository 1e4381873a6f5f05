"""The checkpoint format, both ways: the trainer's checkpoints (written, read, resumed,
published as milestones) and the authors' released layout (caco.md §11).

A toolkit checkpoint is ``{'format', 'epoch', 'step_in_epoch', 'arch', 'model', 'optimizer',
'config', 'schedules', 'data_seed', 'mlflow_run_id', 'rng'}``: the model's state dict (CaCo's
names: ``encoder_q.*``, ``encoder_k.*``, ``bank.W``/``bank.V``), LARS's state, the resolved
run config, and every RNG. :class:`CheckpointManager` owns a run's ``checkpoints/``: ``last.pt``
after every epoch (and on a stop request, mid-epoch), ``epoch_NNNN.pt`` for milestones (a hard
link, published atomically), resume with its compatibility check.

The reference saves ``{'epoch', 'arch', 'state_dict', 'optimizer', 'Memory_Bank'}`` where
``state_dict`` comes from a DDP-wrapped model (``module.encoder_q.*``, ``module.encoder_k.*``
with torchvision ResNet names and the projector at ``fc.0/1/3/4/6``) and ``Memory_Bank``
holds ``W`` (dim x K) and ``v`` (its momentum). Our :class:`caco.model.CaCo` uses the same
names, so loading is a renaming-free, fully checked copy. Models are rebuilt through
:func:`caco.model.build_model` only.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caco.errors import CacoError, ConfigError
from caco.fileio import atomic_write, fsync_dir, read_json
from caco.model import CaCo, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "caco-toolkit-1"
# Changing these makes a checkpoint unusable for the run; anything else only warns.
STRUCTURAL_KEYS = ("model.arch", "model.dim", "model.mlp_dim", "model.bank_size",
                   "model.small_stem", "model.width", "model.blocks")
REPLICA_KEYS = ("epochs", "batch_size", "seed", "optim", "data.augment", "data.image_size",
                "data.train_subset", "data.kind")

PROGRESS_FILE = "progress.json"
_MILESTONE = re.compile(r"epoch_(\d{4,})\.pt")


class CheckpointError(CacoError, ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or not matching the model."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` onto the CPU.

    Raises :class:`CheckpointError` naming the file for a missing, truncated or otherwise
    unreadable file instead of a deep pickle/zip traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "use another checkpoint file"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict")
    return data


def _diff_message(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = [f"{what} does not fit the model"]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            parts.append(f"{label}: {shown}")
    parts.append("check model.arch / model.dim / model.mlp_dim / model.bank_size against it")
    return "; ".join(parts)


def _checked_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(_diff_message(what, missing, unexpected, shapes))
    return dict(state)


def load_reference_checkpoint(
    model: CaCo, source: str | os.PathLike | Mapping[str, Any], *, require_bank: bool = True
) -> dict[str, Any]:
    """Load the authors' checkpoint (a path or an already loaded dict) into ``model``.

    Every encoder_q / encoder_k key must match by name and shape, and the bank's ``W`` and
    ``v`` must match ``model.bank`` (skip the bank with ``require_bank=False``, e.g. for a
    checkpoint stripped to the encoder). Returns ``{'epoch', 'arch'}`` as stored.
    Raises :class:`CheckpointError` naming the offending keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "reference checkpoint"
    ckpt = read_checkpoint(source) if not isinstance(source, Mapping) else source
    if "state_dict" not in ckpt:
        raise CheckpointError(
            f"{name} has no 'state_dict' (top-level keys: {sorted(ckpt)}); "
            "expected the reference layout {'epoch', 'arch', 'state_dict', 'Memory_Bank', ...}"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {"encoder_q": {}, "encoder_k": {}}
    stray = []
    for key, value in ckpt["state_dict"].items():
        bare = key.removeprefix("module.")
        head, _, rest = bare.partition(".")
        if head in groups:
            groups[head][rest] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(_diff_message(f"{name} state_dict", [], stray, []))
    q_state = _checked_state(model.encoder_q, groups["encoder_q"], f"{name} encoder_q")
    k_state = _checked_state(model.encoder_k, groups["encoder_k"], f"{name} encoder_k")

    bank_state = None
    bank = ckpt.get("Memory_Bank")
    if bank is not None:
        # The reference calls the momentum buffer 'v'; ours is 'V'.
        renamed = {"V" if k == "v" else k: v for k, v in dict(bank).items()}
        bank_state = _checked_state(model.bank, renamed, f"{name} Memory_Bank (W, v)")
    elif require_bank:
        raise CheckpointError(
            f"{name} has no 'Memory_Bank' (W, v); pass require_bank=False to load only encoders"
        )

    with torch.no_grad():
        model.encoder_q.load_state_dict(q_state)
        model.encoder_k.load_state_dict(k_state)
        if bank_state is not None:
            model.bank.load_state_dict(bank_state)
    return {"epoch": ckpt.get("epoch"), "arch": ckpt.get("arch")}


def save_atomic(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`caco.fileio.atomic_write`: never a torn checkpoint."""
    return atomic_write(path, lambda f: torch.save(dict(state), f), binary=True)


def save_last(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``last.pt`` (atomically), then the run's ``progress.json``: epoch and step, for tools
    that must not load a checkpoint to say how far a run got (``dag.py status``)."""
    import json
    import time

    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a write killed half-way (the
        stale.unlink(missing_ok=True)                      # run's lease: no other writer)
    path = save_atomic(state, path)
    atomic_write(path.parent.parent / PROGRESS_FILE, lambda f: f.write(json.dumps(
        {"epoch": int(state["epoch"]), "step_in_epoch": int(state["step_in_epoch"]),
         "epochs": int((state.get("config") or {}).get("epochs") or 0),
         "time": time.time()})))
    return path


def progress(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """How far a run got: ``{'epoch', 'step_in_epoch', 'epochs', 'time'}`` of its last.pt."""
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    sidecar = read_json(Path(run_dir) / PROGRESS_FILE)
    if sidecar is not None:
        return sidecar
    if not ckpt.exists():
        return None
    try:  # a run from before the sidecar: mapped, so no tensor is read
        data = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return {"epoch": data.get("epoch"), "step_in_epoch": data.get("step_in_epoch"),
            "epochs": (data.get("config") or {}).get("epochs"), "time": ckpt.stat().st_mtime}


def link_or_copy(src: Path, dst: Path) -> Path:
    """Publish ``src`` under a second name atomically (hard link if possible), then fsync
    the folder so the new name survives a crash."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return dst


def milestones(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the milestone checkpoints (``epoch_NNNN.pt``) in a folder, by
    epoch."""
    found = ((_MILESTONE.fullmatch(p.name), p) for p in Path(checkpoint_dir).glob("epoch_*.pt"))
    return sorted((int(m.group(1)), p) for m, p in found if m)


def publish_milestone(last: Path, epoch: int) -> Path:
    """``checkpoints/last.pt`` of a completed milestone epoch -> ``epoch_NNNN.pt``."""
    return link_or_copy(Path(last), Path(last).parent / f"epoch_{epoch:04d}.pt")


def model_from_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> tuple[CaCo, dict]:
    """A CaCo model with the weights of any checkpoint this toolkit knows.

    Our own checkpoints carry their model config; the authors' layout is rebuilt from the
    stored ``arch`` and the shapes of the projector and bank. Returns ``(model, info)`` with
    ``info = {'epoch', 'arch', 'format'}``.
    """
    name = str(source) if not isinstance(source, Mapping) else "checkpoint"
    ckpt = read_checkpoint(source) if not isinstance(source, Mapping) else dict(source)
    if ckpt.get("format", "").startswith("caco-toolkit"):
        from omegaconf import OmegaConf

        m = ckpt["config"]["model"]
        with torch.random.fork_rng(devices=[]):  # the weights come from the file
            model = build_model(OmegaConf.create(m), 0)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{name} does not fit its own config: "
                                  f"{str(e).splitlines()[0]}") from None
        return model, {"epoch": ckpt["epoch"], "arch": m["arch"], "format": ckpt["format"]}
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name} is neither a caco-toolkit checkpoint nor the reference "
                              f"layout (top-level keys: {sorted(ckpt)})")
    arch = ckpt.get("arch") or "resnet50"
    head = state.get("module.encoder_q.fc.6.weight", state.get("encoder_q.fc.6.weight"))
    if head is None:
        raise CheckpointError(f"{name}: no encoder_q.fc.6.weight, cannot tell the projector size")
    dim, mlp_dim = head.shape
    bank = ckpt.get("Memory_Bank")
    bank_size = bank["W"].shape[1] if bank is not None and "W" in bank else 1
    stem = state.get("module.encoder_q.conv1.weight", state.get("encoder_q.conv1.weight"))
    small_stem = stem is not None and stem.shape[-1] == 3
    width = stem.shape[0] if stem is not None else 64
    blocks = []
    for stage in range(1, 5):
        prefix = f"encoder_q.layer{stage}."
        ids = {int(k.removeprefix("module.")[len(prefix):].split(".")[0])
               for k in state if k.removeprefix("module.").startswith(prefix)}
        blocks.append(max(ids) + 1 if ids else 1)
    from omegaconf import OmegaConf

    with torch.random.fork_rng(devices=[]):
        model = build_model(OmegaConf.create({
            "arch": arch, "dim": int(dim), "mlp_dim": int(mlp_dim), "bank_size": int(bank_size),
            "moco_t": 0.08, "mem_t": 0.08, "mem_momentum": 0.9, "small_stem": small_stem,
            "width": int(width), "blocks": blocks}), 0)
    info = load_reference_checkpoint(model, ckpt, require_bank=bank is not None)
    return model, {**info, "format": "reference"}


# ------------------------------------------------------------------ the trainer's checkpoints
def _get(container: Mapping, dotted: str):
    node: Any = container
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(saved: Mapping, current: Mapping, path: Path) -> None:
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


def cpu_snapshot(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples) whose tensors are new CPU tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: cpu_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Where a run is: epochs completed, steps into the next one, its MLflow run."""

    epoch: int = 0
    step_in_epoch: int = 0
    mlflow_run_id: str | None = None


class CheckpointManager:
    """A run's ``checkpoints/``: what the trainer saves and resumes from, and its milestones.

    ``config`` is the resolved run config (stored in every checkpoint, checked on resume);
    ``before_write`` is called before anything is written (the run's lease check). With
    ``background`` a save snapshots the state into CPU memory and writes it in a thread while
    training goes on: still atomically (a kill mid-write leaves the previous ``last.pt``), one
    write at a time, and a failed write is raised by the next ``save``, ``publish`` or
    :meth:`wait` (the trainer waits before it publishes a milestone, stops or ends).
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any], *,
                 milestones: Iterable[int] = (), every: int = 0, epochs: int,
                 before_write: Callable[[], None] = lambda: None,
                 background: bool = False) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.config = dict(config)
        self.milestones, self.every, self.epochs = set(milestones or ()), int(every or 0), epochs
        self.before_write = before_write
        self.background = background
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Until the background write (if any) is on disk; raises CheckpointError if it
        failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing {self.last} failed: {type(error).__name__}: "
                                  f"{error}; the previous last.pt is intact") from error

    def _write(self, payload: dict[str, Any]) -> None:
        try:
            save_last(payload, self.last)
        except BaseException as e:  # raised in the trainer's thread by wait()
            self._error = e

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def is_milestone(self, epoch: int) -> bool:
        return epoch == self.epochs or epoch in self.milestones or \
            bool(self.every and epoch % self.every == 0)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> TrainState | None:
        """Resume from ``last.pt`` (model, optimizer, RNG); None when there is none."""
        if not self.last.exists():
            return None
        ckpt = read_checkpoint(self.last)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.last} is not a checkpoint of this toolkit (format "
                                  f"{ckpt.get('format')!r}); move it away to start over")
        check_compatible(ckpt["config"], self.config, self.last)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{self.last} does not fit the model: "
                                  f"{str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        log.info("resuming from %s: %d epochs done, step %d of the next", self.last,
                 ckpt["epoch"], ckpt["step_in_epoch"])
        return TrainState(ckpt["epoch"], ckpt["step_in_epoch"], ckpt.get("mlflow_run_id"))

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
             schedules: Mapping[str, Any]) -> Path:
        self.before_write()
        self.wait()
        payload = {
            "format": CHECKPOINT_FORMAT, "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch, "arch": self.config["model"]["arch"],
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": self.config, "schedules": dict(schedules),
            "data_seed": int(self.config["seed"]), "mlflow_run_id": state.mlflow_run_id,
            "rng": rng_state()}
        if not self.background:
            return save_last(payload, self.last)
        # Training goes on mutating the live tensors: the thread writes a copy of this instant.
        self._writer = threading.Thread(target=self._write, args=(cpu_snapshot(payload),),
                                        name="caco-checkpoint-writer")
        self._writer.start()
        return self.last

    def publish(self, epoch: int) -> Path:
        """``last.pt`` of a completed milestone epoch -> ``epoch_NNNN.pt``."""
        self.before_write()
        self.wait()
        return publish_milestone(self.last, epoch)

    def missed_milestone(self, state: TrainState) -> int | None:
        """A milestone whose ``last.pt`` was written but never published (a kill between the
        two): the epoch to publish now, else None."""
        epoch = state.epoch
        if epoch > 0 and state.step_in_epoch == 0 and self.is_milestone(epoch) and \
                not (self.dir / f"epoch_{epoch:04d}.pt").exists():
            return epoch
        return None


def weights_digest(source: str | os.PathLike | Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's model weights (names, dtypes, shapes, bytes; the optimizer,
    RNG and run id left out): equal for checkpoints that hold the same model, whichever run
    wrote them (what evaluation results are cached by). ``source``: a file or a checkpoint
    already read."""
    import hashlib

    ckpt = source if isinstance(source, Mapping) else read_checkpoint(source)
    state = ckpt.get("model") if "model" in ckpt else ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        where = "the checkpoint" if isinstance(source, Mapping) else str(source)
        raise CheckpointError(f"{where} holds no model weights ('model' or 'state_dict')")
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
