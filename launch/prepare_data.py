"""Convert a dataset to FFCV: ``python launch/prepare_data.py data=<name> [data.ffcv.<key>=...]``.

Writes ``<data.ffcv.dir>/{train,val}.beton`` for ``data.loader=ffcv``. Unreadable images are
named and skipped (``data.ffcv.strict=true`` stops instead); a rerun with the same inputs and
options does nothing; different options are refused unless ``data.ffcv.overwrite=true``.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    from caco.cli import prepare_data_main

    prepare_data_main(cfg)


if __name__ == "__main__":
    main()
