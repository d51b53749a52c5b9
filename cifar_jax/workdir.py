"""A run's workdir over its lifecycle: the lock, the compatibility check, damaged checkpoints set aside, metrics.

``open_workdir`` refuses, touching nothing, a workdir holding another model, a run with a different config or
another live training run, then locks it; ``set_aside_damaged`` moves damaged checkpoints newer than the one
resumed out of orbax's sight; ``write_metrics_file`` rewrites ``metrics.jsonl`` to match the resumed history.
Training itself is in ``cifar_jax.train``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import jax

from cifar_jax import checkpoints as ckpt
from cifar_jax.errors import UserError
from cifar_jax.files import write_text_atomic


class WorkdirError(UserError):
    """A workdir that cannot be used for this run (one-line message, exit code 1)."""


class WorkdirLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.lock`` holding the holder's pid; the OS drops it when the process dies."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self.fd = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirError naming the holder's pid (the file is not changed then)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EWOULDBLOCK: another process holds it.
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirError(f"workdir {str(self.path.parent)!r} is in use by another training run (pid {holder}); "
                             "wait for it to finish, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # Closing drops the flock; the file (with the last pid) stays.
            self.fd = None


class _NoLock:
    def release(self) -> None:
        pass


def open_workdir(workdir: Path, config, num_classes: int, meta: dict | None = None):
    """(checkpoint manager, lock) of the workdir, locked for this run.

    Refuses in one line, touching nothing, a workdir that holds another model or a run with a different
    config (``checkpoints.describe_mismatch``; ``meta`` is this run's, to compare the data) or that
    another training run holds. Only the main process locks (the others share its workdir).
    """
    existing = ckpt.checkpoint_dir(workdir)
    if not config.fresh and existing.exists():
        probe = ckpt.make_manager(workdir, read_only=True)
        try:
            for step in sorted(probe.all_steps(), reverse=True):
                try:
                    saved = ckpt.read_meta(probe, step)
                except Exception:
                    continue  # Damaged: restore_or_start reports it; compare with the newest readable one.
                if ckpt.meta_problem(saved, training=True):
                    continue  # Likewise (e.g. written by another version).
                saved_config, saved_classes = saved["config"], len(saved["class_names"])
                why = ckpt.describe_mismatch(saved_config, config, num_classes, saved_classes, saved, meta)
                if why:
                    raise WorkdirError(f"workdir {str(workdir)!r} {why}")
                break
        finally:
            probe.close()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else _NoLock()
    try:
        if config.fresh and existing.exists():
            shutil.rmtree(existing)  # Only our own files: checkpoints and what is derived from them.
            for name in ("metrics.jsonl", "REPORT.md"):
                (workdir / name).unlink(missing_ok=True)
        return ckpt.make_manager(workdir, keep=config.checkpoint.keep), lock
    except BaseException:
        lock.release()
        raise


def set_aside_damaged(manager, workdir: Path, loaded: ckpt.Loaded, is_main: bool) -> None:
    """Moves the damaged steps ``load_intact`` skipped (all newer than the one used) aside, with one warning each."""
    for d in loaded.damaged:
        aside = ckpt.move_aside(workdir, d.step) if is_main else None
        if is_main:
            print(f"warning: {d}; using step {loaded.step} (the damaged one is kept as checkpoints/"
                  f"{aside.name}/)", file=sys.stderr)
    if loaded.damaged:
        sync_hosts("cifar_jax_moved_damaged")
        manager.reload()


def sync_hosts(name: str) -> None:
    """Waits for every process (a no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_metrics_file(workdir: Path, history: list[dict]) -> None:
    """Rewrites ``metrics.jsonl`` from ``history`` atomically."""
    write_text_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
