"""The official CIFAR-10/100 binary releases: parsing, download, checksum, cache (all offline).

Small archives in the exact official layouts are built here and served from a
local HTTP server on 127.0.0.1; nothing else is contacted.
"""

import hashlib
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading

import jax
import numpy as np
import pytest

from cifar_jax import download as dl
from cifar_jax.config import ConfigError, base_config, validate
from cifar_jax.data import DataError, load_dataset

C10, C100 = "cifar-10-binary.tar.gz", "cifar-100-binary.tar.gz"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(dl.URL_ENV, raising=False)
    monkeypatch.setattr(dl, "CHECKSUMS", dict(dl.CHECKSUMS))  # Tests replace entries; the real ones stay.
    return tmp_path / "cache"


def records(labels, planes):
    """Binary records: the label bytes (K, n) then 3 planes of 32x32, each filled with one value per record."""
    labels, planes = np.asarray(labels, np.uint8), np.asarray(planes, np.uint8)
    pixels = np.repeat(planes[:, :, None], 1024, axis=2).reshape(len(planes), 3072)
    pixels[:, 1] = 99  # Pixel (0, 1) of the red plane: checks row-major order within a plane.
    return np.concatenate([labels.T, pixels], axis=1).tobytes()


def write_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cifar10_members(per_class=2):
    """Record i has label i % 10; planes R = 10 * label + 5, G = 200, B = 7."""
    def batch(n, offset):
        labels = (np.arange(n) + offset) % 10
        return records([labels], np.stack([10 * labels + 5, np.full(n, 200), np.full(n, 7)], 1))

    names = "\n".join(f"c10_{i}" for i in range(10)) + "\n\n"  # The real file ends with a blank line.
    members = {f"cifar-10-batches-bin/data_batch_{i}.bin": batch(2 * per_class, 2 * per_class * (i - 1)) for i in range(1, 6)}
    members["cifar-10-batches-bin/test_batch.bin"] = batch(10, 0)
    members["cifar-10-batches-bin/batches.meta.txt"] = names.encode()
    return members


def cifar100_members(per_class=2):
    """Fine label f, coarse f // 5; planes R = f, G = coarse, B = 255 - f."""
    def split(n):
        fine = np.arange(n) % 100
        return records([fine // 5, fine], np.stack([fine, fine // 5, 255 - fine], 1))

    return {
        "cifar-100-binary/train.bin": split(100 * per_class),
        "cifar-100-binary/test.bin": split(100),
        "cifar-100-binary/fine_label_names.txt": "".join(f"fine_{i:02d}\n" for i in range(100)).encode(),
        "cifar-100-binary/coarse_label_names.txt": "".join(f"coarse_{i:02d}\n" for i in range(20)).encode(),
    }


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("releases")
    return {C10: write_tar(d / C10, cifar10_members()), C100: write_tar(d / C100, cifar100_members())}


def publish(monkeypatch, path):
    """Makes the test archive at ``path`` the expected (size, sha256) for its name."""
    data = path.read_bytes()
    monkeypatch.setitem(dl.CHECKSUMS, path.name, (len(data), hashlib.sha256(data).hexdigest()))


class Server:
    """An HTTP server on 127.0.0.1 serving files by name; ``mode`` "ok", "corrupt" or "cut" (closes mid-body)."""

    def __init__(self, files):
        self.files, self.requests, self.mode = files, [], "ok"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.removeprefix("/data/")
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.mode == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                if server.mode == "cut":
                    data = data[: len(data) // 2]  # Fewer bytes than Content-Length, then the connection closes.
                self.wfile.write(data)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def server(archives):
    s = Server(archives)
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(5)


def data_config(**fields):
    c = base_config().data
    c.path = ""
    for k, v in fields.items():
        c[k] = v
    return c


def one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def leftovers(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --------------------------------------------------------------------------- parsing


def test_cifar10_labels_names_and_plane_order(archives):
    ds = load_dataset(data_config(source="cifar10", path=str(archives[C10])))
    assert ds.class_names == tuple(f"c10_{i}" for i in range(10))
    assert ds.train_images.shape == (20, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10, 32, 32, 3) and ds.train_labels.dtype == np.int32
    assert np.bincount(ds.train_labels).tolist() == [2] * 10
    np.testing.assert_array_equal(ds.train_images[:, 5, 7, 0], 10 * ds.train_labels + 5)  # R plane
    assert (ds.train_images[:, :, :, 1] == 200).all() and (ds.test_images[:, :, :, 2] == 7).all()  # G, B planes
    assert (ds.train_images[:, 0, 1, 0] == 99).all() and (ds.train_images[:, 1, 0, 0] != 99).all()  # row-major
    assert ds.description == "CIFAR-10 official binary release (cifar-10-binary.tar.gz)"


@pytest.mark.parametrize("mode,classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse_labels(archives, mode, classes):
    ds = load_dataset(data_config(source="cifar100", path=str(archives[C100].parent), label_mode=mode))
    assert ds.num_classes == classes and ds.class_names[3] == f"{mode}_03"
    fine = ds.train_images[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(ds.train_images[:, 9, 9, 1], fine // 5)
    np.testing.assert_array_equal(ds.train_images[:, 31, 31, 2], 255 - fine)
    np.testing.assert_array_equal(ds.train_labels, fine if mode == "fine" else fine // 5)
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.test_labels.shape == (100,)
    assert f"{mode} labels ({classes} classes)" in ds.description


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update({"cifar-100-binary/test.bin": m["cifar-100-binary/test.bin"][:-1]}), "not a whole number of 3074-byte records"),
        (lambda m: m.pop("cifar-100-binary/train.bin"), "has no member cifar-100-binary/train.bin"),
        (lambda m: m.update({"cifar-100-binary/train.bin": b"\x00\x64" + bytes(3072)}), "has label 100"),
    ],
)
def test_malformed_release_is_a_one_line_error(tmp_path, change, message):
    members = cifar100_members()
    change(members)
    archive = write_tar(tmp_path / C100, members)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(data_config(source="cifar100", path=str(archive)))
    one_line(e)


def test_truncated_release_is_a_one_line_error(tmp_path, archives):
    archive = tmp_path / C10
    data = archives[C10].read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"cannot read {archive}") as e:
        load_dataset(data_config(source="cifar10", path=str(archive)))
    one_line(e)


# --------------------------------------------------------------------------- download


def test_download_is_verified_and_never_repeated(server, archives, monkeypatch, private_cache):
    publish(monkeypatch, archives[C10])
    first = load_dataset(data_config(source="cifar10", url=server.url))
    assert server.requests == [f"/data/{C10}"]
    assert leftovers(private_cache) == [C10]  # Only the verified archive: no temporary file left.
    again = load_dataset(data_config(source="cifar10", url=server.url))
    assert len(server.requests) == 1  # The second load made no request.
    np.testing.assert_array_equal(first.train_images, again.train_images)


def test_url_from_environment_and_auto_source(server, archives, monkeypatch, image_tree):
    publish(monkeypatch, archives[C10])
    monkeypatch.setenv(dl.URL_ENV, server.url)
    ds = load_dataset(data_config(source="auto", path=""))  # No folder: CIFAR-10's binary release.
    assert server.requests == [f"/data/{C10}"] and ds.num_classes == 10
    assert ds.description.startswith("CIFAR-10 official binary release")
    folder = load_dataset(data_config(source="auto", path=str(image_tree)))  # An existing folder wins.
    assert folder.description == "image folder tree (24 JPEG, PNG images)" and len(server.requests) == 1


@pytest.mark.parametrize("mode", ["corrupt", "cut"])
def test_corrupted_or_interrupted_download_leaves_nothing_trusted(server, archives, monkeypatch, private_cache, mode):
    publish(monkeypatch, archives[C100])
    server.mode = mode
    with pytest.raises(DataError, match="published checksum" if mode == "corrupt" else "cannot download") as e:
        load_dataset(data_config(source="cifar100", url=server.url))
    assert "put the file at" in one_line(e)
    assert leftovers(private_cache) == []  # Neither the archive nor a partial file.
    server.mode = "ok"  # The next run downloads again, and gets the real thing.
    ds = load_dataset(data_config(source="cifar100", url=server.url))
    assert len(server.requests) == 2 and ds.num_classes == 100


def test_interrupted_download_without_checksum_help(server, archives, monkeypatch, private_cache):
    """Even if the expected checksum were of the half file, a short body is refused by its Content-Length."""
    half = archives[C10].read_bytes()
    half = half[: len(half) // 2]
    monkeypatch.setitem(dl.CHECKSUMS, C10, (len(half), hashlib.sha256(half).hexdigest()))
    server.mode = "cut"
    with pytest.raises(DataError, match=r"ended after \d+ of \d+ bytes"):
        load_dataset(data_config(source="cifar10", url=server.url))
    assert leftovers(private_cache) == []


def test_download_false_without_the_file_is_a_one_line_error(private_cache):
    with pytest.raises(DataError, match="data.download=False") as e:
        load_dataset(data_config(source="cifar100", download=False))
    assert f"put the file at {private_cache / C100}" in one_line(e)


def test_unreachable_server_is_a_one_line_error(private_cache):
    with socket.socket() as s:  # A port on 127.0.0.1 that nothing listens on.
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/cifar-10-binary\.tar\.gz \(offline\?\)") as e:
        load_dataset(data_config(source="cifar10", url=f"http://127.0.0.1:{port}"))
    assert "put the file at" in one_line(e)
    assert leftovers(private_cache) == []


def test_config_validates_label_mode():
    config = base_config()
    config.data.label_mode = "medium"
    with pytest.raises(ConfigError, match="unknown data.label_mode"):
        validate(config)
    config.data.label_mode, config.data.source = "coarse", "cifar10"
    with pytest.raises(ConfigError, match="needs data.source='cifar100'"):
        validate(config)


# --------------------------------------------------------------------------- end to end


def test_smoke_training_on_cifar100(archives, tmp_path, monkeypatch):
    from cifar_jax import train
    from cifar_jax.inference import load_trained
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CIFAR_JAX_NO_COMPILE_CACHE", "1")
    workdir = tmp_path / "run"
    rc = train.main([
        "--config", "experiments/smoke.py", "--workdir", str(workdir),
        "--config.data.source=cifar100", f"--config.data.path={archives[C100]}",
        "--config.data.max_train=128", "--config.data.max_test=100", "--config.epochs=1",
        "--config.log.progress_bar=false", "--config.log.report=false",
    ])
    assert rc == 0
    trained = load_trained(workdir, "latest")
    assert len(trained.class_names) == 100 and trained.class_names[0] == "fine_00"
    head = [x for x in jax.tree.leaves(trained.variables["params"]) if x.ndim == 2]
    assert [h.shape[-1] for h in head] == [100]  # The only dense layer: the 100-way head.


def test_cifar100_recipe_changes_only_the_data_and_epochs():
    from cifar_jax.config import load_config
    from tests.conftest import ROOT

    base, c100 = load_config(ROOT / "experiments" / "resnet18.py"), load_config(ROOT / "experiments" / "resnet18_cifar100.py")
    validate(c100)
    flat = lambda c, p="": {k2: v2 for k, v in c.items() for k2, v2 in (flat(v, f"{p}{k}.").items() if hasattr(v, "items") else [(p + k, v)])}
    a, b = flat(base.to_dict()), flat(c100.to_dict())
    assert {k for k in a if a[k] != b[k]} == {"data.source", "epochs"}
    assert b["data.source"] == "cifar100" and b["data.label_mode"] == "fine"


def test_a_wrong_file_in_the_cache_dir_is_refused(archives, monkeypatch, private_cache):
    publish(monkeypatch, archives[C10])
    private_cache.mkdir()
    (private_cache / C10).write_bytes(archives[C100].read_bytes())  # Someone put another file there.
    with pytest.raises(DataError, match=f"{private_cache / C10} is not the published {C10}") as e:
        load_dataset(data_config(source="cifar10", download=False))
    one_line(e)


def test_missing_file_on_the_server_is_a_one_line_error(server, private_cache):
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/nowhere/cifar-10-binary\.tar\.gz: HTTP 404") as e:
        load_dataset(data_config(source="cifar10", url=server.url.replace("/data", "/nowhere")))
    one_line(e)
    assert leftovers(private_cache) == []


# --------------------------------------------------------------------------- an explicit data.path is never passed over


def test_an_archive_of_the_other_release_is_refused_not_ignored(server, archives, monkeypatch, private_cache):
    publish(monkeypatch, archives[C10])
    private_cache.mkdir()
    shutil.copy(archives[C10], private_cache / C10)  # A CIFAR-10 archive in the cache must not be used instead.
    for download in (True, False):
        with pytest.raises(DataError, match=f"data.path '{archives[C100]}' is the CIFAR-100 archive but data.source "
                                            "is 'cifar10'; use data.source=cifar100") as e:
            load_dataset(data_config(source="cifar10", path=str(archives[C100]), url=server.url, download=download))
        one_line(e)
    assert server.requests == []


@pytest.mark.parametrize("where", ["missing file", "folder without it"])
def test_an_explicit_path_without_the_archive_is_refused(server, archives, monkeypatch, private_cache, tmp_path, where):
    publish(monkeypatch, archives[C10])
    path = tmp_path / ("nowhere.tar.gz" if where == "missing file" else "empty")
    if where != "missing file":
        path.mkdir()
    with pytest.raises(DataError, match="does not exist" if where == "missing file" else f"holds no {C10}") as e:
        load_dataset(data_config(source="cifar10", path=str(path), url=server.url))
    assert f"or data.path='' to use {private_cache / C10}" in one_line(e)
    assert server.requests == [] and leftovers(private_cache) == []


def test_an_archive_under_another_name_is_read_as_given(archives, tmp_path):
    renamed = tmp_path / "my-cifar10.tgz"
    shutil.copy(archives[C10], renamed)
    assert load_dataset(data_config(source="cifar10", path=str(renamed))).num_classes == 10
    with pytest.raises(DataError, match="is not the CIFAR-100 binary release") as e:
        load_dataset(data_config(source="cifar100", path=str(renamed)))
    one_line(e)


def test_the_default_path_is_not_an_explicit_choice(server, archives, monkeypatch):
    """The CIFAR-100 recipe keeps base_config's data.path (the CIFAR-10 JPEG archive): the cache is used."""
    from cifar_jax.dataset import DEFAULT_PATH

    publish(monkeypatch, archives[C100])
    ds = load_dataset(data_config(source="cifar100", path=DEFAULT_PATH, url=server.url))
    assert ds.num_classes == 100 and server.requests == [f"/data/{C100}"]
