"""The first lines a command runs: from here on a signal ends it in one line, even during the heavy imports.

Each CLI module calls ``install()`` before it imports jax, flax or optax (seconds of imports, when a person is
likeliest to press Ctrl-C on a mistyped command). Until the command's own handling takes over (``runtime.run_cli``,
and in ``train`` the epoch loop's save-and-stop), SIGINT, SIGTERM and SIGHUP print one line and exit 128 + the
signal's number: 130, 143, 129. Nothing has been written yet at that point, so ``os._exit`` loses nothing; after
``run_cli`` has returned (``finished``) everything is written and closed, and the same holds. Standard library
only: this module must not itself be slow to import.
"""

from __future__ import annotations

import os
import signal
import threading

# The signals every command answers in one line, and how the line names them (no SIGHUP on Windows).
SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
if hasattr(signal, "SIGHUP"):
    SIGNALS[signal.SIGHUP] = "SIGHUP: the terminal closed"


def describe(signum: int) -> str:
    """"Ctrl-C", "SIGTERM", ... for a signal number."""
    return SIGNALS.get(signum) or signal.Signals(signum).name


_when = "while starting; nothing was written"  # What the line says; ``finished()`` changes it.


def _exit_now(signum, frame):
    os.write(2, f"\ninterrupted ({describe(signum)}) {_when}\n".encode())
    os._exit(128 + signum)


def finished() -> None:
    """The command's work is over (``runtime.run_cli`` returned): a signal now only cuts the interpreter's exit short."""
    global _when
    _when = "while exiting; everything was written"


def install() -> None:
    """SIGINT, SIGTERM, SIGHUP -> one line on stderr and exit 128 + signal (main thread only; else nothing)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _exit_now)
