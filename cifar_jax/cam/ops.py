"""Shared pieces of every method: the context a CAM method sees, its output, scaling, chunking, PCA, targets."""

from __future__ import annotations

import collections
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

EPS = 1e-7  # Keeps divisions by a norm or a sum finite.


class LayerContext(NamedTuple):
    """What a CAM method may use; all arrays are for the whole batch.

    The first six fields every method gets; the rest are filled by
    ``make_cam_fn`` for the methods that need extra forward passes.
    """

    activations: jax.Array  # (N, h, w, K) the layer's output (after reshape_transform)
    grads: jax.Array  # (N, h, w, K) d score / d activations
    targets: jax.Array  # (N,) int class per image (zeros for a callable target)
    head: Callable  # Score-CAM: (B, H, W, C) images -> (B, ...) model outputs
    images: jax.Array  # (N, H, W, C) model input
    batch_size: int  # chunk size for methods that run extra forward passes
    score: Callable | None = None  # Score-CAM: (outputs (B, ...), targets (B,)) -> (B,) weight; None: softmax probability
    channel_scores: Callable | None = None  # Ablation: modify(raw acts, k) -> raw acts  |->  (N, K) target scores
    scores: jax.Array | None = None  # (N,) target scores of the unmodified model


class CAMs(NamedTuple):
    """Output of a CAM function; T is present only when several targets per image were asked for."""

    raw: jax.Array  # (N, [T,] h, w) after ReLU, at the layer's resolution
    maps: jax.Array  # (N, [T,] H, W) upsampled to the input and scaled per map to [0, 1]
    targets: jax.Array  # (N, [T]) the classes explained (-1 for a callable target)
    logits: jax.Array  # (N, C) model output


def minmax_scale(x, axes=(-2, -1)):
    """Scales ``x`` to [0, 1] over ``axes`` (each map separately); constant maps become 0."""
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    return jnp.where(hi > lo, (x - lo) / (hi - lo + EPS), 0.0)


def upsample_and_scale(raw, size):
    """(N, h, w) -> (N, H, W): half-pixel bilinear upsampling, then min-max scaling of each map to [0, 1]."""
    return minmax_scale(jax.image.resize(raw, (raw.shape[0], *size), "linear"))


def chunked_map(fn, xs, chunk: int):
    """``fn`` over the leading axis of ``xs`` (array or tree) ``chunk`` rows at a time: pad, ``lax.map``, unpad.

    ``fn`` maps a (chunk, ...) batch to a (chunk, ...) tree; the result has the rows of ``xs``. Where a divisor of
    the row count is at least half of ``chunk``, chunks of that size need no padded rows (33 rows by 4: 11 of 3).
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    chunk = max(1, min(int(chunk), n))
    divisor = max(d for d in range(1, chunk + 1) if n % d == 0)
    chunk = divisor if 2 * divisor >= chunk else chunk
    pad = (-n) % chunk
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]).reshape(-1, chunk, *a.shape[1:]), xs)
    out = jax.lax.map(fn, padded)
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)


def over_flat_batch(fn, x):
    """``fn`` on (P, N, ...) inputs as one batch of P * N: (B, ...) -> (B, ...) becomes (P, N, ...) -> (P, N, ...).

    Written by hand instead of ``jax.vmap(fn)``: the network sees one batch of P * N images whatever it is made of,
    where a custom call batched sequentially (oneDNN's convolutions) would run P times.
    """
    p, n = x.shape[:2]
    out = fn(x.reshape(p * n, *x.shape[2:]))
    return jax.tree.map(lambda o: o.reshape(p, n, *o.shape[1:]), out)


def first_principal_component(weighted):
    """Projects each (h*w, K) map onto its first principal direction -> (N, h, w).

    The sign of a singular vector is arbitrary; it is chosen so the projection
    correlates positively with the channel sum, so hot stays hot.
    """
    n, h, w, k = weighted.shape
    flat = weighted.reshape(n, h * w, k)
    centred = flat - flat.mean(axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    projection = jnp.einsum("npk,nk->np", flat, vt[:, 0])
    reference = flat.sum(-1)
    sign = jnp.sign(jnp.sum((projection - projection.mean(1, keepdims=True)) * (reference - reference.mean(1, keepdims=True)), axis=1))
    sign = jnp.where(sign == 0, 1.0, sign)
    return (projection * sign[:, None]).reshape(n, h, w)


# --------------------------------------------------------------------------- targets


def classifier_output(c):
    """Target: the output (logit) of class ``c`` (int or (N,) ints) -> callable (N, C) outputs -> (N,)."""

    def score(outputs):
        idx = jnp.broadcast_to(jnp.asarray(c, jnp.int32), outputs.shape[:1])
        return jnp.take_along_axis(outputs, idx[:, None], axis=-1)[:, 0]

    return score


def softmax_output(c):
    """Target: the softmax probability of class ``c`` (int or (N,) ints) -> callable (N, C) outputs -> (N,)."""
    return lambda outputs: classifier_output(c)(jax.nn.softmax(outputs, axis=-1))


def class_score(outputs, targets):
    """(N, C) outputs, (N,) classes -> (N,) logits of the classes (what class-index targets explain)."""
    return jnp.take_along_axis(outputs, targets[:, None], axis=-1)[:, 0]


def class_probability(outputs, targets):
    """(N, C) outputs, (N,) classes -> (N,) softmax probabilities (Score-CAM's weight)."""
    return class_score(jax.nn.softmax(outputs, axis=-1), targets)


def vit_reshape_transform(h: int, w: int, skip_tokens: int = 1):
    """Token activations (N, skip_tokens + h*w, D) -> (N, h, w, D) (drops the class/register tokens)."""
    return lambda a: a[:, skip_tokens:].reshape(a.shape[0], h, w, a.shape[-1])


# --------------------------------------------------------------------------- shared by base and attribution

as_float32 = functools.partial(jax.tree.map, lambda o: jnp.asarray(o, jnp.float32))


def target_mode(target):
    """-> (mode, fixed int array or None, callable or None) for a target given to make_cam_fn / compute_cams."""
    if target is None:
        return "predicted", None, None
    if isinstance(target, str):
        if target != "all":
            raise ValueError(f"targets must be None, 'all', an int, an int array or a callable, not {target!r}")
        return "all", None, None
    if callable(target):
        return "callable", None, target
    target = jnp.asarray(target, jnp.int32)
    if target.ndim > 2:
        raise ValueError(f"targets of shape {target.shape}: expected an int, (N,) or (N, T)")
    return ("multi" if target.ndim == 2 else "given"), target, None


def targets_for(mode, fixed, n):
    """The (N,) or (N, T) int array passed to the compiled function."""
    if fixed is None:
        return jnp.zeros((n,), jnp.int32)
    if fixed.ndim == 0:
        return jnp.full((n,), fixed)
    if fixed.shape[0] != n:
        raise ValueError(f"targets of shape {fixed.shape} do not match {n} images")
    return fixed


_CACHE: collections.OrderedDict = collections.OrderedDict()


def cached(model, config: tuple, build: Callable, maxsize: int = 64):
    """``build()`` once per (model, config), LRU. Hashable modules are keyed by value; modules that are
    not (a list-valued field, like flax's example ResNets) by identity, holding a reference."""
    try:
        hash(config)
    except TypeError:  # e.g. a dict among apply_kwargs' values: compile without caching
        return build()
    try:
        key = (model, config)
        hash(key)
    except TypeError:
        key = (("id", id(model)), config)
    hit = _CACHE.get(key)
    if hit is not None and (hit[0] is model or key[0] is model):
        _CACHE.move_to_end(key)
        return hit[1]
    value = build()
    _CACHE[key] = (model, value)
    if len(_CACHE) > maxsize:
        _CACHE.popitem(last=False)
    return value
