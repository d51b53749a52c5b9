"""Process set-up shared by the command-line front ends: logs, caches, devices, error handling.

Nothing here computes; each function is called once at the start of a CLI.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from cifar_jax.errors import UserError


def default_cache_dir() -> Path:
    """``$CIFAR_JAX_CACHE`` or ``$XDG_CACHE_HOME/cifar_jax`` (``~/.cache/cifar_jax``): data and compile caches."""
    if os.environ.get("CIFAR_JAX_CACHE"):
        return Path(os.environ["CIFAR_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cifar_jax"


def quiet_library_logs() -> None:
    """Hides orbax/absl INFO and WARNING chatter (e.g. about read-only managers) from the CLI output."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in ``default_cache_dir() / "jax"`` (off with CIFAR_JAX_NO_COMPILE_CACHE=1)."""
    import jax

    if os.environ.get("CIFAR_JAX_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def initialize_devices(config) -> None:
    """Splits the CPU into ``config.cpu_devices`` JAX devices and joins a multi-host job if configured.

    Must run before anything starts a JAX backend. ``config.distributed`` (or the
    ``JAX_COORDINATOR_ADDRESS`` environment) names the coordinator for ``jax.distributed.initialize``.
    """
    import jax

    if config.get("cpu_devices", 0) > 0:
        jax.config.update("jax_num_cpu_devices", config.cpu_devices)
    d = config.distributed
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def _is_orbax_teardown_noise(unraisable) -> bool:
    """Orbax's read coroutines, abandoned when a damaged checkpoint fails to restore, report
    "Event loop is closed" when collected later: noise about a failure already reported in one line."""
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    from_orbax = code is not None and "orbax" in code.co_filename
    return from_orbax or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")


def _quiet_unraisable(default_hook):
    def hook(unraisable):
        if not _is_orbax_teardown_noise(unraisable):
            default_hook(unraisable)

    return hook


def _where_python_discards_exceptions(frame) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback (JAX registers one) or a ``__del__``, where a
    KeyboardInterrupt would be printed as "Exception ignored" and lost."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame):
    """Ctrl-C as KeyboardInterrupt, sent again 50 ms later if it arrived where Python would discard it."""
    if _where_python_discards_exceptions(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from one heap that is neither trimmed nor bypassed by mmap.

    XLA:CPU allocates each train step's temporaries anew (466 MB at width 16, batch 256) and glibc hands a
    block that large out as fresh mmap pages, so every step paid ~80,000 page faults, 10-20% of its time
    here (docs/benchmarks.md). One arena, no mmap and no trimming reuse the same pages instead; the
    process keeps its peak memory. Call before JAX starts threads. CIFAR_JAX_MALLOC=default turns it off.
    Returns whether the settings took.
    """
    if os.environ.get("CIFAR_JAX_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # Not glibc (e.g. musl): nothing to tune.
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # From glibc's <malloc.h>.
    return all(mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


def run_cli(main: Callable[[], int]) -> int:
    """Runs a CLI body: a ``UserError`` prints ``error: <one line>`` and returns its exit code; Ctrl-C returns 130.

    Returns the body's own exit code otherwise. Library logs are quietened and glibc told to keep freed
    memory (``keep_freed_memory``) first.
    """
    keep_freed_memory()
    quiet_library_logs()
    sys.unraisablehook = _quiet_unraisable(sys.__unraisablehook__)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if in_main_thread else None
    try:
        return main()
    except UserError as e:
        print(f"{e.prefix}{e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        global _interrupted
        _interrupted = True
        print("\ninterrupted (Ctrl-C); nothing was left half-written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


_interrupted = False  # Set by run_cli when Ctrl-C ended the command.


def exit_process(code: int) -> None:
    """``sys.exit(code)`` for a CLI's ``__main__``; after a Ctrl-C, exits at once with ``os._exit``.

    Ctrl-C during a JAX compilation abandons it while XLA's threads are still compiling; the
    interpreter's normal teardown then waits on them and can crash (observed: 20 s, then
    SIGSEGV instead of exit code 130). Every file is written atomically and already closed
    by then, so skipping the teardown loses nothing.
    """
    if _interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
