"""The accelerator loop (config.loop="device"), tested on the CPU: same training as the host loop, exact resume."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cifar_jax import feeds, train_lib
from cifar_jax.checkpoints import make_manager
from tests.conftest import ROOT
from tests.test_checkpoints import assert_bitwise_equal, metrics, overrides, params, run

DEVICE = {"loop": "device", "steps_per_dispatch": 3}  # 8 steps an epoch: chunks of 3, 3, then 2, one program


@pytest.fixture(scope="module")
def device_reference(cifar_archive, tmp_path_factory):
    os.chdir(ROOT)
    workdir = tmp_path_factory.mktemp("device") / "run"
    assert run(workdir, cifar_archive, **DEVICE) == 0
    return workdir


@pytest.fixture(scope="module")
def host_reference(reference):
    """The shared reference run: on a CPU, loop=auto and steps_per_dispatch=0 mean the host loop, 1 step a dispatch."""
    import json

    config = json.loads((reference / "config.json").read_text())
    assert config["loop"] == "auto" and config["steps_per_dispatch"] == 0 and jax.default_backend() == "cpu"
    return reference


def test_device_loop_trains_the_same_model_as_the_host_loop(device_reference, host_reference):
    a, b = metrics(device_reference), metrics(host_reference)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [8, 16, 24]
    # Same batches, keys and step function, compiled differently: the two agree to 1e-7 for the first
    # few steps (test below), then this tiny net amplifies rounding (a jump of ~1e-4 at one step, as
    # between any two compilations), so over 24 steps the runs agree statistically, not bitwise.
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=2e-2)
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=2e-2)
    diffs = [np.abs(pa - pb).max() for pa, pb in zip(params(device_reference), params(host_reference))]
    scale = max(np.abs(p).max() for p in params(host_reference))
    assert max(diffs) < 0.1 * scale


def test_a_device_chunk_equals_the_same_steps_fed_from_the_host():
    from cifar_jax.config import base_config

    config = base_config()
    config.model.name, config.model.width = "resnet10", 4
    mesh = train_lib.make_mesh(jax.devices()[:1])
    aug = dict(crop_padding=4, pad_mode="reflect", flip=True, cutout_size=8)
    rng = np.random.default_rng(0)
    n, b, k = 256, 32, 3
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    fresh = lambda: train_lib.create_sharded_state(train_lib.build_model(config, 10), train_lib.make_optimizer(config.optim, 100), 0, mesh)
    order, first = train_lib.epoch_order(0, 0, n), 2  # batches 2, 3, 4 of the epoch
    host, step, loss = fresh(), train_lib.make_train_step(mesh, aug=aug), 0.0
    for i in range(first, first + k):
        x, y = train_lib.global_batch(mesh, images[order[i * b : (i + 1) * b]], labels[order[i * b : (i + 1) * b]], b)
        host, m = step(host, x, y, mean, std)
        loss += float(m["loss_sum"])
    chunk = train_lib.make_device_train_chunk(mesh, aug=aug, batch_size=b)
    put = lambda a: train_lib.replicate(mesh, a)
    device, metrics = chunk(fresh(), put(images), put(labels), put(order.astype(np.int32)), np.int32(first), np.int32(k),
                            mean, std)
    assert int(device.step) == int(host.step) == k
    assert float(metrics["loss_sum"]) == pytest.approx(loss, rel=1e-5) and int(metrics["count"]) == k * b
    for a, c in zip(jax.tree.leaves(device.params), jax.tree.leaves(host.params)):
        np.testing.assert_allclose(a, c, rtol=1e-3, atol=5e-5)  # 4-channel BatchNorm amplifies rounding ~100x in 3 steps


def test_sigterm_stops_at_a_chunk_boundary_and_resume_is_bitwise(device_reference, cifar_archive, tmp_path, monkeypatch, capsys):
    real = feeds.DeviceFeed.dispatch

    def interrupting(self, *a):
        os.kill(os.getpid(), signal.SIGTERM)  # Arrives during the first chunk: the run stops after it.
        return real(self, *a)

    monkeypatch.setattr(feeds.DeviceFeed, "dispatch", interrupting)
    assert run(tmp_path, cifar_archive, **DEVICE) == 128 + signal.SIGTERM
    assert "SIGTERM: saved step 3 (epoch 1, batch 3)" in capsys.readouterr().err
    assert make_manager(tmp_path, read_only=True).latest_step() == 3
    monkeypatch.setattr(feeds.DeviceFeed, "dispatch", real)
    assert run(tmp_path, cifar_archive, **DEVICE) == 0
    assert_bitwise_equal(device_reference, tmp_path)


def test_sigkill_then_resume_is_bitwise(device_reference, cifar_archive, tmp_path):
    cmd = [sys.executable, "-m", "cifar_jax.train", "--config", "experiments/smoke.py", "--workdir", str(tmp_path),
           *overrides(cifar_archive, **DEVICE)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(tmp_path, cifar_archive, **DEVICE) == 0
    assert_bitwise_equal(device_reference, tmp_path)


def test_device_evaluation_equals_host_evaluation():
    from cifar_jax.config import base_config
    from cifar_jax.data import Dataset
    from cifar_jax.feeds import device_evaluator, host_evaluator

    config = base_config()
    config.model.name, config.model.width, config.eval_batch_size, config.eval_flip = "resnet10", 4, 16, True
    mesh = train_lib.make_mesh(jax.devices()[:1])
    state = train_lib.create_sharded_state(train_lib.build_model(config, 10), train_lib.make_optimizer(config.optim, 10), 0, mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)  # 37: the last batch is padded
    labels = rng.integers(0, 10, 37).astype(np.int32)
    ds = Dataset(images, labels, images, labels, tuple("abcdefghij"))
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    host = host_evaluator(mesh, ds, config, mean, std)(state)
    device = device_evaluator(mesh, ds, config, mean, std)(state)
    np.testing.assert_array_equal(device["predictions"], host["predictions"])
    assert device["loss"] == pytest.approx(host["loss"], rel=1e-5)
    assert len(device["predictions"]) == 37
