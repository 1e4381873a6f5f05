"""Detection data: COCO-format and VOC-format readers, and a generated COCO-format set.

The generated set composes real Fashion-MNIST items (train scenes from the train split, val
scenes from the test split) on coloured canvases, 1-``max_items`` items each at random sizes
and places, with their boxes (the item's visible extent) and class labels: a detection task
small enough to train on a CPU in minutes, with ground truth known exactly. It is written once,
atomically, as ``<root>/<split>/images/*.png`` + ``<root>/<split>/annotations.json``.

Every reader yields ``(uint8 CHW image tensor, {"boxes": float (N, 4) xyxy, "labels": int64
(N,) in 1..C, "image_id": int})`` and exposes ``coco`` (a pycocotools COCO of the split's
ground truth) and ``categories``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caco.errors import ConfigError, DataError
from caco.fileio import publish_dir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ generated scenes
def _scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, canvas: int,
           max_items: int, size_range: tuple[int, int]):
    from PIL import Image

    c0, c1 = rng.uniform(0, 0.5, size=(2, 3))
    ramp = np.linspace(0, 1, canvas)[:, None, None]
    img = c0 + (c1 - c0) * ramp * np.ones((canvas, canvas, 3))
    boxes, cats = [], []
    for _ in range(int(rng.integers(1, max_items + 1))):
        i = int(rng.integers(len(images)))
        size = int(rng.integers(size_range[0], size_range[1] + 1))
        item = np.asarray(Image.fromarray(images[i]).resize((size, size), Image.BILINEAR),
                          dtype=np.float64) / 255
        x0, y0 = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        ys, xs = np.nonzero(item > 0.1)
        if len(xs) == 0:
            continue
        tint = rng.uniform(0.4, 1.0, size=3)
        alpha = item[..., None]
        region = img[y0:y0 + size, x0:x0 + size]
        img[y0:y0 + size, x0:x0 + size] = alpha * tint + (1 - alpha) * region
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        cats.append(int(labels[i]) + 1)
    return (img.clip(0, 1) * 255).astype(np.uint8), boxes, cats


def default_scenes_root(output_root: str | os.PathLike, data) -> str:
    """Where a generated set with these settings lives under ``output_root`` (shared)."""
    return (f"{output_root}/data/det_scenes_{data['canvas']}px_{data['train']}_{data['val']}"
            f"_{data['max_items']}_s{data.get('seed', 0)}")


def ensure_generated_scenes(root: str | os.PathLike, *, train: int = 2000, val: int = 300,
                            canvas: int = 128, max_items: int = 4,
                            size_range: tuple[int, int] = (20, 48), seed: int = 0) -> Path:
    """Create (once) and return the generated COCO-format detection set at ``root``."""
    from PIL import Image

    from caco.data.fashion_mnist import CLASSES, load_arrays

    root = Path(root).expanduser().resolve()
    settings = {"train": train, "val": val, "canvas": canvas, "max_items": max_items,
                "size_range": list(size_range), "seed": seed}
    record = root / "generated.json"
    if record.exists():
        made = json.loads(record.read_text())
        if made != settings:
            raise ConfigError(f"{root} holds scenes made with {made}, not {settings}: choose "
                              "another eval.detection.data.root or delete the folder")
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    log.info("generating detection scenes in %s (%s)", root, settings)
    for split, source, n in (("train", "train", train), ("val", "test", val)):
        images, labels = load_arrays(source)
        (tmp / split / "images").mkdir(parents=True)
        coco: dict[str, Any] = {"images": [], "annotations": [],
                                "categories": [{"id": i + 1, "name": c}
                                               for i, c in enumerate(CLASSES)]}
        for k in range(n):
            pixels, boxes, cats = _scene(rng, images, labels, canvas, max_items, size_range)
            name = f"{k:06d}.png"
            Image.fromarray(pixels).save(tmp / split / "images" / name)
            coco["images"].append({"id": k + 1, "file_name": name, "width": canvas,
                                   "height": canvas})
            for b, c in zip(boxes, cats):
                x0, y0, x1, y1 = (float(v) for v in b)
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": k + 1, "category_id": c,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0})
        (tmp / split / "annotations.json").write_text(json.dumps(coco))
    (tmp / "generated.json").write_text(json.dumps(settings))
    root.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(tmp, root)
    return root


# ------------------------------------------------------------------ readers
def _quiet_coco(dataset: dict):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """``<folder>/annotations.json`` (COCO) + ``<folder>/images/``."""

    def __init__(self, folder: str | os.PathLike, limit: int | None = None,
                 data: dict | None = None) -> None:
        self.folder = Path(folder)
        ann = self.folder / "annotations.json"
        if data is None:
            if not ann.exists():
                raise DataError(f"detection split {self.folder}: no annotations.json (COCO "
                                "format expected: <split>/annotations.json and <split>/images/)")
            try:
                data = json.loads(ann.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{ann} is not valid JSON ({e})") from None
        images = sorted(data.get("images", []), key=lambda i: i["id"])[:limit or None]
        if not images:
            raise DataError(f"detection split {self.folder} has no images")
        keep = {i["id"] for i in images}
        data = {**data, "images": images,
                "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep]}
        self.images = images
        self.coco = _quiet_coco(data)
        self.categories = sorted(c["id"] for c in data["categories"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        info = self.images[i]
        path = self.folder / "images" / info["file_name"]
        try:
            with Image.open(path) as img:
                pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy())
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        anns = self.coco.imgToAnns.get(info["id"], [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return pixels.permute(2, 0, 1), {"boxes": boxes, "labels": labels,
                                         "image_id": info["id"]}


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


def voc_to_coco(voc_roots: list[str | os.PathLike], image_set: str) -> dict:
    """VOC ``Annotations/*.xml`` of ``ImageSets/Main/<image_set>.txt`` -> a COCO dict
    (``difficult`` boxes marked iscrowd, as the COCO-style VOC evaluations do)."""
    import xml.etree.ElementTree as ET

    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i + 1, "name": c}
                                           for i, c in enumerate(VOC_CLASSES)]}
    for root in map(Path, voc_roots):
        ids_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not ids_file.exists():
            raise DataError(f"VOC split file {ids_file} not found")
        for name in ids_file.read_text().split():
            tree = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
            size = tree.find("size")
            image_id = len(coco["images"]) + 1
            coco["images"].append({
                "id": image_id, "file_name": str(root / "JPEGImages" / f"{name}.jpg"),
                "width": int(size.findtext("width")), "height": int(size.findtext("height"))})
            for obj in tree.iter("object"):
                bb = obj.find("bndbox")
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id,
                    "category_id": VOC_CLASSES.index(obj.findtext("name").strip()) + 1,
                    "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                    "area": (x1 - x0 + 1) * (y1 - y0 + 1),
                    "iscrowd": int(obj.findtext("difficult") or 0)})
    return coco
