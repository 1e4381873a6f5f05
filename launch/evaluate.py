"""Evaluate a checkpoint: ``python launch/evaluate.py eval=<knn|linear> checkpoint=<path>``.

Works on this toolkit's checkpoints (their pretraining data is the default) and on the
authors' released CaCo checkpoints (pass ``data=imagenet data.root=...``); ``-m
eval=knn,linear`` runs several. Metrics are logged and written to ``metrics.json``.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from evals.cli import evaluate_main

    return evaluate_main(cfg)


if __name__ == "__main__":
    main()
