import json
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import train_lib
from cifar_jax.config import base_config
from tests.conftest import ROOT, run_module

AUG = dict(crop_padding=4, pad_mode="reflect", flip=True, cutout_size=8)
MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)


def tiny_setup(optimizer="sgd", total_steps=10):
    config = base_config()
    config.model.name = "resnet10"
    config.model.width = 4
    config.optim.name = optimizer
    config.optim.lr = 0.05 if optimizer == "sgd" else 3e-3
    mesh = train_lib.make_mesh(jax.devices()[:1])
    model = train_lib.build_model(config, 10)
    tx = train_lib.make_optimizer(config.optim, total_steps)
    state = train_lib.create_sharded_state(model, tx, 0, mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (32,)).astype(np.int32)
    return config, mesh, state, images, labels


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_step_fits_a_fixed_batch(optimizer):
    _, mesh, state, images, labels = tiny_setup(optimizer, total_steps=30)
    step = train_lib.make_train_step(mesh, aug=dict(AUG, crop_padding=0, flip=False, cutout_size=0))
    losses = []
    for _ in range(30):
        state, m = step(state, images, labels, MEAN, STD)
        losses.append(float(m["loss_sum"]) / 32)
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30


def test_train_step_updates_batch_stats_and_counts():
    _, mesh, state, images, labels = tiny_setup()
    before = jax.device_get(state.batch_stats)
    step = train_lib.make_train_step(mesh, aug=AUG, label_smoothing=0.1)
    state, m = step(state, images, labels, MEAN, STD)
    assert int(m["count"]) == 32 and 0 <= int(m["correct"]) <= 32
    after = jax.device_get(state.batch_stats)
    assert not np.allclose(before["stem_bn"]["mean"], after["stem_bn"]["mean"])


def test_scanned_steps_equal_single_steps():
    _, mesh, state, images, labels = tiny_setup()
    state2 = jax.tree.map(jnp.copy, state)
    single = train_lib.make_train_step(mesh, aug=AUG)
    scanned = train_lib.make_train_step(mesh, aug=AUG, steps_per_dispatch=2)
    total = 0.0
    for i in range(2):
        state, m = single(state, images[16 * i : 16 * (i + 1)], labels[16 * i : 16 * (i + 1)], MEAN, STD)
        total += float(m["loss_sum"])
    state2, m2 = scanned(state2, images.reshape(2, 16, 32, 32, 3), labels.reshape(2, 16), MEAN, STD)
    np.testing.assert_allclose(float(m2["loss_sum"]), total, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_step_masks_padding_and_flip_averages():
    _, mesh, state, images, labels = tiny_setup()
    ev = train_lib.make_eval_step(mesh)
    mask = np.arange(32) < 20
    out = ev(state, images, labels, mask, MEAN, STD)
    assert out["logits"].shape == (32, 10)
    assert np.all(np.asarray(out["loss"])[20:] == 0) and np.all(np.asarray(out["loss"])[:20] > 0)
    flipped = train_lib.make_eval_step(mesh, flip=True)(state, images, labels, mask, MEAN, STD)
    mirror = ev(state, images[:, :, ::-1], labels, mask, MEAN, STD)
    np.testing.assert_allclose(flipped["logits"], 0.5 * (out["logits"] + mirror["logits"]), rtol=1e-5, atol=1e-5)


def test_onecycle_schedule_peaks_at_warmup_end():
    config = base_config()
    sched = train_lib.make_schedule(config.optim, 100)
    lrs = np.array([sched(i) for i in range(101)])
    assert abs(lrs.max() - config.optim.lr) < 1e-6
    assert int(lrs.argmax()) == 24  # PyTorch OneCycleLR's: the peak at step warmup_fraction * steps - 1
    assert lrs[0] == pytest.approx(config.optim.lr / 25) and lrs[-1] < lrs[0]


def test_linear_schedule_rises_and_falls_in_straight_lines():
    config = base_config()
    config.optim.schedule, config.optim.warmup_fraction = "linear", 0.2
    sched = train_lib.make_schedule(config.optim, 100)
    lrs = np.array([float(sched(i)) for i in range(101)])
    assert int(lrs.argmax()) == 20 and lrs.max() == pytest.approx(config.optim.lr)
    assert lrs[0] == pytest.approx(config.optim.lr / 25)
    assert lrs[100] == pytest.approx(config.optim.lr / 25 / 1e4, abs=1e-9)
    np.testing.assert_allclose(np.diff(lrs[:20]), np.diff(lrs[:20])[0], rtol=1e-4)  # straight up...
    np.testing.assert_allclose(np.diff(lrs[20:]), np.diff(lrs[20:])[0], rtol=1e-3)  # ...and straight down


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
    """model.dtype=bfloat16: parameters, BatchNorm statistics, optimizer state and logits stay float32."""
    config = base_config()
    config.model.name, config.model.width, config.model.dtype = "resnet10", 4, "bfloat16"
    mesh = train_lib.make_mesh(jax.devices()[:1])
    model = train_lib.build_model(config, 10)
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, 10), 0, mesh)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 8).astype(np.int32)
    state, _ = train_lib.make_train_step(mesh, aug=AUG)(state, images, labels, MEAN, STD)
    for tree in (state.params, state.batch_stats, state.opt_state):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {np.dtype("float32")}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = jnp.zeros((2, 32, 32, 3))
    assert model.apply(variables, x).dtype == jnp.float32
    assert model.apply(variables, x, end="layer4").dtype == jnp.bfloat16  # the convolutions compute in bfloat16


def run_parallel(out, *extra):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "scripts" / "parallel_train.py"), str(out), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def assert_same_run(a_file, b_file):
    a, b = np.load(a_file), np.load(b_file)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The script's run on this process's one CPU device (in-process: the same function the script calls)."""
    from tests.scripts.parallel_train import train_steps

    assert jax.device_count() == 1
    out = tmp_path_factory.mktemp("par") / "one.npz"
    losses, params = train_steps(devices=1)
    np.savez(out, losses=losses, **params)
    return out


def test_eight_devices_match_one_device(one_device_run, tmp_path):
    proc = run_parallel(tmp_path / "eight.npz", "--devices", "8", "--local-devices", "8")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert_same_run(one_device_run, tmp_path / "eight.npz")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(one_device_run, tmp_path):
    port = str(free_port())
    common = ["--devices", "2", "--num-processes", "2", "--port", port]
    procs = [run_parallel(tmp_path / "multi.npz", *common, "--process-id", str(i)) for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stdout.read() for p in procs]
    assert_same_run(one_device_run, tmp_path / "multi.npz")


def test_smoke_config_end_to_end(smoke_workdir):
    workdir, stdout = smoke_workdir, (smoke_workdir.parent / "train.stdout").read_text()
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["test_accuracy"] <= 1 and np.isfinite(r["train_loss"])
        assert set(r["classification_report"]) >= {"airplane", "truck", "macro avg"}
    assert stdout.count("precision    recall  f1-score") == 2  # sklearn's report, per epoch
    assert "Total Parameters" in (workdir / "model_summary.txt").read_text()
    assert records[-1]["step"] == 2 * (512 // 64)
    # The smoke config has test-time views (eval_flip): the last epoch also reports the single view.
    assert "test_accuracy_single_view" in records[-1] and "test_accuracy_single_view" not in records[0]
    timings = json.loads((workdir / "timings.json").read_text())
    assert set(timings["seconds"]) == {"startup", "data", "setup", "compile", "epochs", "report"}
    assert sum(timings["seconds"].values()) == pytest.approx(timings["total"], rel=1e-6)
    assert stdout.strip().splitlines()[-1].startswith("Time: startup ")


def test_cpu_devices_splits_the_host_and_matches_one_device(cifar_archive, tmp_path):
    """--config.cpu_devices=2 trains data-parallel over 2 CPU devices; an epoch matches 1 device's."""
    from cifar_jax import train

    common = ["--config", "experiments/smoke.py", f"--config.data.path={cifar_archive}", "--config.log.progress_bar=false",
              "--config.epochs=1", "--config.optim.lr=0.002",  # A small lr keeps float differences from growing.
              "--config.model.conv=xla"]  # The same kernels on both sides (auto would pick oneDNN for 1 device only).
    result = run_module("cifar_jax.train", *common, "--workdir", str(tmp_path / "d2"), "--config.cpu_devices=2",
                        "--config.log.report=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step(s) per dispatch, 2 cpu device(s)" in result.stdout
    # One device: this process's (the CPU devices are fixed once JAX has started, as in a fresh CLI process).
    assert jax.device_count() == 1
    assert train.main([*common, "--workdir", str(tmp_path / "d1"), "--config.log.report=false"]) == 0
    runs = {d: json.loads((tmp_path / f"d{d}" / "metrics.jsonl").read_text().splitlines()[-1]) for d in (1, 2)}
    assert runs[2]["step"] == runs[1]["step"] == 512 // 64
    # Same maths in another reduction order: equal to float tolerance, not bitwise.
    np.testing.assert_allclose(runs[2]["train_loss"], runs[1]["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(runs[2]["test_loss"], runs[1]["test_loss"], rtol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_eval_translate_averages_airbench_views(flip):
    """translate=t: half the (mirror-averaged) logits of the image, a quarter each of it shifted t px up-left/down-right."""
    from cifar_jax.models import eval_logits

    apply_fn = lambda variables, x, train: x[:, 0, 0, :] + variables * x[:, 1, 2, :]  # "logits" that see position
    images = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    x = np.asarray(images)
    view = lambda im: im[:, 0, 0, :] + 2.0 * im[:, 1, 2, :]
    views = (lambda im: 0.5 * (view(im) + view(im[:, :, ::-1]))) if flip else view
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    expected = 0.5 * views(x) + 0.25 * views(padded[:, :6, :6]) + 0.25 * views(padded[:, 2:, 2:])
    np.testing.assert_allclose(eval_logits(apply_fn, 2.0, images, flip, translate=1), expected, rtol=1e-6)
    np.testing.assert_allclose(eval_logits(apply_fn, 2.0, images, flip), views(x), rtol=1e-6)
    assert not np.allclose(expected, views(x))


def test_auto_dtype_is_resolved_once_and_kept_by_a_resumed_run(cifar_archive, tmp_path, monkeypatch, capsys):
    from cifar_jax import onednn, train
    from cifar_jax.config import DTYPES

    workdir = tmp_path / "auto"
    args = ["--config", "experiments/smoke.py", "--workdir", str(workdir), f"--config.data.path={cifar_archive}",
            "--config.model.dtype=auto", "--config.epochs=1", "--config.log.progress_bar=false", "--config.log.report=false"]
    assert train.main(args) == 0
    resolved = json.loads((workdir / "config.json").read_text())["model"]["dtype"]
    assert resolved in DTYPES
    assert f"model.dtype=auto -> {resolved} (" in capsys.readouterr().out
    other = "float32" if resolved == "bfloat16" else "bfloat16"
    monkeypatch.setattr(onednn, "fast_dtype", lambda conv="auto": (other, "a different CPU"))
    assert train.main(args) == 0  # the same workdir on "another CPU": resumes with the dtype it started with
    out = capsys.readouterr().out
    assert f"model.dtype=auto -> {resolved} (as this workdir's run resolved it" in out
    assert json.loads((workdir / "config.json").read_text())["model"]["dtype"] == resolved


def test_run_left_counts_this_epoch_at_its_pace_and_later_epochs_at_their_mean():
    from cifar_jax.progress import format_duration, run_left_s

    # Epoch 1 of 3 (0-based), 10 of 40 steps in 5 s: 30 steps at 0.5 s, then 1 epoch at the mean of 100 and 120 s.
    history = [{"epoch_time_s": 100.0}, {"epoch_time_s": 120.0}]
    assert run_left_s(history, 3, 1, 10, 30, 5.0) == 15.0 + 110.0
    assert run_left_s([], 3, 0, 10, 30, 5.0) == 15.0 + 2 * 20.0  # no finished epoch yet: this epoch's pace
    assert run_left_s(history, 3, 2, 0, 0, 0.0) == 0.0  # after the last epoch
    assert [format_duration(s) for s in (45, 750, 3900)] == ["45s", "12m30s", "1h05m"]


def test_a_new_model_family_is_one_entry_and_trains_reports_and_explains(cifar_archive, tmp_path, monkeypatch):
    """docs/training.md's worked example: a family that is not a ResNet (no stages, no kernel option) trains,
    reports with Grad-CAM at its own last CAM layer, and resumes, from one FAMILIES entry."""
    import flax.linen as nn

    from cifar_jax import config as config_module
    from cifar_jax import inference, models, train

    class PlainCNN(nn.Module):
        width: int = 8
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
            x = nn.relu(norm("bn1")(nn.Conv(self.width, (3, 3), name="block1")(x)))
            x = nn.relu(norm("bn2")(nn.Conv(2 * self.width, (3, 3), strides=2, name="block2")(x)))
            return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

    family = models.Family({"plaincnn": PlainCNN}, lambda m, num_classes, conv=None: dict(width=m.width, num_classes=num_classes),
                           cam_layers=("block1", "block2"), param_groups=("head", "block2", "block1"))
    # Editing FAMILIES in the source adds the entry before MODELS and the config rule are derived; here, patch all three.
    monkeypatch.setattr(models, "FAMILIES", (*models.FAMILIES, family))
    monkeypatch.setitem(models.MODELS, "plaincnn", PlainCNN)
    monkeypatch.setitem(config_module.RULES, "model.name", config_module.choice(*models.MODELS))
    workdir = tmp_path / "plain"
    argv = ["--config", "experiments/smoke.py", "--workdir", str(workdir), "--config.model.name=plaincnn",
            "--config.model.width=8", f"--config.data.path={cifar_archive}", "--config.log.progress_bar=false"]
    assert train.main(argv) == 0
    assert "Grad-CAM at block2 for the predicted class" in (workdir / "REPORT.md").read_text()
    trained = inference.load_trained(workdir)
    assert isinstance(trained.model, PlainCNN) and trained.cam_layer == "block2"
    assert train.main(argv) == 0  # A finished run: nothing to do, no error.


def test_the_initial_state_compiled_to_run_once_equals_the_optimised_one(xla_optimized):
    """create_sharded_state's program skips XLA's optimisation (train_lib.RUN_ONCE): the values of the program XLA
    optimises fully (the fixture: the suite's own setting turns most optimisation off) up to float rounding (the
    scaling of uniform draws rounds differently: 1 ulp), and the same bits every time. On a conv + BatchNorm + dense
    model with the ResNets' initialisers: a whole ResNet's optimised init takes 10-15 s to compile."""
    import flax.linen as nn

    from cifar_jax.models.resnet import INITS

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(8, (3, 3), use_bias=False, kernel_init=INITS["pytorch"].conv)(x)
            x = nn.BatchNorm(use_running_average=not train)(x).mean((1, 2))
            return nn.Dense(10, kernel_init=INITS["pytorch"].head, bias_init=INITS["pytorch"].head_bias(8))(x)

    config = base_config()
    mesh = train_lib.make_mesh(jax.devices()[:1])
    model, tx = Small(), train_lib.make_optimizer(config.optim, 10)
    quick = train_lib.create_sharded_state(model, tx, 3, mesh)
    optimised = jax.jit(lambda key: train_lib.create_train_state(model, tx, key))(jax.random.key(3))
    for a, b in zip(jax.tree.leaves((quick.params, quick.batch_stats, quick.opt_state)),
                    jax.tree.leaves((optimised.params, optimised.batch_stats, optimised.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    assert jax.random.key_data(quick.rng).tolist() == jax.random.key_data(optimised.rng).tolist()
    again = train_lib.create_sharded_state(model, tx, 3, mesh)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(quick.params), jax.tree.leaves(again.params)))
