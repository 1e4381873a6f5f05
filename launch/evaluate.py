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


if __name__ == "__main__":
    if "--force" in sys.argv:  # the backfill's "recompute", as a flag
        sys.argv = [a for a in sys.argv if a != "--force"] + ["force=true"]
    main()
