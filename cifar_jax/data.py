"""CIFAR as in-memory uint8 arrays: official binary releases, an image folder or tensorflow-datasets.

Every source returns a ``Dataset``: ``train_images`` (N, H, W, 3) uint8,
``train_labels`` (N,) int32, the same for test, ``class_names`` and a
human-readable ``description`` of where the data came from. Decoded image
folders are cached as ``.npz`` (loaded without pickle), keyed on their content,
so the second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tarfile
import warnings
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from cifar_jax.cifar_binary import load_cifar
from cifar_jax.files import atomic_path
from cifar_jax.dataset import DEFAULT_PATH, DataError, Dataset, reason, subsample  # noqa: F401  (re-exported: the public data API)
from cifar_jax.runtime import default_cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "test")


def _folder_source(c) -> Dataset:
    if not c.path:
        raise DataError("data.path is empty: give an image-folder tree or a .tar.gz of one")
    return load_folder(c.path, image_size=c.image_size, cache=c.cache)


def _binary_source(release: str):
    def load(c) -> Dataset:
        return load_cifar(release, path="" if c.path == DEFAULT_PATH else c.path, label_mode=getattr(c, "label_mode", "fine"),
                          download=getattr(c, "download", True), url=getattr(c, "url", ""), image_size=c.image_size)

    return load


def _tfds_source(c) -> Dataset:
    return load_tfds(c.name, data_dir=c.path or None)


# data.source -> loader(data config) -> Dataset. Adding a source: its loader and one line here ("auto" picks among
# these in ``resolve_source``; config.RULES reads this registry).
SOURCES = {
    "folder": _folder_source,  # an image-folder tree (train/<class>/*, test/<class>/*) or a .tar(.gz) of one
    "cifar10": _binary_source("cifar10"),  # the official binary release (the archive or a folder holding it)
    "cifar100": _binary_source("cifar100"),
    "tfds": _tfds_source,  # a prepared tensorflow-datasets copy (path = data_dir)
}
BINARY_ARCHIVES = {"cifar-10-binary.tar.gz": "cifar10", "cifar-100-binary.tar.gz": "cifar100"}


def resolve_source(source: str, path: str) -> str:
    """``source``, or for "auto": a binary release by its archive's name, an existing image folder, else cifar10."""
    if source != "auto":
        return source
    return (BINARY_ARCHIVES.get(Path(path).name) if path else None) or ("folder" if path and Path(path).exists() else "cifar10")


def load_dataset(data_config) -> Dataset:
    """Loads the dataset a config's ``data`` block names: ``SOURCES[resolve_source(source, path)](data_config)``.

    Fields used: ``source`` ("auto" or a key of ``SOURCES``), ``path`` (folder tree or .tar.gz of one; for
    cifar10/cifar100 the official archive or a directory holding it; for tfds the data_dir), ``name`` (tfds name),
    ``label_mode`` (cifar100: "fine" or "coarse"), ``download`` and ``url`` (binary releases), ``image_size``,
    ``cache``, ``max_train`` / ``max_test`` (0 = all; a class-balanced prefix otherwise).
    """
    source = resolve_source(data_config.source, data_config.path)
    if source not in SOURCES:
        raise DataError(f"unknown data.source {source!r}; choose one of auto, {', '.join(SOURCES)}")
    return subsample(SOURCES[source](data_config), data_config.max_train, data_config.max_test)


# --------------------------------------------------------------------------- folder


def load_folder(path: str | os.PathLike, image_size: int = 32, cache: bool = True, progress: bool = True) -> Dataset:
    """Reads ``train/<class>/*`` and ``test/<class>/*`` from a directory or a .tar(.gz) of one.

    Class names are the sorted folder names of ``train``; ``test`` must use
    the same names. Images of any size or mode are converted to RGB and, if
    needed, resized to ``image_size`` (bilinear). Archive members named with
    ``..`` or an absolute path are skipped with a warning; nothing is
    extracted. Returns a Dataset. With ``cache``, the arrays are kept in
    ``default_cache_dir()`` keyed on the content (see ``content_key``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if not path.is_dir() and not _is_tar(path):
        raise DataError(f"data path {str(path)!r} is neither a directory nor a tar archive")
    cache_file = key = None
    if cache:
        key = content_key(path)
        ident = f"{path.resolve()}|{image_size}|v2"
        cache_file = default_cache_dir() / f"folder-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"
        cached = _load_npz(cache_file, key, image_size)
        if cached is not None:
            return cached
    total, entries = (_dir_entries(path) if path.is_dir() else (None, _tar_entries(path)))
    ds = _decode_entries(entries, str(path), image_size, total, progress)
    if cache_file is not None:
        try:
            _save_npz(cache_file, ds, key, image_size)
        except OSError as e:  # The cache only saves time: the data in hand is used all the same.
            print(f"warning: cannot write the data cache {str(cache_file)!r}: {e.strerror or e}; going on without it "
                  "(set CIFAR_JAX_CACHE to a writable folder, or data.cache=False)", file=sys.stderr)
    return ds


def content_key(path: Path) -> str:
    """What a folder cache depends on: every member's relative path, size and mtime_ns for a
    directory; size, mtime_ns and sha256 of the bytes for an archive."""
    if path.is_dir():
        h = hashlib.sha256()
        for split in SPLITS:
            for dirpath, _, files in sorted(os.walk(path / split)):
                for f in sorted(files):
                    st = os.stat(os.path.join(dirpath, f))
                    rel = os.path.relpath(os.path.join(dirpath, f), path)
                    h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"dir:{h.hexdigest()}"
    from cifar_jax.download import sha256_file

    st = path.stat()
    return f"archive:{st.st_size}:{st.st_mtime_ns}:{sha256_file(path)}"


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):
        return False


def _dir_entries(root: Path):
    """(count, iterator of (split, class, origin, bytes)) for an image-folder directory."""
    files = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files += [(split, class_dir.name, f) for f in sorted(class_dir.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return len(files), ((s, c, f.relative_to(root).as_posix(), f.read_bytes()) for s, c, f in files)


def _tar_entries(archive: Path):
    """Yields (split, class, member name, bytes) from a tar; skips unsafe names, never extracts."""
    unsafe = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    unsafe.append(member.name)
                    continue
                # Accept both "train/cls/x.jpg" and "<top>/train/cls/x.jpg".
                for i in range(len(parts) - 2):
                    if parts[i] in SPLITS and len(parts) - i == 3:
                        yield parts[i], parts[i + 1], member.name, tar.extractfile(member).read()
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read {archive} (truncated or corrupt archive?): {reason(e)}") from None
    if unsafe:
        warnings.warn(f"{archive}: skipped {len(unsafe)} member(s) named with '..' or an absolute path, "
                      f"e.g. {unsafe[0]!r}", stacklevel=2)


def _decode_entries(entries, where: str, image_size: int, total: int | None = None, progress: bool = True) -> Dataset:
    from PIL import Image
    from tqdm.auto import tqdm

    per_split: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
    suffixes = set()
    bar = tqdm(entries, total=total, desc=f"decoding {Path(where).name}", unit="img", disable=None if progress else True)
    for split, class_name, origin, blob in bar:
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                per_split[split].append((class_name, origin, np.asarray(im, np.uint8)))
        except Exception as e:
            why = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__  # No BytesIO repr.
            raise DataError(f"cannot decode {origin} in {where}: {why}") from None
        suffixes.add(Path(origin).suffix.lower().lstrip("."))
    for split in SPLITS:
        if not per_split[split]:
            raise DataError(f"no images under {split}/<class>/ in {where}")
    class_names = tuple(sorted({c for c, _, _ in per_split["train"]}))
    unknown = sorted({c for c, _, _ in per_split["test"]} - set(class_names))
    if unknown:
        raise DataError(f"test classes {unknown} have no train folder in {where}")
    arrays = {}
    for split in SPLITS:
        items = sorted(per_split[split], key=lambda t: (t[0], PurePosixPath(t[1]).name))  # Stable: class, file name.
        arrays[split] = (
            np.stack([im for _, _, im in items]),
            np.array([class_names.index(c) for c, _, _ in items], np.int32),
        )
    formats = ", ".join(sorted({"JPEG" if s in ("jpg", "jpeg") else s.upper() for s in suffixes}))
    n = sum(len(v) for v in per_split.values())
    return Dataset(*arrays["train"], *arrays["test"], class_names, f"image folder {Path(where).name} ({n} {formats} images)")


def _save_npz(file: Path, ds: Dataset, key: str, image_size: int) -> None:
    """Writes the arrays plus what they were built from (source description, content key, image size)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file, suffix=".npz") as tmp:  # A concurrent or killed run never sees half a cache file.
        np.savez(
            tmp,
            train_images=ds.train_images,
            train_labels=ds.train_labels,
            test_images=ds.test_images,
            test_labels=ds.test_labels,
            class_names=np.array(ds.class_names, dtype=np.str_),
            description=np.array(ds.description),
            key=np.array(key),
            image_size=np.array(image_size),
        )


def _load_npz(file: Path, key: str, image_size: int) -> Dataset | None:
    """The cached Dataset if ``file`` holds arrays built from ``key`` at ``image_size``, else None."""
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) != key or int(z["image_size"]) != image_size:
                return None
            ds = Dataset(z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                         tuple(str(c) for c in z["class_names"]), str(z["description"]))
    except Exception:  # A damaged or old-format cache is rebuilt, never trusted.
        return None
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        if images.shape[1:] != (image_size, image_size, 3) or len(labels) != len(images) or labels.max() >= ds.num_classes:
            return None
    return ds


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
    return Dataset(*arrays["train"], *arrays["test"], class_names, f"tensorflow-datasets {name}")
