"""Where and how the same code runs: device, precision, memory format, compile, ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from caco.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    rank: int = 0
    world: int = 1
    prefetch: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def show_progress(setting: object = "auto") -> bool:
    """Progress bars: ``auto`` shows them on an interactive terminal only (never in job logs),
    ``true``/``false`` force them."""
    if setting in ("auto", None):
        import sys

        return sys.stderr.isatty()
    return bool(setting)


def _auto_bool(value, default: bool, key: str) -> bool:
    if value == "auto":
        return default
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r}: use auto, true or false")


def resolve_device(want: str) -> torch.device:
    """``auto`` (cuda if available), ``cpu`` or ``cuda[:i]``; refuses cuda without a GPU."""
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cpu":
        return torch.device("cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={want} but no CUDA GPU is visible; use device=cpu or auto")
        return torch.device(want)
    raise ConfigError(f"device={want!r}: use auto, cpu or cuda")


def tune_for(device: torch.device) -> None:
    """What a GPU process sets before its work (training and evaluation alike): with fixed
    shapes, cuDNN times its algorithms once and keeps the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_runtime(cfg: DictConfig) -> Runtime:
    """Turn the top-level switches (device, precision, channels_last, compile) into a Runtime."""
    device = resolve_device(str(cfg.device))
    precision = str(cfg.precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}: use auto, fp32 or bf16")
    channels_last = _auto_bool(cfg.channels_last, device.type == "cuda", "channels_last")
    compile_ = _auto_bool(cfg.compile, False, "compile")
    prefetch = _auto_bool(cfg.get("prefetch", "auto"), device.type == "cuda", "prefetch")
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    if int(cfg.get("threads", 0)) > 0 and device.type == "cpu":
        torch.set_num_threads(int(cfg.threads))
    tune_for(device)
    return Runtime(device, torch.bfloat16 if precision == "bf16" else None, channels_last,
                   compile_, rank, world, prefetch)
