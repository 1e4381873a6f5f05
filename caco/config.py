"""Where the configs live, and Hydra's composition of them for library code.

Entry points compose through ``@hydra.main``; library code that needs a composed default
(e.g. the evaluator registry of a run made before an evaluator existed) asks here, so Hydra
composes everything and nothing reads a YAML file by path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def project_root() -> Path:
    """The checkout: ``caco/``, ``configs/``, ``launch/`` side by side."""
    return Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The project's ``configs/``."""
    return project_root() / "configs"


def compose(name: str = "pretrain", overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/<name>.yaml`` composed by Hydra with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose beside it
        return hydra_compose(name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


def plain(value: Any) -> dict[str, Any]:
    """A config section (OmegaConf node, mapping or None) as a plain, resolved dict."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value or {})
