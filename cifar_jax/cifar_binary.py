"""The official CIFAR-10 / CIFAR-100 binary releases, parsed straight from their .tar.gz.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html): every record is the
label byte(s) followed by 3072 pixel bytes, the 1024 red values, then green,
then blue, each a 32x32 image in row-major order.

- ``cifar-10-binary.tar.gz``: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and
  ``test_batch.bin``, records of 1 label byte + 3072; names in ``batches.meta.txt``.
- ``cifar-100-binary.tar.gz``: ``cifar-100-binary/train.bin`` and ``test.bin``,
  records of 1 coarse + 1 fine label byte + 3072; names in
  ``coarse_label_names.txt`` / ``fine_label_names.txt``.

Nothing is extracted to disk and nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import tarfile
import zlib
from pathlib import Path

import numpy as np

from cifar_jax import download as dl
from cifar_jax.dataset import DataError, Dataset, reason
from cifar_jax.runtime import default_cache_dir

PIXELS = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class Release:
    title: str
    archive: str  # File name of the official archive.
    folder: str  # Top folder inside it.
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int
    names: dict  # label mode -> (names file, byte offset of that label in a record)


RELEASES = {
    "cifar10": Release(
        "CIFAR-10", "cifar-10-binary.tar.gz", "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1,
        {"fine": ("batches.meta.txt", 0)},
    ),
    "cifar100": Release(
        "CIFAR-100", "cifar-100-binary.tar.gz", "cifar-100-binary", ("train.bin",), ("test.bin",), 2,
        {"coarse": ("coarse_label_names.txt", 0), "fine": ("fine_label_names.txt", 1)},
    ),
}


def load_cifar(which: str = "cifar10", path: str = "", label_mode: str = "fine", download: bool = True,
               url: str = "", image_size: int = 32) -> Dataset:
    """CIFAR-10 or CIFAR-100 (``which``) from the official binary archive; returns a Dataset.

    A ``path`` (the archive, under any name, or a folder holding it under its official name) is used as
    it is, and only it: one that does not hold the archive is a DataError, never passed over. Without a
    ``path`` the archive is taken from ``default_cache_dir()`` (checked against the published sha256),
    else downloaded there once (verified, see ``cifar_jax.download``) unless ``download`` is False.
    Images are (N, 32, 32, 3), resized if ``image_size`` differs.
    """
    release = RELEASES[which]
    cached = default_cache_dir() / release.archive
    if path:
        archive = explicit_archive(Path(path), which, cached)
    else:
        archive = cached if cached.is_file() else None
        put_it = f"put the file at {cached} (or give its path as data.path)"
        if archive is None and not download:
            raise DataError(f"{release.archive} not found at {cached} and data.download=False; "
                            f"{put_it}, from {dl.base_url(url)}/{release.archive}")
        try:
            if archive is None:
                archive = dl.download(release.archive, cached.parent, url=url)
            else:  # Ours to vouch for: checked on every use (sha256 of 170 MB: a fraction of a second).
                dl.verify(archive)
        except dl.DownloadError as e:
            raise DataError(f"{e}; {put_it}") from None
    tr_x, tr_y, te_x, te_y, names = read_release(archive, which, label_mode)
    if image_size != 32:
        tr_x, te_x = _resize_all(tr_x, image_size), _resize_all(te_x, image_size)
    description = f"{release.title} official binary release ({release.archive})"
    if which == "cifar100":
        description += f", {label_mode} labels ({len(names)} classes)"
    return Dataset(tr_x, tr_y, te_x, te_y, names, description)


def explicit_archive(path: Path, which: str, cached: Path) -> Path:
    """The archive a ``data.path`` names for source ``which``; a one-line DataError if it names none or another release's."""
    release = RELEASES[which]
    archive = path / release.archive if path.is_dir() else path
    instead = f"give the {release.title} archive ({release.archive}) or a folder holding it, or data.path='' to use {cached}"
    if not archive.is_file():
        where = f"holds no {release.archive}" if path.is_dir() else "does not exist"
        raise DataError(f"data.path {str(path)!r} {where}; {instead}")
    other = next((k for k, r in RELEASES.items() if k != which and r.archive == archive.name), None)
    if other:
        raise DataError(f"data.path {str(path)!r} is the {RELEASES[other].title} archive but data.source is {which!r}; "
                        f"use data.source={other}, or {instead}")
    return archive


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def read_release(archive: str | Path, which: str = "cifar10", label_mode: str = "fine"):
    """Parses an official binary archive.

    Returns ``(train_images (N, 32, 32, 3) uint8, train_labels (N,) int32,
    test_images, test_labels, class_names tuple)``. A missing member, a
    member whose size is not a whole number of records, a label outside the
    class list or an unreadable archive raises DataError with a one-line message.
    """
    release = RELEASES[which]
    if label_mode not in release.names:
        raise DataError(f"{release.title} has no {label_mode!r} labels; choose one of {sorted(release.names)}")
    names_file, label_offset = release.names[label_mode]
    wanted = {f"{release.folder}/{f}" for f in (*release.train, *release.test, names_file)}
    members = _read_members(Path(archive), wanted)
    missing = sorted(wanted - set(members))
    if missing:
        raise DataError(f"{archive} is not the {release.title} binary release: it has no member {missing[0]}")
    class_names = tuple(line.strip() for line in members[f"{release.folder}/{names_file}"].decode().splitlines() if line.strip())
    record = release.label_bytes + PIXELS
    splits = []
    for files in (release.train, release.test):
        images, labels = [], []
        for f in files:
            raw = members[f"{release.folder}/{f}"]
            if len(raw) == 0 or len(raw) % record:
                raise DataError(f"{archive}: {f} has {len(raw)} bytes, not a whole number of {record}-byte records")
            rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
            label = rows[:, label_offset].astype(np.int32)
            if label.max() >= len(class_names):
                raise DataError(f"{archive}: {f} has label {label.max()} but {names_file} names {len(class_names)} classes")
            # Planes R, G, B of 32x32 row-major -> (N, 32, 32, 3).
            images.append(rows[:, release.label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(label)
        splits += [np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)]
    return (*splits, class_names)


def _read_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Reads the bytes of the regular-file members named in ``wanted`` (one pass, in memory)."""
    found = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and name in wanted:
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read {archive} (truncated or not a .tar.gz?): {reason(e)}") from None
    return found
