"""Labelled image datasets by kind (``data.kind``): ImageFolder trees and Fashion-MNIST.

Each yields ``(transform(PIL RGB image), label)``. Missing roots, empty class folders and
unreadable images raise :class:`caco.errors.DataError` naming the path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from caco.data.sampling import subset_indices
from caco.errors import ConfigError, DataError

KINDS = ("imagefolder", "fashion_mnist")


def _read_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from None


def _imagefolder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (data.root must hold train/ and val/)")
    try:
        return ImageFolder(str(root), transform=transform, loader=_read_rgb)
    except FileNotFoundError as e:  # e.g. no class folder or no image in one
        raise DataError(f"data folder {root}: {e}") from None


def ensure_generated(data: DictConfig) -> None:
    """Create the generated JPEG folder ``data.root`` describes (``data.generate``), once."""
    from caco.data.generated import ensure_generated_folder

    if data.get("root") is None:
        raise ConfigError("data.root is not set: generated data needs a folder to be written to")
    g = data.generate
    ensure_generated_folder(str(data.root), train_per_class=g.train_per_class,
                            val_per_class=g.val_per_class, size=g.size, seed=g.get("seed", 0))


def check_available(data: DictConfig) -> None:
    """Cheap checks of what the training split needs, with the messages a run would give
    (no image is opened): the root is set and holds the split folder or idx files."""
    kind = data.kind
    if kind not in KINDS:
        raise ConfigError(f"data.kind={kind!r} is not supported; choose one of {list(KINDS)}")
    if kind == "fashion_mnist":
        if data.get("root"):
            from caco.data.fashion_mnist import resolve_root

            try:
                resolve_root(data.root, download=False)
            except FileNotFoundError as e:
                raise DataError(str(e)) from None
        return
    if data.get("generate"):
        if data.get("root") is None:
            raise ConfigError("data.root is not set: generated data needs a folder to be "
                              "written to")
        return
    if data.get("root") is None:
        raise DataError(_NO_ROOT)
    folder = Path(str(data.root)).expanduser() / str(data.get("train_dir", "train"))
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (data.root must hold train/ "
                        "and val/)")


_NO_ROOT = ("data.root is not set: point it at an ImageNet-style folder with train/ and val/ "
            "(python launch/pretrain.py data.root=/path/to/imagenet), or try the embedded "
            "demo: python launch/pretrain.py experiment=demo")


def split_folder(data: DictConfig, split: str) -> Path:
    """The folder of one split ('train' or 'val') of an ImageFolder dataset (generated first
    when ``data.generate`` says so)."""
    if data.get("generate"):
        ensure_generated(data)
    if data.get("root") is None:
        raise DataError(_NO_ROOT)
    return Path(str(data.root)).expanduser() / str(data.get(f"{split}_dir", split))


def labelled_split(data: DictConfig, split: str, transform=None, subset: int | None = None):
    """The ``split`` ('train' or 'val') of the dataset described by the ``data`` config."""
    kind = data.kind
    if kind not in KINDS:
        raise ConfigError(f"data.kind={kind!r} is not supported; choose one of {list(KINDS)}")
    if kind == "fashion_mnist":
        from caco.data.fashion_mnist import FashionMNIST

        try:
            full = FashionMNIST("train" if split == "train" else "test", root=data.root)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        idx = subset_indices(len(full), subset)
        if idx is not None:
            full.images, full.labels = full.images[idx], full.labels[idx]
        full.transform = transform
        return full

    ds = _imagefolder(split_folder(data, split), transform)
    idx = subset_indices(len(ds), subset)
    return torch.utils.data.Subset(ds, idx.tolist()) if idx is not None else ds

