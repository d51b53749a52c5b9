"""Writing files so that a crash, a kill or Ctrl-C at any moment leaves the old file or the new one, never half.

``atomic_path(path)`` is the one way the package replaces a file: write to the yielded temporary path beside
it; a clean exit renames it over ``path`` (atomic on POSIX), any exception removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yields a fresh temporary path beside ``path`` (ending in ``suffix``, e.g. ".npz" for ``np.savez``).

    On a clean exit the temporary file is renamed over ``path``; on an exception (or if it was never
    written) nothing of it is left and ``path`` is unchanged. An OSError about the temporary file names ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
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


def write_text_atomic(path, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, obj) -> None:
    """Replaces ``path`` with ``obj`` as indented JSON atomically (``atomic_path``)."""
    write_text_atomic(path, json.dumps(obj, indent=1))
