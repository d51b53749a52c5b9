"""Reading a user's image files for explanation: any format, mode and size -> uint8 RGB arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifar_jax.errors import UserError


class ImageError(UserError):
    """An image file that cannot be used (one line naming the file and why)."""


def read_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; grayscale, RGBA (over white) and palette images are converted.

    Raises ImageError for a missing, empty, non-image or undecodable file or a directory.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)  # Transparent pixels become white, not black.
            return np.asarray(im.convert("RGB"), np.uint8)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL's bilinear filter (it low-passes when shrinking, so no aliasing)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def output_stems(paths) -> list[str]:
    """A distinct file-name stem per input path: ``cat`` alone, ``cat-jpg`` and ``cat-png`` when stems collide."""
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    named = [s if stems.count(s) == 1 else f"{s}-{p.suffix.lstrip('.').lower() or 'noext'}" for s, p in zip(stems, paths)]
    # Same name in two folders (a/cat.jpg, b/cat.jpg): number the repeats.
    return [n if named[:i].count(n) == 0 else f"{n}-{named[:i].count(n) + 1}" for i, n in enumerate(named)]
