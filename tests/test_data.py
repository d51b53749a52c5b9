import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_jax.data import DataError, load_dataset, load_folder, subsample
from cifar_jax.config import base_config
from tests.conftest import CLASSES


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "cache"))


def test_folder_tree_gives_uint8_arrays_labels_and_sorted_classes(image_tree):
    ds = load_folder(image_tree, cache=False)
    assert ds.class_names == CLASSES
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (12, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    # The red channel encodes the class (PNG is lossless): labels line up with pixels.
    np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], 40 + 80 * ds.train_labels)
    assert abs(ds.test_images[:, :, :, 0].mean(axis=(1, 2)) - (40 + 80 * ds.test_labels)).max() < 8  # JPEG


def test_any_mode_and_size_is_converted_to_rgb_32(image_tree):
    Image.new("L", (64, 48), 200).save(image_tree / "train" / "bird" / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 40)).save(image_tree / "train" / "bird" / "rgba.png")
    Image.new("P", (32, 32)).save(image_tree / "train" / "bird" / "palette.gif")
    ds = load_folder(image_tree, cache=False)
    assert ds.train_images.shape == (15, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_images[ds.train_labels == 2][-3][0, 0], [200, 200, 200])


def test_tar_archive_equals_the_unpacked_tree(image_tree, tmp_path):
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_tree, arcname="cifar")  # With a top folder: still found.
    a, b = load_folder(image_tree, cache=False), load_folder(archive, cache=False)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert a.class_names == b.class_names


def test_cache_is_written_once_and_loads_equal_without_pickle(image_tree, tmp_path):
    first = load_folder(image_tree)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # would raise if anything were pickled
        assert set(z.files) >= {"train_images", "class_names"}
    second = load_folder(image_tree)
    np.testing.assert_array_equal(first.train_images, second.train_images)
    assert second.class_names == first.class_names
    files[0].write_bytes(b"garbage")  # A damaged cache is rebuilt, not trusted.
    np.testing.assert_array_equal(load_folder(image_tree).test_images, first.test_images)


def test_missing_empty_and_broken_sources_are_one_line_errors(tmp_path, image_tree):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images under train"):
        load_folder(tmp_path / "empty", cache=False)
    (image_tree / "train" / "bird" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode train/bird/bad.jpg"):
        load_folder(image_tree, cache=False)
    config = base_config().data
    config.source = "floppy"
    with pytest.raises(DataError, match="unknown data.source"):
        load_dataset(config)


def test_subsample_is_class_balanced_and_deterministic(image_tree):
    ds = load_folder(image_tree, cache=False)
    small = subsample(ds, max_train=6, max_test=3)
    assert np.bincount(small.train_labels).tolist() == [2, 2, 2]
    assert sorted(small.test_labels.tolist()) == [0, 1, 2]
    again = subsample(ds, max_train=6, max_test=3)
    np.testing.assert_array_equal(small.train_images, again.train_images)


def test_real_cifar10_archive(cifar_archive, monkeypatch):
    monkeypatch.delenv("CIFAR_JAX_CACHE")  # Share the user cache: the archive decodes once per machine.
    ds = load_folder(cifar_archive)
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    mean, std = ds.channel_stats()
    np.testing.assert_allclose(mean, [0.491, 0.482, 0.447], atol=0.01)  # The well-known CIFAR-10 means
    np.testing.assert_allclose(std, [0.247, 0.243, 0.261], atol=0.01)


def test_tfds_source_offline_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        config = base_config().data
        config.source = "tfds"
        config.path = ""
        ds = load_dataset(config)
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (6, 32, 32, 3)
    assert len(ds.class_names) == 10
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
