import os
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


def test_real_cifar10_archive(full_cifar_archive, monkeypatch):
    monkeypatch.delenv("CIFAR_JAX_CACHE")  # Share the user cache: the archive decodes once per machine.
    ds = load_folder(full_cifar_archive)
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


# --------------------------------------------------------------------------- issue 12: cache keying, archives


def test_replacing_or_adding_an_image_in_a_tree_invalidates_the_cache(image_tree):
    first = load_folder(image_tree)
    assert first.train_images[0, 0, 0].tolist() != [1, 2, 3]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image_tree / "train" / "airplane" / "0000.png")  # Same name, new pixels.
    replaced = load_folder(image_tree)
    assert replaced.train_images[0, 0, 0].tolist() == [1, 2, 3]
    Image.new("RGB", (32, 32), (4, 5, 6)).save(image_tree / "train" / "bird" / "0100.png")
    added = load_folder(image_tree)
    assert added.train_images.shape[0] == 13 and added.train_images[-1, 0, 0].tolist() == [4, 5, 6]


def test_a_cache_file_of_another_image_size_is_rebuilt(image_tree, tmp_path):
    load_folder(image_tree, image_size=16)
    small = list((tmp_path / "cache").glob("*.npz"))
    load_folder(image_tree, image_size=32)
    (normal,) = set((tmp_path / "cache").glob("*.npz")) - set(small)
    normal.write_bytes(small[0].read_bytes())  # A cache file holding 16x16 arrays where 32x32 are asked for.
    ds = load_folder(image_tree, image_size=32)
    assert ds.train_images.shape == (12, 32, 32, 3)


def test_cache_records_what_it_was_built_from(image_tree, tmp_path):
    ds = load_folder(image_tree)
    (file,) = (tmp_path / "cache").glob("*.npz")
    with np.load(file, allow_pickle=False) as z:
        assert int(z["image_size"]) == 32 and str(z["description"]) == ds.description == "image folder tree (24 JPEG, PNG images)"
        assert str(z["key"]).startswith("dir:") and tuple(z["class_names"]) == CLASSES
    assert load_folder(image_tree).description == ds.description  # Read back from the cache.


def make_archive(tree, path, extra=(), mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        tar.add(tree, arcname="cifar")
        for name, src in extra:  # addfile keeps the name as written (add would strip a leading "/").
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            with open(src, "rb") as f:
                tar.addfile(info, f)
    return path


def test_replaced_archive_of_the_same_size_and_mtime_invalidates_the_cache(image_tree, tmp_path):
    archive = make_archive(image_tree, tmp_path / "a.tar", mode="w")
    stat = archive.stat()
    first = load_folder(archive)
    pixels = np.asarray(Image.open(image_tree / "train" / "airplane" / "0000.png")).copy()
    pixels[0, 0] = [1, 2, 3]  # One pixel changes; a plain tar pads members to 512 bytes, so its size stays.
    Image.fromarray(pixels).save(image_tree / "train" / "airplane" / "0000.png")
    make_archive(image_tree, archive, mode="w")
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert archive.stat().st_size == stat.st_size  # Only the bytes (their sha256) tell the archives apart.
    second = load_folder(archive)
    assert first.train_images[0, 0, 0].tolist() != [1, 2, 3] and second.train_images[0, 0, 0].tolist() == [1, 2, 3]


def test_truncated_archive_is_a_one_line_error_naming_it(image_tree, tmp_path):
    archive = make_archive(image_tree, tmp_path / "a.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"cannot read {archive}") as e:
        load_folder(archive, cache=False)
    assert "\n" not in str(e.value)


def test_unsafe_member_names_are_skipped_with_a_warning(image_tree, tmp_path):
    png = image_tree / "train" / "airplane" / "0000.png"
    archive = make_archive(image_tree, tmp_path / "a.tar", extra=[("../train/bird/x.png", png), ("/abs/train/bird/y.png", png)])
    with tarfile.open(archive) as tar:  # tarfile keeps both names as written
        assert {"../train/bird/x.png", "/abs/train/bird/y.png"} <= set(tar.getnames())
    with pytest.warns(UserWarning, match=r"skipped 2 member\(s\) named with '\.\.' or an absolute path"):
        ds = load_folder(archive, cache=False)
    assert ds.train_images.shape[0] == 12 and np.bincount(ds.train_labels).tolist() == [4, 4, 4]
    assert not (tmp_path.parent / "train").exists()  # Nothing was extracted.


def test_decode_error_names_the_member_and_the_reason_without_a_repr(image_tree, tmp_path):
    (image_tree / "train" / "bird" / "bad.jpg").write_bytes(b"not an image")
    archive = make_archive(image_tree, tmp_path / "a.tar.gz")
    for source, origin in ((image_tree, "train/bird/bad.jpg"), (archive, "cifar/train/bird/bad.jpg")):
        with pytest.raises(DataError) as e:
            load_folder(source, cache=False)
        assert str(e.value) == f"cannot decode {origin} in {source}: cannot identify image file"
