"""Datasets and loaders: ``sources`` (datasets by kind, split folders), ``sampling`` (order and
seeds), ``pretrain`` (loader factories, torchvision path), ``ffcv_loader`` and ``beton`` (the
FFCV path), ``fashion_mnist``, ``generated``, ``detection`` (detection sets)."""
