"""Issue 23: the second round of hostile input. Each case is one line on stderr, no traceback, nothing lost.

Damaged checkpoints of new kinds (NaN in the parameters, meta of another version) are also cases of
``DAMAGE`` in tests/test_reliability_state.py, and an explicit data.path that is not the archive asked for
is tested in tests/test_cifar_binary.py; the rest is here.
"""

import asyncio
import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from cifar_jax import checkpoints as ckpt
from cifar_jax import runtime
from cifar_jax.checkpoints import make_manager
from cifar_jax.inference import load_trained
from tests.conftest import ROOT
from tests.test_checkpoints import run

LONG_NAME = "n" * 300  # Over the 255 bytes a file name may have.


def one_error_line(err: str, prefix: str = "error: ") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def library_records(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records if r.name in runtime.LIBRARY_LOGGERS]


# --------------------------------------------------------------------------- 1: Ctrl-C where Python discards it


def test_ctrl_c_raised_in_a_weakref_callback_still_ends_the_command(capfd):
    """A KeyboardInterrupt raised inside a weakref callback is discarded by Python; run_cli delivers it again."""

    class Thing:
        pass

    def body():
        thing = Thing()
        ref = weakref.ref(thing, lambda _: (_ for _ in ()).throw(KeyboardInterrupt))  # noqa: F841
        del thing  # The callback raises; Python prints "Exception ignored in" and goes on.
        time.sleep(5)  # The re-sent SIGINT lands here.
        return 0

    t0 = time.time()
    assert runtime.run_cli(body) == 130
    assert time.time() - t0 < 4
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "KeyboardInterrupt" not in err
    one_error_line(err, "interrupted")


def test_ctrl_c_discarded_just_before_the_end_still_counts(capfd):
    class Thing:
        pass

    def body():
        thing = Thing()
        ref = weakref.ref(thing, lambda _: (_ for _ in ()).throw(KeyboardInterrupt))  # noqa: F841
        del thing
        return 0  # Before the Ctrl-C is delivered again.

    assert runtime.run_cli(body) == 130
    time.sleep(0.2)  # Nothing is delivered after the command ended.
    one_error_line(capfd.readouterr().err, "interrupted")


# --------------------------------------------------------------------------- 2: orbax's abandoned tasks


def test_an_abandoned_task_s_exception_is_not_logged(caplog):
    """What orbax leaves behind after a failed restore: a task whose exception nobody retrieved."""
    runtime.quiet_library_logs()

    async def fails():
        raise ValueError('NOT_FOUND: Error opening "cast" driver')

    loop = asyncio.new_event_loop()
    task = loop.create_task(fails())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()
    assert library_records(caplog) == []


def test_deleted_manifest_falls_back_without_library_logs(reference, tmp_path, caplog, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    (workdir / "checkpoints" / "24" / "state" / "manifest.ocdbt").unlink()
    capsys.readouterr()
    assert load_trained(workdir, "latest").step == 16
    gc.collect()
    assert library_records(caplog) == []
    one_error_line(capsys.readouterr().err, "warning: checkpoint step 24 is damaged (")


# --------------------------------------------------------------------------- 3: disk full in the array writes


def test_disk_full_while_writing_arrays_is_one_line(cifar_archive, tmp_path, monkeypatch, capsys, caplog):
    from orbax.checkpoint._src.serialization import serialization

    real = serialization.async_serialize_from_host

    async def full_disk(rslices, spec, **kwargs):
        if "16.orbax-checkpoint-tmp" in json.dumps(spec, default=str):  # The arrays of step 16, as tensorstore says it.
            raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0": Failed writing: '
                             f'"{tmp_path}/checkpoints/16.orbax-checkpoint-tmp/d/1": Failed to write 123 bytes to file 18: '
                             "No space left on device [os_error_code='28']")
        return await real(rslices, spec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk)
    assert run(tmp_path, cifar_archive) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: cannot save checkpoint step 16: No space left on device (") and "step 8" in line
    assert library_records(caplog) == []  # orbax logs each failing thread with a traceback; held and dropped
    assert make_manager(tmp_path, read_only=True).all_steps() == [8]


def test_library_logs_pass_when_nothing_failed(caplog):
    with runtime.library_logs_held():
        logging.getLogger("absl").error("kept")
    assert library_records(caplog) == ["absl: kept"]


# --------------------------------------------------------------------------- 4: a path component over 255 bytes


def cli(name):
    from cifar_jax import explain, report, train

    return {"train": train.main, "explain": explain.main, "report": report.main}[name]


@pytest.mark.parametrize("command", ["train", "explain", "report"])
def test_workdir_name_too_long_is_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / LONG_NAME
    args = ["--workdir", str(workdir)] + (["--config", "experiments/smoke.py"] if command == "train" else [])
    assert cli(command)(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot use '{workdir}" in line and "File name too long; use shorter names" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["auto", "folder", "cifar10"])
def test_data_path_name_too_long_is_one_line(source, tmp_path, capsys, monkeypatch):
    from cifar_jax import train

    monkeypatch.chdir(ROOT)
    data = tmp_path / LONG_NAME
    rc = train.main(["--config", "experiments/smoke.py", "--workdir", str(tmp_path / "w"),
                     f"--config.data.source={source}", f"--config.data.path={data}"])
    line = one_error_line(capsys.readouterr().err)
    assert rc in (1, 2) and str(data) in line and "File name too long" in line
    assert not (tmp_path / "w").exists()


def test_os_error_without_a_path_is_one_line(capsys):
    def body():
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    assert runtime.run_cli(body) == 1
    assert one_error_line(capsys.readouterr().err) == "error: Input/output error; the disk reported an I/O error; check it"


# --------------------------------------------------------------------------- 5: a read-only workdir


def read_only_below(monkeypatch, root: Path):
    """Every open for writing, mkdir and lock file under ``root`` fails as on a read-only file system."""
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        return str(path).startswith(str(root))

    def ro_open(path, flags, *args, **kwargs):
        if refuse(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if refuse(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def snapshot(workdir: Path) -> dict:
    return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_read_only_workdir_fresh_train_and_rerun_are_one_line(reference, cifar_archive, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    before = snapshot(workdir)
    read_only_below(monkeypatch, tmp_path)
    capsys.readouterr()
    assert run(tmp_path / "fresh", cifar_archive) == 1
    assert "Read-only file system; use a writable location" in one_error_line(capsys.readouterr().err)
    assert run(workdir, cifar_archive) == 1  # A finished run: refused at the lock.
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot use {str(workdir / '.lock')!r}: Read-only file system" in line
    monkeypatch.undo()
    assert snapshot(workdir) == before and not (tmp_path / "fresh").exists()


def test_read_only_workdir_explain_without_out_names_the_flag(reference, tmp_path, monkeypatch, capsys):
    from cifar_jax import explain

    read_only_below(monkeypatch, reference / "explain")
    assert explain.main(["--workdir", str(reference), "--num", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot create the output folder" in line and "give another (writable) folder with --out DIR" in line


def test_read_only_workdir_report_is_one_line_and_keeps_the_old_files(smoke_workdir, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    from cifar_jax import report

    workdir = tmp_path / "copy"
    shutil.copytree(smoke_workdir, workdir)
    before = snapshot(workdir)

    def read_only_savefig(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only_savefig)
    assert report.main(["--workdir", str(workdir), "--num", "2"]) == 1
    assert "Read-only file system; use a writable location" in one_error_line(capsys.readouterr().err)
    assert snapshot(workdir) == before


def test_read_only_cache_is_a_warning_and_the_data_is_used(image_tree, tmp_path, monkeypatch, capsys):
    from cifar_jax import data

    def read_only(file, *args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))

    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_save_npz", read_only)
    assert data.load_folder(image_tree, progress=False).num_classes == 3
    line = one_error_line(capsys.readouterr().err, "warning: cannot write the data cache ")
    assert "Read-only file system; going on without it" in line


def test_unusable_compilation_cache_is_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "file" / "cache"))  # Below a file: ENOTDIR.
    monkeypatch.delenv("CIFAR_JAX_NO_COMPILE_CACHE", raising=False)
    runtime.enable_compilation_cache()
    line = one_error_line(capsys.readouterr().err, "warning: cannot use the compilation cache ")
    assert "Not a directory; going on without it" in line


# --------------------------------------------------------------------------- 8: meta of another version (7: test_cifar_binary.py)


def test_progress_fields_match_the_trainer():
    from cifar_jax.progress import Progress

    assert list(ckpt.PROGRESS_FIELDS) == [f.name for f in dataclasses.fields(Progress)]


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.pop("progress"), "lacks progress"),
    (lambda m: m.update(progres=m.pop("progress")), "lacks progress"),
    (lambda m: m.update(extra=1), "unknown key(s) extra"),
    (lambda m: m["progress"].update(lr=0.1), "progress has fields"),
    (lambda m: m["progress"].pop("count"), "progress has fields"),
    (lambda m: m.update(history=[{"epoch": 1}]), "history record lacks its step"),
    (lambda m: m.update(mean=[0.5]), "mean/std are not 3 channels"),
    (lambda m: m.update(config=[]), "config is a list, not a dict"),
])
def test_meta_of_another_version_is_a_problem(reference, change, expected):
    manager = make_manager(reference, read_only=True)
    meta = ckpt.read_meta(manager, manager.latest_step())
    assert ckpt.meta_problem(meta, training=True) is None
    change(meta)
    assert expected in ckpt.meta_problem(meta, training=True)


# --------------------------------------------------------------------------- 6: NaN in a checkpoint whose checksums match


def test_nan_in_params_is_named_and_the_older_step_is_used(reference, tmp_path, capsys):
    from tests.test_reliability_state import DAMAGE

    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    DAMAGE["NaN in params"](workdir / "checkpoints" / "24")
    capsys.readouterr()
    assert load_trained(workdir, "latest").step == 16
    line = one_error_line(capsys.readouterr().err, "warning: ")
    assert "checkpoint step 24 is damaged (state/: NaN or infinite values in params); using step 16" in line


def test_damaged_metrics_file_is_one_line_for_the_report(tmp_path, capsys):
    from cifar_jax import report

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "lr": 0.1, '
                                            '"epoch_time_s": 1.0}\n{"epoch": 2, "trai\n')
    assert report.main(["--workdir", str(tmp_path)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'metrics.jsonl'} line 2 is damaged (" in line and "run the training command again" in line
