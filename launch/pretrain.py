"""CaCo pretraining: ``python launch/pretrain.py [experiment=<recipe>] [key=value ...]``.

The bare command runs the paper's recipe (ResNet-50, ImageNet-1k at ``data.root``, global
batch 1024, 200 epochs); ``experiment=demo`` trains on the embedded Fashion-MNIST on CPU.
``--help`` lists the config groups; ``--cfg job`` prints the composed config.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> dict:
    from caco.cli import pretrain_main

    return pretrain_main(cfg)


if __name__ == "__main__":
    main()
