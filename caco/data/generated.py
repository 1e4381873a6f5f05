"""A generated ImageNet-layout JPEG folder made from real Fashion-MNIST images.

Tests and the data-loader benchmark need an ImageFolder tree of real JPEGs (decoding is the
work being measured) without any download: each item is a Fashion-MNIST image, upscaled,
tinted and placed on a smooth coloured background, written as ``<root>/<split>/<class>/*.jpg``
(train from the train split, val from the test split). Generation is deterministic and atomic:
the tree is built under a temporary name and renamed, and ``generated.json`` records how it was
made, so a second call with the same settings returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from caco.errors import ConfigError
from caco.fileio import publish_dir

log = logging.getLogger(__name__)

CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot")
_RECORD = "generated.json"


def _scene(item: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    grey = np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR),
                      dtype=np.float32) / 255.0
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    c0, c1 = rng.uniform(0.0, 0.6, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    background = c0 + (c1 - c0) * ramp
    alpha = grey[..., None]
    img = alpha * tint + (1 - alpha) * background
    return (img.clip(0, 1) * 255).astype(np.uint8)


def scenes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` generated colour images (n, size, size, 3) uint8, in memory: the first ``n``
    Fashion-MNIST train items as the folder's scenes."""
    from caco.data.fashion_mnist import load_arrays

    images, _ = load_arrays("train")
    rng = np.random.default_rng(seed)
    return np.stack([_scene(images[i], size, rng) for i in range(n)])


def ensure_generated_folder(root: str | os.PathLike, *, train_per_class: int = 100,
                            val_per_class: int = 20, size: int = 96, seed: int = 0,
                            quality: int = 90) -> Path:
    """Create (once) and return the generated ImageFolder tree at ``root``."""
    from PIL import Image

    from caco.data.fashion_mnist import load_arrays

    root = Path(root).expanduser().resolve()
    settings = {"train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
                "size": int(size), "seed": int(seed), "quality": int(quality)}
    record = root / _RECORD
    if record.exists():
        made = json.loads(record.read_text())
        if made != settings:
            raise ConfigError(
                f"{root} holds generated data made with {made}, not {settings}: choose another "
                "data.root or delete the folder")
        return root
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} exists and is not a generated data folder; choose another "
                          "data.root")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    log.info("generating JPEG folder %s (%s)", root, settings)
    for split, source, per_class in (("train", "train", train_per_class),
                                     ("val", "test", val_per_class)):
        images, labels = load_arrays(source)
        for c, name in enumerate(CLASSES):
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                pixels = _scene(images[i], size, rng)
                Image.fromarray(pixels).save(folder / f"{split}_{c}_{j:05d}.jpg", quality=quality)
    (tmp / _RECORD).write_text(json.dumps(settings))
    root.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(tmp, root)
    return root
