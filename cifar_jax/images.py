"""Reading a user's image files for explanation: any format, mode and size -> uint8 RGB arrays."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cifar_jax.errors import UserError


# Inputs declaring more pixels than this are refused before anything is decoded (decompression
# bombs: a few-KB PNG can declare 60000x60000). 150 megapixels lets through a 12000x12000 photo
# (144); PIL's own limit (Image.MAX_IMAGE_PIXELS) is set to the same value while we read.
MAX_PIXELS = 150_000_000
# Images are decoded and explained at most this many pixels on their longest side (bigger ones are
# shrunk, JPEGs already while decoding), so memory stays bounded whatever the input's size.
MAX_SIDE = 2048

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class ImageError(UserError):
    """An image file that cannot be used (one line naming the file and why)."""


class LoadedImage(NamedTuple):
    """An image as (H, W, 3) uint8 RGB, at most ``max_side`` pixels a side, and the file's own (width, height)."""

    pixels: np.ndarray
    original_size: tuple[int, int]

    @property
    def shrunk(self) -> bool:
        return self.pixels.shape[1::-1] != self.original_size


def read_image(path, max_side: int | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; grayscale, RGBA (over white) and palette images are converted.

    With ``max_side``, an image larger than that is shrunk (aspect kept) while it is read.
    Raises ImageError for a missing, empty, non-regular, too large, non-image or undecodable file.
    """
    return load_image(path, max_side).pixels


def load_image(path, max_side: int | None = MAX_SIDE) -> LoadedImage:
    """``read_image`` that also says the file's own size; memory is bounded by ``MAX_PIXELS`` and ``max_side``.

    JPEGs larger than ``max_side`` are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``), other
    formats are shrunk right after decoding, before any conversion to RGB.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not os.path.lexists(path):
        raise ImageError(f"{path}: no such file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then says what was opened.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e.strerror or e})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{path}: is a directory, not an image")
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        raise ImageError(f"{path}: not a regular file ({kind})")
    with open(fd, "rb") as f:
        if info.st_size == 0:
            raise ImageError(f"{path}: empty file")
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice it; our limit is the limit.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _decode(f, path, max_side)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{path}: image too large (limit {MAX_PIXELS:,} pixels); shrink it first") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{path}: cannot decode image ({e})") from None


def _decode(f, path: Path, max_side: int | None) -> LoadedImage:
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        im = Image.open(f)  # Reads the header only; the size is checked below, with the size in the message.
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"{path}: image too large ({width}x{height} pixels, limit {MAX_PIXELS:,}); "
                             f"shrink it first (it is explained at most {MAX_SIDE} pixels a side anyway)")
        box = None
        if max_side and max(width, height) > max_side:
            scale = max_side / max(width, height)
            box = (max(1, round(width * scale)), max(1, round(height * scale)))
            im.draft(None, box)  # JPEG: decode at 1/2, 1/4 or 1/8 scale.
        im.load()
        if im.mode in ("1", "P", "PA"):  # Resized as RGB(A), not by nearest palette index.
            transparent = im.mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if transparent else "RGB")
        if box is not None:
            im = im.resize(box, Image.BILINEAR, reducing_gap=2.0)  # reduce() by an integer first, then bilinear.
        if im.mode in ("RGBA", "LA", "La", "RGBa"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)  # Transparent pixels become white, not black.
        return LoadedImage(np.asarray(im.convert("RGB"), np.uint8), (width, height))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL's bilinear filter (it low-passes when shrinking, so no aliasing)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def output_stems(paths) -> list[str]:
    """A distinct file-name stem per input path: ``cat`` alone, ``cat-jpg`` and ``cat-png`` when stems collide.

    Stems are distinct ignoring case (for case-insensitive file systems) and never collide with
    another input's stem: a repeat is numbered (``cat-jpg-2``) until it is unique.
    """
    paths = [Path(p) for p in paths]
    stems = [p.stem.casefold() for p in paths]
    named = [p.stem if stems.count(s) == 1 else f"{p.stem}-{p.suffix.lstrip('.').lower() or 'noext'}"
             for s, p in zip(stems, paths)]
    used, out = set(), []
    for name in named:  # Same name in two folders (a/cat.jpg, b/cat.jpg): number the repeats.
        candidate, n = name, 1
        while candidate.casefold() in used:
            n += 1
            candidate = f"{name}-{n}"
        used.add(candidate.casefold())
        out.append(candidate)
    return out
