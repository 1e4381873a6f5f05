"""The evaluator registry, which is data: every ``configs/eval/<name>.yaml`` declares

    <name>:
      module: evals.<name>        # a module with evaluate(checkpoint, cfg) -> metrics
      headline: [metric, ...]     # also logged on the pretraining run as eval/<metric>
      <setting>: <default> ...    # its settings (the run's eval.<name>.*)

and Hydra composes all of them into the run config (``eval.<name>``). The DAG, the evaluate
CLI and ``compare.py`` read names, modules and headline metrics from there; an evaluator's
module is imported only by the process that runs it. Adding an evaluator is one module plus
one config file. ``report`` is not an evaluator: it is the DAG's own roll-up
(:mod:`caco.dag.report`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from caco.errors import ConfigError

REGISTRY_KEYS = ("module", "headline")


@dataclass(frozen=True)
class Evaluator:
    name: str
    module: str
    headline: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


def _entries(cfg: DictConfig) -> dict[str, Any]:
    evals = cfg.get("eval")
    if evals is None:
        return {}
    return {name: node for name, node in evals.items()
            if OmegaConf.is_dict(node) and node.get("module")}


def registry(cfg: DictConfig) -> dict[str, Evaluator]:
    """Every evaluator of ``cfg``. A run made before the registry existed gets today's
    registry, composed by Hydra, with its own ``eval.<name>`` settings on top."""
    own = cfg.get("eval") or {}
    entries = _entries(cfg)
    if not entries or len(entries) < len([n for n in own.values() if OmegaConf.is_dict(n)]):
        entries = dict(_entries(today_config()))
        for name, node in own.items():  # the run's own settings still win
            if name in entries and OmegaConf.is_dict(node):
                entries[name] = OmegaConf.merge(entries[name], node)
    out = {}
    for name, node in entries.items():
        data = OmegaConf.to_container(node, resolve=True)
        out[name] = Evaluator(name, str(data["module"]), tuple(data.get("headline") or ()),
                              {k: v for k, v in data.items() if k not in REGISTRY_KEYS})
    return out


_DEFAULTS: DictConfig | None = None


def today_config() -> DictConfig:
    """Today's composed pretraining config (for runs made before the registry)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from caco.config import compose

        _DEFAULTS = compose("pretrain")
    return _DEFAULTS


def get(cfg: DictConfig, name: str) -> Evaluator:
    found = registry(cfg)
    if name not in found:
        raise ConfigError(f"no evaluator {name!r}: the registry (configs/eval/) has "
                          f"{sorted(found)}")
    return found[name]


def registered_module(name: str) -> str:
    """The module today's registry (configs/eval/) gives evaluator ``name``."""
    return get(today_config(), name).module


def load(evaluator: Evaluator | str) -> ModuleType:
    """Import an evaluator's module (only where it runs) and check it can evaluate."""
    path = evaluator.module if isinstance(evaluator, Evaluator) else evaluator
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ConfigError(f"evaluator module {path!r} cannot be imported ({e}); check the "
                          "`module:` of its configs/eval/<name>.yaml") from None
    if not callable(getattr(module, "evaluate", None)):
        raise ConfigError(f"evaluator module {path!r} has no evaluate(checkpoint, cfg)")
    return module
