"""Downloads a data archive once, verified against its published size and sha256.

Pure stdlib (urllib, hashlib) plus tqdm for the progress bar. The file is
streamed to a temporary name next to its destination and renamed only when it
is complete and its checksum matches, so an interrupted or corrupted download
never leaves a file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from cifar_jax.files import atomic_path

DEFAULT_BASE_URL = "https://www.cs.toronto.edu/~kriz"
URL_ENV = "CIFAR_JAX_DATA_URL"

# (size in bytes, sha256) of the official archives, as published by tensorflow-datasets for these
# exact URLs: tensorflow_datasets/url_checksums/cifar10.txt and cifar100.txt in
# github.com/tensorflow/datasets. (The Toronto page, https://www.cs.toronto.edu/~kriz/cifar.html,
# publishes md5 c32a1d4ab5d03f1284b67883e8d87530 and 03b5dce01913d631647c71ecec9e9cb8.)
# Tests replace entries here to serve archives of their own.
CHECKSUMS: dict[str, tuple[int, str]] = {
    "cifar-10-binary.tar.gz": (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    "cifar-100-binary.tar.gz": (168513733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
}

_CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download that failed or did not verify (one-line message); data.py re-raises it as DataError."""


def base_url(override: str = "") -> str:
    """The base URL archives are fetched from: ``override``, else ``$CIFAR_JAX_DATA_URL``, else Toronto's."""
    return (override or os.environ.get(URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | os.PathLike) -> None:
    """Raises DownloadError unless the file at ``path`` has the size and sha256 in ``CHECKSUMS[its name]``."""
    path = Path(path)
    size, sha256 = CHECKSUMS[path.name]
    got = path.stat().st_size
    digest = sha256_file(path) if got == size else ""
    if digest != sha256:
        raise DownloadError(f"{path} is not the published {path.name} ({got} bytes, expected {size} with sha256 {sha256[:12]}...)")


def download(name: str, dest_dir: str | os.PathLike, url: str = "", progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetches ``<base url>/<name>`` into ``dest_dir/name`` and returns that path.

    The bytes must have the size and sha256 in ``CHECKSUMS[name]``; otherwise,
    or if the connection fails or ends early, nothing is left at the
    destination and DownloadError says why in one line.
    """
    if name not in CHECKSUMS:
        raise DownloadError(f"no published checksum for {name!r}; refusing to download it")
    size, sha256 = CHECKSUMS[name]
    dest = Path(dest_dir) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = f"{base_url(url)}/{name}"
    with atomic_path(dest, suffix=".part") as tmp:  # The destination only ever holds a verified archive.
        with open(tmp, "wb") as out:
            got, digest = _stream(source, out, name, progress, timeout)
        if got != size or digest != sha256:
            raise DownloadError(
                f"{source} does not match its published checksum (got {got} bytes, sha256 {digest[:12]}...; "
                f"expected {size} bytes, sha256 {sha256[:12]}...); the download was discarded"
            )
    return dest


def _stream(source: str, out, name: str, progress: bool, timeout: float) -> tuple[int, str]:
    """Copies the response body of ``source`` into ``out``; returns (byte count, sha256 hex)."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    got = 0
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}",
                      disable=None if progress else True) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:  # The server answered, so not offline: say what it answered.
        raise DownloadError(f"cannot download {source}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
        why = (str(getattr(e, "reason", None) or e).strip().splitlines() or [""])[0]
        raise DownloadError(f"cannot download {source} (offline?): {type(e).__name__}: {why}".rstrip(": ")) from None
    if length is not None and got != length:
        raise DownloadError(f"cannot download {source}: the connection ended after {got} of {length} bytes")
    return got, h.hexdigest()
