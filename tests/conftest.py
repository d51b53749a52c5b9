"""Shared fixtures: the real CIFAR-10 JPEG archive, tiny models, small image-folder trees."""

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

# Tests check behaviour, not speed: XLA's expensive optimisation passes off (in this process and the CLIs it
# starts) cuts the suite's compile-bound time by about a quarter. JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns them on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# On a GPU, the xdist workers (one per core) share it: each takes the memory it uses, not JAX's default 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from cifar_jax.runtime import default_cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ("airplane", "automobile", "bird")


@pytest.fixture
def xla_optimized():
    """XLA's full optimisation for one test: for comparisons of numerics against XLA's own compiled kernels."""
    import jax
    from jax._src import compiler  # Where JAX keeps the flag; jax.config offers no public read of it.

    previous = compiler._DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def full_cifar_archive():
    """Path of the shared CIFAR-10 JPEG archive, all 60,000 images (tests needing it skip if it is absent)."""
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"{SHARED_ARCHIVE} not found")
    return SHARED_ARCHIVE


# Real CIFAR-10 images per class and split for the tests that train: more than any test's class-balanced
# data.max_train (512) or data.max_test (2000) takes, so they train on exactly the images the full archive gives them.
SUBSET = {"train": 100, "test": 200}
SUBSET_DIR = default_cache_dir() / "tests"  # Where the cache is when the tests start (some tests move it).


@pytest.fixture(scope="session")
def cifar_archive(full_cifar_archive):
    """The first SUBSET[split] images (by file name) of every class of the shared archive, as an archive of the same
    layout: 3,000 images to decode and a 9 MB data cache to read instead of 60,000 and 177 MB, the same subsets."""
    from cifar_jax.data import _tar_entries  # The project's own reader of the archive's layout.
    from cifar_jax.download import sha256_file
    from cifar_jax.files import atomic_path

    out = SUBSET_DIR / f"cifar10-jpg-subset-{sha256_file(full_cifar_archive)[:16]}.tar.gz"
    if out.is_file():
        return out
    kept = {}  # (split, class) -> [(file name, member name, bytes)]
    for split, class_name, name, blob in _tar_entries(full_cifar_archive):
        kept.setdefault((split, class_name), []).append((Path(name).name, name, blob))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".tar.gz") as tmp, tarfile.open(tmp, "w:gz") as subset:
        for (split, _), files in sorted(kept.items()):
            for _, name, blob in sorted(files)[: SUBSET[split]]:
                member = tarfile.TarInfo(name)
                member.size = len(blob)
                subset.addfile(member, io.BytesIO(blob))
    return out


def write_image_tree(root: Path, per_class: int = 4, size: int = 32, classes=CLASSES, seed: int = 0) -> Path:
    """Writes train/<class>/*.png and test/<class>/*.jpg with the class index encoded in the red channel."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, ext in (("train", "png"), ("test", "jpg")):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., 0] = 40 + 80 * c
                Image.fromarray(pixels).save(d / f"{i:04d}.{ext}", quality=95)
    return root


@pytest.fixture
def image_tree(tmp_path):
    return write_image_tree(tmp_path / "tree")


def run_module(*args, timeout=600, env=None):
    """Runs ``python -m ARGS`` from the repo root; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def smoke_workdir(cifar_archive, tmp_path_factory):
    """A workdir trained by ``python -m cifar_jax.train --config experiments/smoke.py`` on the real archive, with its
    report; what the command printed is in ``train.stdout`` beside it."""
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    result = run_module("cifar_jax.train", "--config", "experiments/smoke.py", "--workdir", str(workdir),
                        f"--config.data.path={cifar_archive}", "--config.log.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir.parent / "train.stdout").write_text(result.stdout)
    return workdir


@pytest.fixture(scope="session")
def reference(cifar_archive, tmp_path_factory):
    """An uninterrupted 3-epoch run of tests.test_checkpoints.run (ResNet10 width 4, 256 images, batch 32):
    checkpoints at steps 16 and 24 (keep=2; 8 too when it is the best). Tests copy it before changing it."""
    from tests.test_checkpoints import run

    os.chdir(ROOT)
    workdir = tmp_path_factory.mktemp("ref") / "run"
    assert run(workdir, cifar_archive) == 0
    return workdir


# Under pytest-xdist (the README's command runs one worker per core), the tests that share a trained session
# workdir run on one worker, so each workdir is trained once, not once per worker (see --dist loadgroup).
SHARED_WORKDIRS = ("smoke_workdir", "reference")


@pytest.hookimpl(tryfirst=True)  # Before xdist reads the groups.
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED_WORKDIRS if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
