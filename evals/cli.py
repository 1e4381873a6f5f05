"""``launch/evaluate.py``: run one evaluator on one checkpoint, by hand or in a sweep."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from caco.cli import user_message
from caco.errors import CacoError

log = logging.getLogger("evals")

def evaluate_main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    from caco.evaluators import get, load

    name = hc.runtime.choices["eval"]
    if cfg.get("runs"):
        from caco.dag.backfill import backfill

        try:
            code = backfill(cfg, name, list(hc.overrides.task))
        except CacoError as e:
            log.error("%s", user_message(e))
            sys.exit(2)
        if code:
            sys.exit(code)
        return {}
    if not cfg.get("checkpoint"):
        log.error("pass checkpoint=<path> (one checkpoint) or runs=<run or sweep dir> (the "
                  "checkpoints of past runs)")
        sys.exit(2)
    try:
        metrics = load(get(cfg, name)).evaluate(cfg.checkpoint, cfg)
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
