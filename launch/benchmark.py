"""Benchmarks that print numbers: ``python launch/benchmark.py bench=step``.

The last line printed is a JSON object with the measurements (and ``ratio`` against the
baseline measured in the same run). Choices live in ``configs/bench/``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from caco.errors import CacoError

RUNNERS = {
    "step": ("caco.bench.step", "StepBenchConfig"),
    "slurm": ("caco.bench.slurm", "SlurmBenchConfig"),
    "dataloader": ("caco.bench.dataloader", "DataloaderBenchConfig"),
    "knn": ("caco.bench.knn", "KnnBenchConfig"),
    "gpu": ("caco.bench.gpu", "GpuBenchConfig"),
    "augment": ("caco.bench.augment", "AugmentBenchConfig"),
}


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    name = cfg.bench.name
    module_name, config_class = RUNNERS[name]
    module = importlib.import_module(module_name)
    with open_dict(cfg):
        cfg.output_root = os.path.abspath(str(cfg.output_root))
    settings = OmegaConf.to_container(cfg.bench, resolve=True)
    settings.pop("name")
    try:
        result = module.run(getattr(module, config_class)(**settings))
    except CacoError as e:  # a benchmark this machine cannot run (bench=gpu without CUDA)
        logging.getLogger("benchmark").error("%s", e)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
