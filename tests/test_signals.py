"""Signals at any moment of any command: one line on stderr, exit 128 + signal, nothing half-written."""

import os
import signal
import subprocess
import sys
import time

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
    runtime._interrupted = False


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
    runtime._interrupted = False


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
