"""Writing files so that a crash, a kill or Ctrl-C at any moment leaves the old file or the new one, never half.

``atomic_path(path)`` is the one way the package replaces a file: write to the yielded temporary path beside
it; a clean exit renames it over ``path`` (atomic on POSIX), any exception removes it. ``atomic_paths(*paths)``
does the same for files that belong together (a table and its JSON, a report and its plots): all are written
first, then renamed together with the signals held back, so a signal leaves all the old files or all the new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Iterator

from cifar_jax import early


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yields a fresh temporary path beside ``path`` (ending in ``suffix``, e.g. ".npz" for ``np.savez``).

    On a clean exit the temporary file is renamed over ``path``; on an exception (or if it was never
    written) nothing of it is left and ``path`` is unchanged. An OSError about the temporary file names ``path``.
    """
    path = Path(path)
    tmp = _temporary(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (str(tmp), tmp) and e.errno:  # Name the file being written, not its temporary name.
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        with contextlib.suppress(OSError):  # A read-only disk answers EROFS even for a file never created.
            tmp.unlink(missing_ok=True)


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def atomic_paths(*paths) -> Iterator[list[Path]]:
    """Yields one temporary path per file of ``paths`` (each keeping its suffix); on a clean exit every one that was
    written is renamed over its file, with SIGINT/SIGTERM/SIGHUP held back until the last rename (then delivered), so
    a signal finds all the old files or all the new ones. On an exception nothing is renamed and no temporary left.
    """
    paths = [Path(p) for p in paths]
    temps = [_temporary(p, p.suffix) for p in paths]
    try:
        yield temps
        written = [(t, p) for t, p in zip(temps, paths) if t.exists()]
        with _signals_held():
            for tmp, path in written:
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held():
    """Within the block the signals of ``early.SIGNALS`` are only noted; after it they are sent again, in order.

    Python runs signal handlers in the main thread between bytecodes, so holding them there is enough (elsewhere,
    and outside the main thread, nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in early.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in noted:
            os.kill(os.getpid(), s)


def write_text_atomic(path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, obj) -> None:
    """Replaces ``path`` with ``obj`` as indented JSON atomically (``atomic_path``)."""
    write_text_atomic(path, json.dumps(obj, indent=1))
