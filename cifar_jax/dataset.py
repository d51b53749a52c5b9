"""The dataset type every loader returns, and the one data error: no I/O here."""

from __future__ import annotations

import dataclasses

import numpy as np

from cifar_jax.errors import UserError


# data.path of base_config(): the CIFAR-10 JPEG archive beside the checkout. Not an explicit choice of the user, so the
# binary sources (cifar10, cifar100) read their archive from the cache instead, as when data.path is "".
DEFAULT_PATH = "../shared/data/cifar10-jpg.tar.gz"


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
    description: str = ""  # e.g. "CIFAR-10 official binary release (cifar-10-binary.tar.gz)"

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


def reason(e: BaseException) -> str:
    """``Type: message`` of an exception, first line only (tarfile's ReadError spans several)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].rstrip(':')}" if lines else type(e).__name__


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
    return Dataset(tr_x, tr_y, te_x, te_y, ds.class_names, ds.description)
