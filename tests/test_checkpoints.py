"""Checkpoints, exact resume, interruption and failure behaviour of the trainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cifar_jax import feeds, train, train_lib
from cifar_jax.checkpoints import CheckpointError, make_manager
from cifar_jax.inference import load_trained
from tests.conftest import ROOT

TIME_FIELDS = {"train_time_s", "epoch_time_s"}


def overrides(archive, **extra):
    base = {
        "data.path": str(archive), "model.name": "resnet10", "data.max_train": 256, "data.max_test": 128,
        "batch_size": 32, "epochs": 3, "log.progress_bar": False, "log.report": False,
    }
    base.update(extra)
    return [f"--config.{k}={v}" for k, v in base.items()]


def run(workdir, archive, **extra):
    """train.main in this process; returns the exit code."""
    return train.main(["--config", "experiments/smoke.py", "--workdir", str(workdir), *overrides(archive, **extra)])


def metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in TIME_FIELDS} for l in lines]


def params(workdir, step="latest"):
    return jax.tree.leaves(jax.device_get(load_trained(workdir, step).variables))


def assert_bitwise_equal(a_dir, b_dir):
    assert metrics(a_dir) == metrics(b_dir)
    for a, b in zip(params(a_dir), params(b_dir)):
        np.testing.assert_array_equal(a, b)


def test_rerunning_a_finished_run_changes_nothing(reference, cifar_archive):
    before = metrics(reference)
    assert run(reference, cifar_archive) == 0
    assert metrics(reference) == before


@pytest.mark.parametrize("interrupt_at_call", [3, 8])  # mid-epoch 1, and the last step of epoch 1
def test_sigterm_saves_and_resume_is_bitwise_exact(reference, cifar_archive, tmp_path, monkeypatch, capsys, interrupt_at_call):
    real, calls = feeds.HostFeed.dispatch, {"n": 0}

    def interrupting_dispatch(self, *a):
        calls["n"] += 1
        if calls["n"] == interrupt_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)

    monkeypatch.setattr(feeds.HostFeed, "dispatch", interrupting_dispatch)
    assert run(tmp_path, cifar_archive) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"SIGTERM: saved step {interrupt_at_call}" in err and "run the same command again to resume" in err
    assert "('" not in err and err.strip().splitlines()[-1].startswith("SIGTERM: saved step")  # a sentence, not a tuple
    assert make_manager(tmp_path, read_only=True).latest_step() == interrupt_at_call
    monkeypatch.setattr(feeds.HostFeed, "dispatch", real)
    assert run(tmp_path, cifar_archive) == 0
    assert "Resuming from step" in capsys.readouterr().out
    assert_bitwise_equal(reference, tmp_path)


def test_sigkill_mid_run_then_resume_is_bitwise_exact(reference, cifar_archive, tmp_path):
    cmd = [sys.executable, "-m", "cifar_jax.train", "--config", "experiments/smoke.py", "--workdir", str(tmp_path),
           *overrides(cifar_archive, epochs=3)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and metrics_file.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # No handler can run: whatever was on disk is all there is.
    proc.wait()
    assert run(tmp_path, cifar_archive) == 0
    assert_bitwise_equal(reference, tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar_archive, tmp_path, monkeypatch, capsys):
    real = feeds.HostFeed.dispatch

    def make_dispatch(interrupt_at=None, nan=False):
        calls = {"n": 0}

        def dispatch(self, *a):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)
            state, m = real(self, *a)
            return state, ({**m, "loss_sum": m["loss_sum"] * np.nan} if nan else m)  # A diverged step.

        return dispatch

    # Stop after epoch 1 (a changed lr/epochs on resume is refused, so the divergence is simulated).
    monkeypatch.setattr(feeds.HostFeed, "dispatch", make_dispatch(interrupt_at=8))
    assert run(tmp_path, cifar_archive) == 128 + signal.SIGTERM
    good = metrics(tmp_path)
    monkeypatch.setattr(feeds.HostFeed, "dispatch", make_dispatch(nan=True))
    rc = run(tmp_path, cifar_archive)
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss became non-finite at step") and "last good checkpoint: step 8" in err
    assert make_manager(tmp_path, read_only=True).all_steps() == [8]
    assert metrics(tmp_path) == good
    assert np.all(np.isfinite(np.concatenate([p.ravel() for p in params(tmp_path)])))


def test_incompatible_workdir_is_refused_untouched_and_fresh_starts_over(reference, cifar_archive, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    snapshot = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    assert run(workdir, cifar_archive, **{"model.width": 8}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model (model.width 4 -> 8)" in err[0] and "--config.fresh=True" in err[0]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == snapshot
    assert run(workdir, cifar_archive, epochs=1, fresh=True, **{"model.width": 8}) == 0
    assert load_trained(workdir).config.model.width == 8 and len(metrics(workdir)) == 1


def test_keeps_last_k_and_the_best(cifar_archive, tmp_path):
    assert run(tmp_path, cifar_archive, epochs=4, **{"checkpoint.keep": 1}) == 0
    history = metrics(tmp_path)
    best_step = max(history, key=lambda r: (r["test_accuracy"], r["step"]))["step"]
    steps = make_manager(tmp_path, read_only=True).all_steps()
    assert set(steps) == {best_step, history[-1]["step"]}
    assert load_trained(tmp_path, "best").step == best_step
    assert load_trained(tmp_path, "latest").step == history[-1]["step"]


def test_half_written_checkpoint_is_never_loaded(reference, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    latest = make_manager(workdir, read_only=True).latest_step()
    # What a crash mid-save leaves: orbax's temporary directory, never renamed to its final name.
    partial = workdir / "checkpoints" / f"{latest + 100}.orbax-checkpoint-tmp-1234"
    shutil.copytree(workdir / "checkpoints" / str(latest), partial)
    assert make_manager(workdir, read_only=True).latest_step() == latest
    assert load_trained(workdir, "latest").step == latest


def test_load_trained_errors(tmp_path, reference):
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        load_trained(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at step 5"):
        load_trained(reference, 5)
    trained = load_trained(reference)
    assert trained.class_names[0] == "airplane" and trained.mean.shape == (3,)
    assert trained.logits(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 10)


def test_nothing_is_loaded_with_pickle():
    sources = "\n".join(p.read_text() for p in (ROOT / "cifar_jax").rglob("*.py"))
    assert "allow_pickle=True" not in sources
    assert "import pickle" not in sources and "cloudpickle" not in sources


def test_tensorboard_scalars_on_request(cifar_archive, tmp_path):
    pytest.importorskip("tensorboardX")
    assert run(tmp_path, cifar_archive, epochs=1, **{"log.tensorboard": True}) == 0
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"test_accuracy" in events[0].read_bytes()


def test_eval_every_skips_test_metrics_not_training(reference, cifar_archive, tmp_path):
    """eval_every=2 over 3 epochs: epoch 1 has no test metrics, 2 and 3 (the last) match the reference's;
    training is unchanged, the best checkpoint is an evaluated one and the report marks the gap."""
    from cifar_jax import reporting
    from cifar_jax.checkpoints import candidate_steps

    assert run(tmp_path, cifar_archive, eval_every=2) == 0
    ref, got = metrics(reference), metrics(tmp_path)
    assert ["test_accuracy" in r for r in got] == [False, True, True]
    assert "classification_report" not in got[0]
    assert [{k: r[k] for k in ("step", "train_loss", "train_accuracy")} for r in got] == \
           [{k: r[k] for k in ("step", "train_loss", "train_accuracy")} for r in ref]
    assert got[1:] == ref[1:]
    with make_manager(tmp_path, read_only=True) as manager:
        best = candidate_steps(manager, tmp_path, "best")[0]
    assert best in {r["step"] for r in got[1:]}
    report = reporting.build_report(tmp_path)
    text = report.path.read_text()
    assert "| 1 | " in text and "| - | - |" in text
    assert "## Epoch 1\n" not in (tmp_path / "classification_reports.md").read_text()


def test_sigterm_during_the_last_epoch_finishes_it_saves_and_says_so(reference, cifar_archive, tmp_path, monkeypatch,
                                                                     capsys):
    """A signal after the last step, while the last epoch is evaluated and saved, is not dropped: the epoch is saved,
    the report skipped, and the command exits 143 in one line (found by benchmarks/signal_moments.py)."""
    real, calls = feeds.HostFeed.dispatch, {"n": 0}

    def interrupting_dispatch(self, *a):
        calls["n"] += 1
        if calls["n"] == 24:  # The last step of the last epoch (3 of 8 steps each): its evaluation runs on.
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)

    monkeypatch.setattr(feeds.HostFeed, "dispatch", interrupting_dispatch)
    assert run(tmp_path, cifar_archive) == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: the run finished and saved its last epoch (step 24)"), last
    assert make_manager(tmp_path, read_only=True).latest_step() == 24
    assert metrics(tmp_path) == metrics(reference)
