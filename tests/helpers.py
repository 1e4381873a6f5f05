"""Helpers shared by the engine and launcher tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_pretrain(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


def run_cli(script: str, *args: str, timeout: float = 600, cwd: Path | None = None,
            env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env=env, **popen)


def model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def clean_failure(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A refusal as users must see it: the exit code, every needle, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out
    return out
