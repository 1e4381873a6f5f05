"""``launch/evaluate.py``: run one evaluator on one checkpoint, by hand or in a sweep."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from caco.cli import user_message
from caco.errors import CacoError

log = logging.getLogger("evals")

EVALUATORS = {"knn": "evals.knn", "linear": "evals.linear", "detection": "evals.detection"}


def evaluate_main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    name = hc.runtime.choices["eval"]
    module = importlib.import_module(EVALUATORS[name])
    try:
        metrics = module.evaluate(cfg.checkpoint, cfg)
    except CacoError as e:
        log.error("%s", user_message(e))
        sys.exit(2)
    out = Path(hc.runtime.output_dir) / "metrics.json"
    out.write_text(json.dumps({"evaluator": name, "checkpoint": str(cfg.checkpoint),
                               **metrics}, indent=2))
    log.info("%s on %s: %s", name, cfg.checkpoint,
             ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics.items()))
    log.info("metrics written to %s", out)
    return metrics
