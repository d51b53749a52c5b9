"""Signals at any moment of any command: one line on stderr, exit 128 + signal, nothing half-written; caches that
heal: a damaged entry costs one warning line, once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_jax import runtime
from tests.conftest import ROOT

COMMANDS = {
    "train": ["--config", "experiments/smoke.py", "--workdir", "{tmp}/w"],
    "explain": ["--workdir", "{tmp}/w"],
    "report": ["--workdir", "{tmp}/w"],
}


@pytest.mark.parametrize("command,signum", [("train", signal.SIGINT), ("train", signal.SIGHUP),
                                            ("explain", signal.SIGTERM), ("report", signal.SIGHUP)])
def test_a_signal_while_importing_ends_the_command_in_one_line(command, signum, tmp_path):
    """0.5 s after the start each command is still importing jax, flax and optax (2-3 s here): no traceback, and
    nothing written. train and explain import them first (cifar_jax.early answers), report within run_cli."""
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    proc = subprocess.Popen([sys.executable, "-m", f"cifar_jax.{command}", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted ("), err[-2000:]
    assert ("while starting" in lines[0]) == (command != "report"), lines
    assert out == "" and not list(tmp_path.iterdir())  # Nothing printed or written yet.


@pytest.mark.parametrize("signum,name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"),
                                         (signal.SIGHUP, "SIGHUP: the terminal closed")])
def test_run_cli_turns_each_signal_into_one_line_and_its_exit_status(signum, name, capsys):
    def body():
        os.kill(os.getpid(), signum)
        time.sleep(10)  # The handler raises here.
        return 0

    started = time.time()
    assert runtime.run_cli(body) == 128 + signum
    assert time.time() - started < 5
    assert capsys.readouterr().err.strip() == f"interrupted ({name}); nothing was left half-written"
    assert signal.getsignal(signal.SIGTERM) is not runtime._on_signal  # The caller's handlers are back.


def test_a_signal_python_would_discard_is_delivered_again(capsys):
    """SIGTERM landing in a finalizer (``__del__``) is re-sent 50 ms later instead of printed as "Exception ignored"."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # The handler runs in here and defers the signal.

    def body():
        Finalized()  # Collected at once: __del__ runs, the signal is deferred...
        time.sleep(10)  # ...and raised here.
        return 0

    assert runtime.run_cli(body) == 143
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and err.strip() == "interrupted (SIGTERM); nothing was left half-written"


def test_sigterm_to_a_sweep_stops_its_runs_too(cifar_archive, tmp_path):
    """The sweep passes SIGTERM on to the run it started (which saves and exits 143), then exits 143 itself."""
    proc = subprocess.Popen([sys.executable, "-m", "cifar_jax.sweep", "--config", "experiments/smoke.py", "--workdir",
                             str(tmp_path / "s"), "--variant", "a=", "--set", f"data.path={cifar_archive}",
                             "--set", "epochs=50"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "s" / "a" / "seed0.log"
    deadline = time.time() + 120
    while "epoch 1:" not in (log.read_text() if log.exists() else ""):  # The run is training.
        assert time.time() < deadline and proc.poll() is None, (proc.poll(), log.read_text() if log.exists() else "")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "interrupted (SIGTERM); nothing was left half-written"
    assert "SIGTERM: saved step" in log.read_text() and "run the same command again to resume" in log.read_text()


def test_a_damaged_compilation_cache_entry_costs_one_warning_once_and_is_rebuilt(tmp_path):
    """Entries cut short (a crash or a full disk while JAX wrote them): one warning line on the next run, the same
    results, and the entries written again, so the run after that is silent."""
    env = {**os.environ, "CIFAR_JAX_CACHE": str(tmp_path)}
    env.pop("CIFAR_JAX_NO_COMPILE_CACHE", None)
    run = lambda: subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "cached_compile.py")], cwd=ROOT,
                                 capture_output=True, text=True, env=env, timeout=120)
    first = run()
    assert first.returncode == 0 and first.stderr == "", first.stderr
    entries = sorted((tmp_path / "jax").glob(runtime.COMPILE_ENTRY))
    assert len(entries) >= 2
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # Cut short...
        os.utime(entry, ns=(0, 0))  # ...long ago (entries being written just now are left for the next run).
    second = run()
    assert second.returncode == 0 and second.stdout == first.stdout, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: removed {len(entries)} damaged entries"), second.stderr
    rebuilt = sorted((tmp_path / "jax").glob(runtime.COMPILE_ENTRY))
    assert [e.name for e in rebuilt] == [e.name for e in entries] and all(e.stat().st_size > 100 for e in rebuilt)
    for entry in rebuilt:
        os.utime(entry, ns=(0, 0))
    third = run()
    assert third.returncode == 0 and third.stderr == "" and third.stdout == first.stdout, third.stderr


def test_compilation_cache_entries_are_read_once(tmp_path, monkeypatch):
    """A whole entry is read on the first run only; one that is still being written (recent) is left alone."""
    from jax._src.compilation_cache import compress_executable

    old, recent = tmp_path / "a-cache", tmp_path / "b-cache"
    for entry in (old, recent):
        entry.write_bytes(compress_executable(b"executable"))
    os.utime(old, ns=(0, 0))
    recent.write_bytes(b"half written")
    assert runtime.heal_compilation_cache(tmp_path) == []  # The recent one waits.
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or b"")
    assert runtime.heal_compilation_cache(tmp_path) == [] and read == []
    assert json.loads((tmp_path / runtime.CHECKED).read_text()).keys() == {"a-cache"}


def test_a_signal_whose_exception_library_code_swallowed_is_sent_again(capsys):
    """A bare ``except:`` (as around optional imports) swallows the KeyboardInterrupt: 0.5 s later the signal comes
    again, and the command still ends in one line instead of running to the end."""

    def body():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # noqa: B036  What some libraries do.
            pass
        time.sleep(10)  # The signal, sent again, is raised here.
        return 0

    started = time.time()
    assert runtime.run_cli(body) == 130
    assert time.time() - started < 5
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C); nothing was left half-written"
