"""Dataset -> FFCV ``.beton`` conversion (``python launch/prepare_data.py data=<name>``).

Each split becomes ``<data.ffcv.dir>/<split>.beton`` with two fields, ``image``
(``RGBImageField``) and ``label`` (``IntField``), plus ``<split>.beton.json``: where the
samples came from (a fingerprint of the inputs), the options, the classes and the files skipped.

- Unreadable images are found by decoding every file before writing (FFCV's writer processes
  hang on an exception): each is logged by path, then skipped (default, with a count) or, with
  ``strict``, the conversion stops and writes nothing.
- The file is written under a temporary name and renamed when complete, so an interrupted
  conversion never leaves a valid-looking ``.beton``.
- Same inputs and options as the existing record: nothing to do. Different ones: refused
  unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from caco.errors import ConfigError, DataError
from caco.fileio import atomic_write_text

log = logging.getLogger(__name__)

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RECORD_FORMAT = 1


@dataclass(frozen=True)
class ConversionOptions:
    max_resolution: int | None = 256
    jpeg_quality: int = 90
    write_mode: str = "smart"
    compress_probability: float = 0.5
    num_workers: int = 2
    subset_per_class: int | None = None
    strict: bool = False
    overwrite: bool = False

    def record(self) -> dict:
        """The options that change the output (not how it is produced)."""
        d = asdict(self)
        for k in ("num_workers", "strict", "overwrite"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    samples: int
    skipped: tuple[str, ...]
    written: bool  # False: an up-to-date file was already there


def options_from_config(ffcv: DictConfig) -> ConversionOptions:
    opts = ConversionOptions(
        max_resolution=ffcv.get("max_resolution"),
        jpeg_quality=int(ffcv.get("jpeg_quality", 90)),
        write_mode=str(ffcv.get("write_mode", "smart")),
        compress_probability=float(ffcv.get("compress_probability", 0.5)),
        num_workers=int(ffcv.get("num_workers", 2)),
        subset_per_class=ffcv.get("subset_per_class"),
        strict=bool(ffcv.get("strict", False)),
        overwrite=bool(ffcv.get("overwrite", False)),
    )
    if opts.write_mode not in WRITE_MODES:
        raise ConfigError(f"data.ffcv.write_mode={opts.write_mode!r}: use one of "
                          f"{list(WRITE_MODES)}")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ConfigError(f"data.ffcv.jpeg_quality={opts.jpeg_quality}: use 1..100")
    if opts.max_resolution is not None and int(opts.max_resolution) < 8:
        raise ConfigError(f"data.ffcv.max_resolution={opts.max_resolution}: use >= 8 or null")
    if opts.subset_per_class is not None and int(opts.subset_per_class) < 1:
        raise ConfigError(f"data.ffcv.subset_per_class={opts.subset_per_class}: use >= 1 or null")
    return opts


def beton_path(data: DictConfig, split: str) -> Path:
    """Where the ``split`` ('train' or 'val') .beton of ``data`` lives."""
    folder = data.get("ffcv", {}).get("dir") if data.get("ffcv") else None
    if not folder:
        raise ConfigError(f"data.ffcv.dir is not set for data={data.get('name')}: set it to the "
                          "folder prepare_data.py writes the .beton files to")
    return Path(str(folder)).expanduser().resolve() / f"{split}.beton"


# ------------------------------------------------------------------ sources
class _Source:
    """Indexable ``(uint8 HWC array, label)`` samples plus a fingerprint of the inputs."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class _FolderSource(_Source):
    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist: set data.root to a folder "
                            "holding train/ and val/ with one sub-folder per class")
        self.folder = folder
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"data folder {folder} has no class sub-folders "
                            "(expected <root>/<split>/<class>/<image>)")
        paths, labels = [], []
        for c, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).iterdir()
                           if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise DataError(f"class folder {folder / name} holds no images "
                                f"({', '.join(IMG_EXTENSIONS)}); add images or remove it")
            paths += files
            labels += [c] * len(files)
        self.paths, self.labels = paths, np.asarray(labels, dtype=np.int64)

    def subset(self, keep: np.ndarray) -> None:
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p.relative_to(self.folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return np.asarray(img.convert("RGB")), int(self.labels[i])


class _ArraySource(_Source):
    """Fashion-MNIST's idx arrays (grey, replicated to RGB)."""

    def __init__(self, split: str, root) -> None:
        from caco.data.fashion_mnist import CLASSES, load_arrays, resolve_root

        try:
            self.files_root = resolve_root(root)
            self.images, labels = load_arrays("train" if split == "train" else "test", root)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(CLASSES)
        self.split = split

    def subset(self, keep: np.ndarray) -> None:
        self.images, self.labels = self.images[keep], self.labels[keep]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.split.encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()

    def describe(self, i: int) -> str:
        return f"{self.files_root} [{self.split} #{i}]"

    def __getitem__(self, i: int):
        return np.repeat(self.images[i][..., None], 3, axis=2), int(self.labels[i])


def _source(data: DictConfig, split: str) -> _Source:
    if data.kind == "fashion_mnist":
        return _ArraySource(split, data.get("root"))
    if data.kind != "imagefolder":
        raise ConfigError(f"data.kind={data.kind!r} cannot be converted; use imagefolder or "
                          "fashion_mnist")
    from caco.data.sources import split_folder

    folder = split_folder(data, split)
    if not folder.parent.is_dir():
        raise DataError(f"data.root={folder.parent} does not exist")
    return _FolderSource(folder)


def _first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    keep = [np.flatnonzero(labels == c)[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _check_one(args: tuple[int, str]) -> tuple[int, str | None]:
    from PIL import Image

    i, path = args
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
        return i, None
    except Exception as e:  # any decoder failure means the file cannot be used
        return i, f"{type(e).__name__}: {e}"


def _default_signals() -> None:
    """In a forked checker: the parent's Python handlers (a trainer's SIGTERM guard) would
    keep the pool's terminate() from ending it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def find_unreadable(paths: Sequence[Path], workers: int, progress: bool = False
                    ) -> dict[int, str]:
    """Decode every image; ``{index: reason}`` for those that fail."""
    from multiprocessing import get_context

    bad: dict[int, str] = {}
    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="checking images", leave=False)
    with get_context("fork").Pool(max(1, workers), initializer=_default_signals) as pool:
        for i, reason in pool.imap_unordered(_check_one, jobs, chunksize=64):
            if reason is not None:
                bad[i] = reason
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return bad


class _Kept:
    """The readable samples, in order, as FFCV's writer indexes them."""

    def __init__(self, source: _Source, keep: np.ndarray) -> None:
        self.source, self.keep = source, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int):
        return self.source[int(self.keep[i])]


# ------------------------------------------------------------------ conversion
def _read_record(path: Path) -> dict | None:
    record = path.with_name(path.name + ".json")
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_split(data: DictConfig, split: str, opts: ConversionOptions, *,
                  progress: bool = False) -> ConversionResult:
    """Write ``<data.ffcv.dir>/<split>.beton`` (see the module docstring)."""
    out = beton_path(data, split)
    source = _source(data, split)
    if opts.subset_per_class:
        source.subset(_first_per_class(source.labels, int(opts.subset_per_class)))
    wanted = {"format": RECORD_FORMAT, "split": split, "classes": source.classes,
              "fingerprint": source.fingerprint(), "options": opts.record()}

    if out.exists() and not opts.overwrite:
        have = _read_record(out)
        if have is None:
            raise ConfigError(f"{out} exists without a record of how it was made "
                              f"({out.name}.json); pass data.ffcv.overwrite=true to replace it")
        same = {k: have.get(k) for k in wanted} == wanted
        if same:
            log.info("%s is up to date (%d samples); nothing to do", out, have["samples"])
            return ConversionResult(out, int(have["samples"]), tuple(have.get("skipped", [])),
                                     written=False)
        differ = sorted(k for k in wanted if have.get(k) != wanted[k])
        if "options" in differ:
            differ += [f"options.{k}" for k in wanted["options"]
                       if have["options"].get(k) != wanted["options"][k]]
        raise ConfigError(f"{out} was made from other inputs or options ({', '.join(differ)}); "
                          "pass data.ffcv.overwrite=true to replace it, or set data.ffcv.dir "
                          "to another folder")

    bad: dict[int, str] = {}
    if isinstance(source, _FolderSource):
        bad = find_unreadable(source.paths, opts.num_workers, progress)
    for i in sorted(bad):
        log.warning("unreadable image %s (%s)", source.describe(i), bad[i])
    skipped = tuple(source.describe(i) for i in sorted(bad))
    if bad and opts.strict:
        raise DataError(f"{len(bad)} unreadable image(s) in the {split} split, first "
                        f"{skipped[0]}; nothing written (data.ffcv.strict=true). Remove or "
                        "replace them, or rerun without strict to skip them")
    keep = np.asarray([i for i in range(len(source)) if i not in bad], dtype=np.int64)
    if len(keep) == 0:
        raise DataError(f"the {split} split has no readable images; nothing written")

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        log.info("removing %s left by an interrupted conversion", stale)
        stale.unlink()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    image = RGBImageField(write_mode=opts.write_mode,
                          max_resolution=None if opts.max_resolution is None
                          else int(opts.max_resolution),
                          jpeg_quality=opts.jpeg_quality,
                          compress_probability=opts.compress_probability)
    log.info("writing %s: %d images, %d classes (%s)", out, len(keep), len(source.classes),
             opts.record())
    import ffcv.writer

    bar = ffcv.writer.tqdm
    # FFCV's writer always draws a bar; show it on terminals only, like ours.
    ffcv.writer.tqdm = partial(bar, disable=not progress, desc=f"writing {out.name}")
    try:
        writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                               num_workers=max(1, opts.num_workers))
        writer.from_indexed_dataset(_Kept(source, keep), chunksize=64)
        _fsync(tmp)
        os.replace(tmp, out)
    finally:
        ffcv.writer.tqdm = bar
        if tmp.exists():
            tmp.unlink()
    record = {**wanted, "samples": len(keep), "skipped": list(skipped)}
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=1))
    if skipped:
        log.warning("%s: skipped %d unreadable image(s) (listed in %s.json)", out, len(skipped),
                    out.name)
    log.info("wrote %s (%d samples)", out, len(keep))
    return ConversionResult(out, len(keep), skipped, written=True)
