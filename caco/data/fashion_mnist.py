"""Real Fashion-MNIST from its idx files (Debian's ``dataset-fashion-mnist`` or torchvision's).

60k train / 10k test grey 28x28 images in 10 classes; images are returned as RGB PIL images
so the ImageNet-style augmentations apply unchanged.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download it "
    "with `python -c \"import torchvision; torchvision.datasets.FashionMNIST('data', "
    "download=True)\"` and set data.root=data/FashionMNIST/raw"
)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


CACHE_ROOT = Path.home() / ".cache" / "caco"


def _complete(folder: Path) -> bool:
    return all(_find(folder, stem) for pair in _FILES.values() for stem in pair)


def _download(cache: Path) -> Path | None:
    """torchvision's download, where neither data.root nor Debian's package is there."""
    import logging

    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    logging.getLogger(__name__).info("Fashion-MNIST not installed; downloading it to %s", cache)
    try:
        TorchvisionFashionMNIST(str(cache), train=True, download=True)
        TorchvisionFashionMNIST(str(cache), train=False, download=True)
    except Exception:  # no network, mirror down, ...: the caller's message says what to do
        return None
    raw = cache / "FashionMNIST" / "raw"
    return raw if _complete(raw) else None


def resolve_root(root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The folder holding the idx files: ``root`` (or its torchvision sub-folder), else
    Debian's package, else a torchvision download into ``~/.cache/caco``."""
    if root:
        for c in (Path(root), Path(root) / "FashionMNIST" / "raw"):
            if _complete(c):
                return c
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in {root}; {INSTALL_HINT}")
    cached = CACHE_ROOT / "FashionMNIST" / "raw"
    for c in (DEBIAN_ROOT, cached):
        if _complete(c):
            return c
    fetched = _download(CACHE_ROOT) if download else None
    if fetched is None:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {DEBIAN_ROOT} and could not be downloaded; "
            f"{INSTALL_HINT}")
    return fetched


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: {len(data) - offset} of {expected} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_arrays(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 28 x 28 uint8, labels N int64)`` of ``split`` ('train' or 'test')."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    directory = resolve_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find(directory, img_stem))
    labels = _read_idx(_find(directory, lbl_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels


class FashionMNIST(torch.utils.data.Dataset):
    """``(transform(RGB PIL image), label)``; ``indices`` selects a subset."""

    def __init__(self, split: str = "train", root=None, transform=None, indices=None) -> None:
        images, labels = load_arrays(split, root)
        if indices is not None:
            indices = np.asarray(indices)
            images, labels = images[indices], labels[indices]
        self.images, self.labels = images, labels
        self.transform = transform
        self.classes = CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")  # uint8 2-D: mode L
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])
