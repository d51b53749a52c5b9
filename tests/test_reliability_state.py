"""Issue 12: damaged checkpoints, flipped bits, a full disk, two runs on one workdir, a changed config on resume."""

import errno
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cifar_jax import checkpoints as ckpt, onednn
from cifar_jax.checkpoints import CheckpointError, make_manager
from cifar_jax.inference import load_trained
from tests.conftest import ROOT, run_module
from tests.test_checkpoints import assert_bitwise_equal, metrics, overrides, run


def copy_of(reference, tmp_path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    return workdir


def array_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def truncate_array_file(step_dir):
    # Every data file: which arrays tensorstore puts in which file varies, and load_trained reads params only.
    for p in array_files(step_dir):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_a_bit(step_dir):
    for p in array_files(step_dir):  # One bit in the middle of every data file (see truncate_array_file).
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x10
        p.write_bytes(bytes(data))


def rewrite_step(step_dir, change_tree=None, change_meta=None):
    """Saves ``step_dir``'s step again with its arrays and meta changed; the checksums match the new arrays."""
    workdir, step = step_dir.parent.parent, int(step_dir.name)
    manager = make_manager(workdir)
    meta = ckpt.read_meta(manager, step)
    tree = jax.tree.map(np.array, manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"])
    manager.close()
    if change_tree:
        change_tree(tree)
        meta["checksums"] = ckpt.tree_checksums(tree)
    if change_meta:
        change_meta(meta)
    shutil.rmtree(step_dir)
    manager = make_manager(workdir)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    manager.close()


def edit_meta(step_dir, change):
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated array file": truncate_array_file,
    "flipped bit": flip_a_bit,
    "deleted manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "garbage meta": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "missing meta": lambda d: (d / "meta" / "metadata").unlink(),
    "meta without config": lambda d: (d / "meta" / "metadata").write_text("{}"),
    "deleted state dir": lambda d: shutil.rmtree(d / "state"),
    "NaN in params": lambda d: rewrite_step(d, change_tree=lambda t: t["params"]["head"]["kernel"].flat.__setitem__(3, np.nan)),
    "meta key renamed": lambda d: edit_meta(d, lambda m: m.update(progres=m.pop("progress"))),
    "meta with an unknown progress field": lambda d: edit_meta(d, lambda m: m["progress"].update(lr=0.1)),
}


# Training and load_trained detect damage with the same code (checkpoints.load_intact), and
# test_load_trained_falls_back_to_the_newest_intact_step sees every kind of damage: a resumed run is trained for one
# kind of each family (array bytes, array structure, meta, values) and for the one only a resume reads (opt_state).
RESUMED = ("flipped bit", "truncated array file", "deleted manifest", "garbage meta", "NaN in params")


@pytest.mark.parametrize("damage", RESUMED)
def test_damaged_newest_checkpoint_warns_and_resume_from_older_is_exact(reference, cifar_archive, tmp_path, capsys, damage):
    workdir = copy_of(reference, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "24")
    capsys.readouterr()
    assert run(workdir, cifar_archive) == 0
    captured = capsys.readouterr()
    warnings = [l for l in captured.err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 24 is damaged (" in warnings[0] and "using step 16" in warnings[0]
    assert "Traceback" not in captured.err and "Resuming from step 16" in captured.out
    aside = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("damaged-24-")]
    assert len(aside) == 1  # Kept, out of orbax's way; the new step 24 took its name.
    assert make_manager(workdir, read_only=True).all_steps() == [16, 24]
    assert_bitwise_equal(reference, workdir)


@pytest.mark.parametrize("damage", [d for d in DAMAGE if d != "flipped bit"])  # That bit lies in opt_state.
def test_load_trained_falls_back_to_the_newest_intact_step(reference, tmp_path, capsys, damage):
    workdir = copy_of(reference, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "24")
    capsys.readouterr()
    assert load_trained(workdir, "latest").step == 16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint step 24 is damaged (") and err[0].endswith("using step 16")
    assert (workdir / "checkpoints" / "24").is_dir()  # Read-only consumers move nothing.
    with pytest.raises(CheckpointError, match="checkpoint step 24 is damaged"):
        load_trained(workdir, 24)


def tamper_params(workdir, step):
    """Rewrites ``step`` with one bit of one parameter flipped and the meta (with its checksums) unchanged."""
    manager = make_manager(workdir)
    meta = ckpt.read_meta(manager, step)
    tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    tree = jax.tree.map(np.array, tree)  # Writable host copies.
    kernel = tree["params"]["head"]["kernel"]
    kernel.view(np.uint32).flat[3] ^= 1 << 30  # An exponent bit: 1e-2 becomes ~1e36.
    manager.close()
    shutil.rmtree(ckpt.checkpoint_dir(workdir) / str(step))
    manager = make_manager(workdir)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    manager.close()


def test_flipped_bit_in_params_is_caught_by_checksum(reference, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    tamper_params(workdir, 24)
    capsys.readouterr()
    trained = load_trained(workdir, "latest")
    assert trained.step == 16
    err = capsys.readouterr().err
    assert "checkpoint step 24 is damaged (state/: sha256 mismatch in params)" in err


def test_best_is_the_best_intact_step(reference, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    history = metrics(reference)
    steps = make_manager(workdir, read_only=True).all_steps()
    ranked = [r["step"] for r in sorted(history, key=lambda r: (r["test_accuracy"], r["step"]), reverse=True) if r["step"] in steps]
    (workdir / "checkpoints" / str(ranked[0]) / "meta" / "metadata").write_text("garbage")
    capsys.readouterr()
    assert load_trained(workdir, "best").step == ranked[1]
    assert f"checkpoint step {ranked[0]} is damaged" in capsys.readouterr().err


def test_no_intact_checkpoint_is_one_line_error(reference, cifar_archive, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    for step in make_manager(workdir, read_only=True).all_steps():
        (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("garbage")
    capsys.readouterr()
    assert run(workdir, cifar_archive) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no intact checkpoint in") and "--config.fresh=True" in err[0]
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_trained(workdir)


def test_explain_and_report_use_the_intact_step(reference, tmp_path):
    workdir = copy_of(reference, tmp_path)
    truncate_array_file(workdir / "checkpoints" / "24")
    result = run_module("cifar_jax.report", "--workdir", str(workdir), "--step", "latest", "--num", "2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    damaged = [l for l in result.stderr.splitlines() if "checkpoint step 24 is damaged" in l]
    assert len(damaged) == 1 and damaged[0].startswith("warning: ") and damaged[0].endswith("using step 16"), result.stderr
    assert "step 16" in (workdir / "REPORT.md").read_text()


def test_disk_full_during_save_is_one_line_and_resume_is_exact(reference, cifar_archive, tmp_path, monkeypatch, capsys):
    real = ocp.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if Path(str(directory)).parent.name.startswith("16."):  # The temporary directory of step 16.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(str(directory)) / "metadata"))
        return await real(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    assert run(tmp_path, cifar_archive) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: cannot save checkpoint step 16: No space left on device (")
    assert "the last good checkpoint is step 8; free space and run the same command to resume" in err[0]
    assert make_manager(tmp_path, read_only=True).all_steps() == [8]
    assert load_trained(tmp_path, "latest").step == 8
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real)
    assert run(tmp_path, cifar_archive) == 0
    assert_bitwise_equal(reference, tmp_path)


def test_second_run_on_a_locked_workdir_is_refused(reference, cifar_archive, tmp_path, capsys):
    """While another run holds DIR/.lock (an flock: a second open file conflicts even in one process), a run is
    refused in one line naming the holder, touching nothing; once released, the same command trains as if alone."""
    from cifar_jax.workdir import WorkdirLock

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = WorkdirLock(workdir).acquire()
    capsys.readouterr()
    assert run(workdir, cifar_archive) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by another training run (pid {os.getpid()})" in err[0]
    assert [p.name for p in workdir.iterdir()] == [".lock"]  # Nothing written.
    holder.release()
    assert run(workdir, cifar_archive) == 0
    assert_bitwise_equal(reference, workdir)


@pytest.mark.parametrize("changes, expected", [
    ({"epochs": 5, "batch_size": 16}, "batch_size 32 -> 16, epochs 3 -> 5"),
    ({"optim.name": "adamw"}, "optim.name 'sgd' -> 'adamw'"),
    ({"model.dtype": "bfloat16"}, "model.dtype 'float32' -> 'bfloat16'"),
    ({"seed": 1, "augment.flip": False}, "augment.flip True -> False, seed 0 -> 1"),
])
def test_changed_config_on_resume_is_refused_untouched(reference, cifar_archive, tmp_path, capsys, changes, expected):
    workdir = copy_of(reference, tmp_path)
    snapshot = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    capsys.readouterr()
    assert run(workdir, cifar_archive, **changes) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was trained with a different config ({expected}); use the same config to resume" in err[0]
    assert "--config.fresh=True" in err[0]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == snapshot
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 3


def test_execution_and_logging_fields_may_change_on_resume(reference, cifar_archive, tmp_path):
    workdir = copy_of(reference, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "24")  # Resume at epoch 3 (cpu_devices and distributed.* also may change).
    # data.cache=False would decode the whole archive again (~9 s): it is resumable by the same rule (checked below).
    changes = {"eval_batch_size": 64, "checkpoint.keep": 3, "data.download": False, "log.tensorboard": False,
               "steps_per_dispatch": 2}
    assert run(workdir, cifar_archive, **changes) == 0
    rows = metrics(workdir)
    assert rows[:2] == metrics(reference)[:2] and [r["epoch"] for r in rows] == [1, 2, 3]
    assert "data.cache" in ckpt.RESUMABLE_FIELDS


def test_other_data_at_the_same_config_is_refused(reference):
    from cifar_jax.config import apply_overrides, load_config

    meta = ckpt.read_meta(make_manager(reference, read_only=True), 24)
    config = apply_overrides(load_config(ROOT / "experiments" / "smoke.py"), [o.removeprefix("--config.") for o in overrides(meta["config"]["data"]["path"])])
    assert ckpt.describe_mismatch(meta["config"], config, 10, 10, meta, dict(meta)) is None
    why = ckpt.describe_mismatch(meta["config"], config, 10, 10, meta, {**meta, "mean": [0.0, 0.0, 0.0]})
    assert "data at data.path differs from the data trained on (mean)" in why


@pytest.mark.parametrize("backend, conv, fast", [("cpu", "xla", False), ("gpu", "xla", True), (None, "onednn", True)])
def test_the_predictor_uses_the_trained_kernels_or_this_machines_fast_ones(reference, tmp_path, backend, conv, fast):
    """A checkpoint made here keeps the kernels its evaluation used; one from another backend (a GPU run's) gets
    this machine's fast ones (model.conv=auto); a checkpoint that names no backend counts as made here."""
    def recorded(meta):
        meta["conv"] = conv
        meta.pop("backend", None)
        meta.update({"backend": backend} if backend else {})

    workdir = copy_of(reference, tmp_path)
    for step_dir in (workdir / "checkpoints").iterdir():
        edit_meta(step_dir, recorded)
    trained = load_trained(workdir)
    assert (trained.network is not trained.model) == fast
    assert (getattr(trained.network, "conv_general_dilated", None) is not None) == (fast and onednn.available())
