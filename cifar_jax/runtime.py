"""Process set-up shared by the command-line front ends: logs, caches, devices, error handling.

Nothing here computes; each function is called once at the start of a CLI.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import logging
import os
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from cifar_jax import early
from cifar_jax.errors import UserError
from cifar_jax.files import write_text_atomic


def default_cache_dir() -> Path:
    """``$CIFAR_JAX_CACHE`` or ``$XDG_CACHE_HOME/cifar_jax`` (``~/.cache/cifar_jax``): data and compile caches."""
    if os.environ.get("CIFAR_JAX_CACHE"):
        return Path(os.environ["CIFAR_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cifar_jax"


def quiet_library_logs() -> None:
    """Hides orbax/absl INFO and WARNING chatter (e.g. about read-only managers) from the CLI output, and asyncio's
    reports of orbax tasks abandoned after a failure (``_drop_abandoned_tasks``)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    asyncio_logger = logging.getLogger("asyncio")
    if _drop_abandoned_tasks not in asyncio_logger.filters:
        asyncio_logger.addFilter(_drop_abandoned_tasks)


def _drop_abandoned_tasks(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task/Future exception was never retrieved": the package runs no asyncio code of its own,
    so these are orbax/tensorstore reads or writes left behind when a save or restore failed, which the failure
    itself already reported in one line."""
    return "exception was never retrieved" not in str(record.msg)


LIBRARY_LOGGERS = ("absl", "asyncio")  # Where orbax and tensorstore report failures of their background threads.


class HeldLogs(logging.Handler):
    """Collects the records of ``LIBRARY_LOGGERS`` while installed (see ``library_logs_held``)."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.dropped = False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def drop(self) -> None:
        """Discards what was held: the caller reports the failure behind it in one line."""
        self.records.clear()
        self.dropped = True


@contextlib.contextmanager
def library_logs_held():
    """Within the block, orbax's log records (absl, asyncio) are held back instead of printed; yields a ``HeldLogs``.

    At the end they are passed on as if logged then, unless the block called ``.drop()`` or ended in a
    ``UserError``, whose one line says what failed: a failed save or restore then prints that line and nothing
    else (orbax logs each failing background thread with its traceback).
    """
    held = HeldLogs()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [held], False
    failed_in_one_line = False
    try:
        yield held
    except UserError:
        failed_in_one_line = True
        raise
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        if not (failed_in_one_line or held.dropped):
            for record in held.records:
                logging.getLogger(record.name).handle(record)


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in ``default_cache_dir() / "jax"`` (off with CIFAR_JAX_NO_COMPILE_CACHE=1)."""
    import jax

    if os.environ.get("CIFAR_JAX_NO_COMPILE_CACHE"):
        return
    cache = default_cache_dir() / "jax"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(cache))
    except OSError as e:  # The cache only saves time: compile every time instead.
        print(f"warning: cannot use the compilation cache {str(cache)!r}: {e.strerror or e}; going on without it "
              "(set CIFAR_JAX_CACHE to a writable folder)", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    heal_compilation_cache(cache)


COMPILE_ENTRY = "*-cache"  # How JAX names the entries of its persistent compilation cache (jax/_src/lru_cache.py).
CHECKED = "checked.json"  # The entries already read whole: {file name: [size, mtime_ns]}.


def heal_compilation_cache(cache: Path, settle_s: float = 10.0) -> list[str]:
    """Removes the entries of JAX's compilation cache in ``cache`` that no longer decompress; returns their names.

    JAX writes an entry in place, not atomically, and never replaces one: an entry cut short by a crash or a full
    disk would be read, fail ("Error -5 while decompressing data") and be compiled again on every run, each time
    with a warning. Here a damaged entry costs one ``warning:`` line, once, and is compiled and written anew by the
    run. Each entry is read once (``CHECKED`` lists those found whole, by size and modification time); entries
    younger than ``settle_s`` may still be being written by another process and wait for the next run. JAX's own
    warnings about damaged entries are silenced: this is where they are reported.
    """
    warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
    try:
        from jax._src.compilation_cache import decompress_executable  # How JAX reads its entries (zstd or zlib).
    except ImportError:  # A JAX without it: entries are not checked.
        return []
    try:
        checked = json.loads((cache / CHECKED).read_text())
        checked = checked if isinstance(checked, dict) else {}
    except (OSError, ValueError):  # None yet, or damaged itself: read every entry again.
        checked = {}
    damaged, now, changed = [], time.time_ns(), False
    for entry in sorted(cache.glob(COMPILE_ENTRY)):
        try:
            stat = entry.stat()
            if checked.get(entry.name) == [stat.st_size, stat.st_mtime_ns] or now - stat.st_mtime_ns < settle_s * 1e9:
                continue
            decompress_executable(entry.read_bytes())
            checked[entry.name], changed = [stat.st_size, stat.st_mtime_ns], True
        except OSError:  # Gone (another process healed or evicted it) or unreadable: not ours to judge.
            continue
        except Exception:  # Does not decompress: damaged.
            damaged.append(entry.name)
            entry.unlink(missing_ok=True)
            checked.pop(entry.name, None)
            changed = True
    if changed:
        present = {p.name for p in cache.glob(COMPILE_ENTRY)}
        try:
            write_text_atomic(cache / CHECKED, json.dumps({k: v for k, v in checked.items() if k in present}))
        except OSError:  # Read again next time: slower, not wrong.
            pass
    if damaged:
        print(f"warning: removed {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} of the compilation "
              f"cache {str(cache)!r} (cut short by a crash or a full disk); compiling them again", file=sys.stderr)
    return damaged


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
    """An unraisable hook: orbax teardown noise is dropped; a Ctrl-C (or SIGTERM, SIGHUP) that Python discarded
    (raised in a weakref callback, a finalizer, ...) is delivered again instead of printed as "Exception ignored"."""

    def hook(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            _send_signal_soon(getattr(unraisable.exc_value, "signum", signal.SIGINT))
        elif not _is_orbax_teardown_noise(unraisable):
            default_hook(unraisable)

    return hook


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt: the same unwinding, exit 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interruption(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


_pending: tuple[threading.Timer, int] | None = None  # A discarded signal on its way again (``_send_signal_soon``).


def _send_signal_soon(signum: int) -> None:
    """``signum`` to this process 50 ms from now, from a timer thread (by then Python runs ordinary code again)."""
    global _pending
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    timer.daemon = True
    _pending = (timer, signum)
    timer.start()


def _where_python_discards_exceptions(frame) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback (JAX registers one) or a ``__del__``, where a
    KeyboardInterrupt would be printed as "Exception ignored" and lost. Other such places (weakref callbacks)
    are caught afterwards by ``_quiet_unraisable``."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


_raised: int | None = None  # The signal whose exception run_cli has not caught yet (``_send_again_if_swallowed``).


def _on_signal(signum, frame):
    """SIGINT as KeyboardInterrupt, SIGTERM/SIGHUP as ``Stopped``; sent again 50 ms later if it arrived where Python
    would discard the exception, and 0.5 s later if the exception never reaches ``run_cli``."""
    global _pending, _raised
    if _where_python_discards_exceptions(frame):
        _send_signal_soon(signum)
        return
    _pending, _raised = None, signum
    _send_again_if_swallowed(signum)
    raise _interruption(signum)


def interruption_caught() -> None:
    """For code that catches a signal's KeyboardInterrupt to clean up before re-raising it: no re-sending meanwhile."""
    global _raised
    _raised = None


def _send_again_if_swallowed(signum: int, after_s: float = 0.5) -> None:
    """Library code that catches every exception (a bare ``except:`` around an optional import, ...) swallows the
    KeyboardInterrupt: the signal is sent again ``after_s`` later, and again, until ``run_cli`` has caught it
    (seen: a report signalled 2 s after its start, during jax's imports, ran to the end and exited 0)."""

    def check():
        if _raised == signum:
            os.kill(os.getpid(), signum)

    timer = threading.Timer(after_s, check)
    timer.daemon = True
    timer.start()


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


# What to do about the OS errors a user can fix, by errno.
OS_ERROR_ADVICE = {
    errno.ENAMETOOLONG: "use shorter names (at most 255 bytes a folder or file name)",
    errno.EROFS: "use a writable location",
    errno.EACCES: "fix its permissions or use another location",
    errno.EPERM: "fix its permissions or use another location",
    errno.ENOSPC: "free space and run the same command again",
    errno.EDQUOT: "free space and run the same command again",
    errno.EFBIG: "free space and run the same command again",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file",
    errno.ELOOP: "the path has a symbolic-link loop; check the path",
    errno.EIO: "the disk reported an I/O error; check it",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path(s), the OS's words for its errno and what to do."""
    words = os.strerror(e.errno) if e.errno else (" ".join(str(e).split()) or type(e).__name__)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = f"cannot use {' -> '.join(repr(p) for p in paths)}: " if paths else ""
    advice = OS_ERROR_ADVICE.get(e.errno)
    return f"{where}{words}" + (f"; {advice}" if advice else "")


def run_cli(main: Callable[[], int]) -> int:
    """Runs a CLI body: a ``UserError`` prints ``error: <one line>`` and returns its exit code; Ctrl-C returns 130,
    SIGTERM 143, SIGHUP 129, each after one line (``early`` covers the imports before this).

    An ``OSError`` (a path too long, a read-only or full disk, no permission) prints ``error: cannot use PATH:
    <the OS's words>; <what to do>`` and returns 1.

    Returns the body's own exit code otherwise. Library logs are quietened and glibc told to keep freed
    memory (``keep_freed_memory``) first.
    """
    global _pending, _raised
    keep_freed_memory()
    quiet_library_logs()
    sys.unraisablehook = _quiet_unraisable(sys.__unraisablehook__)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _on_signal) for s in early.SIGNALS} if in_main_thread else {}
    try:
        code = main()
        if _pending is not None:  # A signal was discarded where Python ignores exceptions, just before the end.
            timer, signum = _pending
            timer.cancel()
            raise _interruption(signum)
        if _raised is not None:  # Its exception was swallowed and the work ended before it was sent again.
            raise _interruption(_raised)
        return code
    except UserError as e:
        print(f"{e.prefix}{e.message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        _pending, _raised = None, None
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\ninterrupted ({early.describe(signum)}); nothing was left half-written", file=sys.stderr)
        return 128 + signum
    finally:
        _raised = None
        early.finished()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_process(code: int) -> None:
    """Ends a CLI's process with ``code``: the ``atexit`` functions run, stdout and stderr are flushed, then ``os._exit``.

    Not the interpreter's own teardown: it resets the signal handlers to the system's defaults before it ends, so a
    Ctrl-C in its last moments killed the process without a word (seen: exit -2 after the work was done), and JAX's
    teardown can take seconds (after a Ctrl-C during a compilation it waited on XLA's threads, then crashed: 20 s,
    then SIGSEGV). Every file is written atomically and closed by then; until ``os._exit`` a signal still gets
    ``early``'s one line.
    """
    try:
        atexit._run_exitfuncs()  # What the libraries registered (JAX's distributed shutdown, logging's flush, ...).
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
