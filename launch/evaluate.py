"""Evaluate a checkpoint: ``python launch/evaluate.py eval=<knn|linear> checkpoint=<path>``.

Works on this toolkit's checkpoints (their pretraining data is the default) and on the
authors' released CaCo checkpoints (pass ``data=imagenet data.root=...``); ``-m
eval=knn,linear`` runs several. Metrics are logged and written to ``metrics.json``.

Past runs: ``python launch/evaluate.py eval=<name> runs=<run or sweep dir>
[checkpoints=all|milestones|last] [cluster=slurm] [--force]`` evaluates their checkpoints as
nodes of their DAGs (cached; see configs/evaluate.yaml).
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from evals.cli import evaluate_main

    return evaluate_main(cfg)


def _quote_paths(argv: list[str]) -> list[str]:
    """Sweep-point directories are named by their overrides (``epochs=2,seed=0``), which
    Hydra's grammar would read as a sweep: path values are passed quoted."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in ("runs", "checkpoint") and value[:1] not in ("'", '"') and \
                any(c in value for c in "=,[]{}()'\" "):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


if __name__ == "__main__":
    if "--force" in sys.argv:  # the backfill's "recompute", as a flag
        sys.argv = [a for a in sys.argv if a != "--force"] + ["force=true"]
    sys.argv = _quote_paths(sys.argv)
    main()
