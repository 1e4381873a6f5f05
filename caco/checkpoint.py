"""Reading checkpoints safely, including the authors' released layout (caco.md §11).

The reference saves ``{'epoch', 'arch', 'state_dict', 'optimizer', 'Memory_Bank'}`` where
``state_dict`` comes from a DDP-wrapped model (``module.encoder_q.*``, ``module.encoder_k.*``
with torchvision ResNet names and the projector at ``fc.0/1/3/4/6``) and ``Memory_Bank``
holds ``W`` (dim x K) and ``v`` (its momentum). Our :class:`caco.model.CaCo` uses the same
names, so loading is a renaming-free, fully checked copy.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from caco.errors import CacoError
from caco.fileio import atomic_write, fsync_dir
from caco.model import CaCo

PROGRESS_FILE = "progress.json"


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
    import json

    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        pass
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
        m = ckpt["config"]["model"]
        model = CaCo(m["arch"], dim=m["dim"], mlp_dim=m["mlp_dim"], bank_size=m["bank_size"],
                     moco_t=m["moco_t"], mem_t=m["mem_t"], mem_momentum=m["mem_momentum"],
                     small_stem=m["small_stem"], width=m["width"], blocks=m["blocks"])
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
    model = CaCo(arch, dim=dim, mlp_dim=mlp_dim, bank_size=bank_size, small_stem=small_stem,
                 width=width, blocks=blocks)
    info = load_reference_checkpoint(model, ckpt, require_bank=bank is not None)
    return model, {**info, "format": "reference"}
