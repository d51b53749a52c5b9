"""CIFAR-10 as in-memory uint8 arrays, from tensorflow-datasets or an image folder.

Both sources return a ``Dataset``: ``train_images`` (N, H, W, 3) uint8,
``train_labels`` (N,) int32, the same for test, and ``class_names``. Decoded
arrays are cached as ``.npz`` (loaded without pickle) so the second run starts
in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np

from cifar_jax.errors import UserError
from cifar_jax.runtime import default_cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "test")


class DataError(UserError):
    """Raised for a missing, empty or malformed data source (a one-line message)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled train/test split held in host memory."""

    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, H, W, 3) uint8
    test_labels: np.ndarray  # (M,) int32
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the training images in [0, 1]; two (3,) float32 arrays."""
        # Accumulated in float64 by chunks so 50k images never need a float copy at once.
        total = np.zeros(3)
        total_sq = np.zeros(3)
        for chunk in np.array_split(self.train_images, max(1, len(self.train_images) // 5000)):
            x = chunk.reshape(-1, 3).astype(np.float64) / 255.0
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        count = self.train_images.shape[0] * self.train_images.shape[1] * self.train_images.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
        return mean.astype(np.float32), std.astype(np.float32)


def load_dataset(data_config) -> Dataset:
    """Loads the dataset a config's ``data`` block names.

    Fields used: ``source`` ("folder" or "tfds"), ``path`` (folder tree or
    .tar.gz; for tfds the data_dir, optional), ``name`` (tfds name),
    ``image_size``, ``cache`` (bool), ``max_train`` / ``max_test`` (0 = all;
    a class-balanced prefix otherwise).
    """
    if data_config.source == "folder":
        if not data_config.path:
            raise DataError("data.path is empty: give an image-folder tree or a .tar.gz of one")
        ds = load_folder(data_config.path, image_size=data_config.image_size, cache=data_config.cache)
    elif data_config.source == "tfds":
        ds = load_tfds(data_config.name, data_dir=data_config.path or None)
    else:
        raise DataError(f"unknown data.source {data_config.source!r}; choose 'folder' or 'tfds'")
    return subsample(ds, data_config.max_train, data_config.max_test)


def subsample(ds: Dataset, max_train: int = 0, max_test: int = 0) -> Dataset:
    """Keeps at most ``max_train``/``max_test`` images, interleaving classes so every class appears."""

    def take(images, labels, limit):
        if not limit or limit >= len(labels):
            return images, labels
        # Rank each image within its class and keep the lowest ranks: a balanced, deterministic subset.
        order = np.argsort(labels, kind="stable")
        rank = np.empty_like(order)
        starts = np.searchsorted(labels[order], labels[order])
        rank[order] = np.arange(len(order)) - starts
        keep = np.sort(np.lexsort((labels, rank))[:limit])
        return images[keep], labels[keep]

    tr_x, tr_y = take(ds.train_images, ds.train_labels, max_train)
    te_x, te_y = take(ds.test_images, ds.test_labels, max_test)
    return Dataset(tr_x, tr_y, te_x, te_y, ds.class_names)


# --------------------------------------------------------------------------- folder


def load_folder(path: str | os.PathLike, image_size: int = 32, cache: bool = True) -> Dataset:
    """Reads ``train/<class>/*`` and ``test/<class>/*`` from a directory or a .tar(.gz) of one.

    Class names are the sorted folder names of ``train``; ``test`` must use
    the same names. Images of any size or mode are converted to RGB and, if
    needed, resized to ``image_size`` (bilinear). Returns a Dataset.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    cache_file = None
    if cache:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{image_size}|v1"
        cache_file = default_cache_dir() / f"folder-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if cache_file.exists():
            try:
                return _load_npz(cache_file)
            except Exception:  # A damaged cache is rebuilt, never trusted.
                pass
    if path.is_dir():
        entries = _dir_entries(path)
    elif tarfile.is_tarfile(path):
        entries = _tar_entries(path)
    else:
        raise DataError(f"data path {str(path)!r} is neither a directory nor a tar archive")
    ds = _decode_entries(entries, str(path), image_size)
    if cache_file is not None:
        _save_npz(cache_file, ds)
    return ds


def _dir_entries(root: Path) -> Iterable[tuple[str, str, str, bytes]]:
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    yield split, class_dir.name, f.name, f.read_bytes()


def _tar_entries(archive: Path) -> Iterable[tuple[str, str, str, bytes]]:
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            # Accept both "train/cls/x.jpg" and "<top>/train/cls/x.jpg".
            for i in range(len(parts) - 2):
                if parts[i] in SPLITS and len(parts) - i == 3:
                    yield parts[i], parts[i + 1], parts[i + 2], tar.extractfile(member).read()
                    break


def _decode_entries(entries, where: str, image_size: int) -> Dataset:
    from PIL import Image

    per_split: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
    for split, class_name, file_name, blob in entries:
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                per_split[split].append((class_name, file_name, np.asarray(im, np.uint8)))
        except Exception as e:
            raise DataError(f"cannot decode {split}/{class_name}/{file_name} in {where}: {e}") from None
    for split in SPLITS:
        if not per_split[split]:
            raise DataError(f"no images under {split}/<class>/ in {where}")
    class_names = tuple(sorted({c for c, _, _ in per_split["train"]}))
    unknown = sorted({c for c, _, _ in per_split["test"]} - set(class_names))
    if unknown:
        raise DataError(f"test classes {unknown} have no train folder in {where}")
    arrays = {}
    for split in SPLITS:
        items = sorted(per_split[split], key=lambda t: (t[0], t[1]))  # Stable order: class, file name.
        arrays[split] = (
            np.stack([im for _, _, im in items]),
            np.array([class_names.index(c) for c, _, _ in items], np.int32),
        )
    return Dataset(*arrays["train"], *arrays["test"], class_names)


def _save_npz(file: Path, ds: Dataset) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        train_images=ds.train_images,
        train_labels=ds.train_labels,
        test_images=ds.test_images,
        test_labels=ds.test_labels,
        class_names=np.array(ds.class_names, dtype=np.str_),
    )
    os.replace(tmp, file)  # Atomic: a concurrent or killed run never sees half a cache file.


def _load_npz(file: Path) -> Dataset:
    with np.load(file, allow_pickle=False) as z:
        return Dataset(
            z["train_images"], z["train_labels"], z["test_images"], z["test_labels"], tuple(str(c) for c in z["class_names"])
        )


# --------------------------------------------------------------------------- tfds


def load_tfds(name: str = "cifar10", data_dir: str | None = None) -> Dataset:
    """Reads a prepared tensorflow-datasets copy through ``tfds.data_source`` (no TensorFlow needed).

    Preparing the copy the first time (``tfds build cifar10``) needs
    TensorFlow: ``pip install 'cifar_jax[tfds]'``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        sources = {split: tfds.data_source(name, split=split, data_dir=data_dir) for split in SPLITS}
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open tfds dataset {name!r} (prepare it once with 'tfds build {name}'): {first_line}") from None
    arrays = {}
    for split, source in sources.items():
        records = [source[i] for i in range(len(source))]
        if not records:
            raise DataError(f"tfds dataset {name!r} has an empty {split} split")
        arrays[split] = (
            np.stack([np.asarray(r["image"], np.uint8) for r in records]),
            np.array([int(r["label"]) for r in records], np.int32),
        )
    class_names = tuple(builder.info.features["label"].names)
    return Dataset(*arrays["train"], *arrays["test"], class_names)
