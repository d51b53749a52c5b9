"""Pure-JAX augmentation of uint8 batches, run inside the compiled train step.

Every function takes a PRNG key and a batch and returns a new batch; the
same key gives the same result on one device or sharded over many (JAX's
partitionable threefry draws the same numbers whatever the sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images, mean, std):
    """uint8 or [0, 255] float (N, H, W, C) -> float32 (x / 255 - mean) / std with (C,) mean, std."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop(key, images, padding: int = 4, mode: str = "reflect"):
    """Pads (N, H, W, C) by ``padding`` pixels ("reflect" or "constant" zeros) and crops back at random offsets."""
    if padding <= 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def random_flip(key, images):
    """Mirrors each (H, W, C) image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def cutout(key, images, size: int = 16):
    """Zeroes one ``size`` x ``size`` square per image, centred anywhere (it may be clipped by the border).

    As DeVries & Taylor (2017); apply it after normalisation so zero is the mean colour.
    """
    if size <= 0:
        return images
    n, h, w, _ = images.shape
    centres = jax.random.randint(key, (n, 2), 0, jnp.array([h, w]))
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    cy, cx = centres[:, 0, None, None], centres[:, 1, None, None]
    # The square spans [c - size//2, c + size//2) exactly, as in the reference implementation.
    inside = (rows >= cy - size // 2) & (rows < cy + (size + 1) // 2) & (cols >= cx - size // 2) & (cols < cx + (size + 1) // 2)
    return jnp.where(inside[..., None], jnp.zeros_like(images), images)


def augment_batch(key, images, mean, std, *, crop_padding=4, pad_mode="reflect", flip=True, cutout_size=16):
    """The training transform: crop, flip, normalise, cutout. (N, H, W, 3) uint8 -> float32."""
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    x = random_crop(k_crop, images, crop_padding, pad_mode)
    if flip:
        x = random_flip(k_flip, x)
    x = normalize(x, mean, std)
    return cutout(k_cut, x, cutout_size)
