"""Explanation quality: how faithful is a saliency map to the model it explains?

Every metric takes a ``logits_fn`` (a callable (B, H, W, C) normalised images ->
(B, classes) logits, any model, not only our ResNets), the images, saliency
maps (N, H, W) (higher = more relevant) and the explained classes (N,), and
returns per-image arrays; a table is their mean over images.

* Deletion / insertion AUC (Petsiuk et al. 2018): remove (or insert) pixels in
  order of saliency and integrate the target probability. Deletion lower,
  insertion higher = more faithful. Both move between the image and its blur:
  deleted pixels take the blurred image's values (a constant colour, the paper's
  deletion, scatters out-of-distribution pixels that a random order exploits;
  docs/faithfulness.md).
* ROAD (Rong et al. 2022): remove the most (MoRF) or least (LeRF) relevant
  pixels, fill them by noisy linear imputation, read the target probability.
  MoRF lower, LeRF higher = more faithful.
* Average drop / increase in confidence (Chattopadhyay et al. 2018) for the
  image multiplied by its map. Drop lower, increase higher = better.

Two baselines, a uniform random map and a centred Gaussian, are usable
wherever a CAM map is. Wrap a Flax model with ``model_logits_fn``::

    logits_fn = model_logits_fn(model, variables)
    curves = deletion_curve(logits_fn, images, cams.maps, cams.targets)

``cifar_jax.sanity`` holds the parameter-randomisation check (does the map depend on the
weights?) and ``cifar_jax.faithfulness_table`` the table of every method and baseline.

The metric functions are compiled with ``jax.jit``; ``logits_fn`` is passed
as a ``jax.tree_util.Partial`` pytree, so pass the same callable each time to
reuse the compiled code.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from cifar_jax.cam.ops import EPS, chunked_map, over_flat_batch
from cifar_jax.models import EvalLogits

LogitsFn = Callable[[jax.Array], jax.Array]  # (B, H, W, C) normalised images -> (B, classes) logits
ROAD_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------- model, maps, ranks


def model_logits_fn(model, variables) -> LogitsFn:
    """A ``logits_fn`` for a Flax model in eval mode (``models.eval_logits``): (B, H, W, C) -> (B, classes) float32.

    The variables are leaves of the returned ``Partial``, so jitted metrics take them as
    arguments (not baked-in constants); the function is ``model.apply`` itself, so calls
    with the same model reuse the compiled metrics.
    """
    return Partial(EvalLogits(model.apply), variables)


def _as_partial(logits_fn) -> Partial:
    """Any callable as a pytree that ``jax.jit`` accepts as an ordinary argument."""
    return logits_fn if isinstance(logits_fn, Partial) else Partial(logits_fn)


def target_probability(logits_fn: LogitsFn, images, targets):
    """Softmax probability of each image's target class: (N, H, W, C), (N,) -> (N,)."""
    logits = jnp.asarray(logits_fn(images), jnp.float32)
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]


def _target_probabilities(logits_fn: LogitsFn, versions, targets):
    """``target_probability`` of P versions of N images, all in one batch: (P, N, H, W, C), (N,) -> (P, N)."""
    return over_flat_batch(lambda x: target_probability(logits_fn, x, jnp.tile(targets, versions.shape[0])), versions)


def random_saliency(key, shape: Sequence[int]):
    """Baseline map of i.i.d. uniform [0, 1) noise; ``shape`` is (N, H, W) -> (N, H, W)."""
    return jax.random.uniform(key, tuple(shape), jnp.float32)


def gaussian_saliency(shape: Sequence[int], sigma: float | None = None):
    """Baseline map: a Gaussian centred on the image, peak 1; (N, H, W) -> (N, H, W).

    ``sigma`` in pixels defaults to a quarter of the smaller image side.
    """
    n, h, w = shape
    sigma = min(h, w) / 4 if sigma is None else sigma
    rows = np.arange(h)[:, None] - (h - 1) / 2
    cols = np.arange(w)[None, :] - (w - 1) / 2
    bump = np.exp(-(rows**2 + cols**2) / (2 * sigma**2)).astype(np.float32)  # numpy: a constant, nothing to compile
    return jnp.broadcast_to(jnp.asarray(bump), (n, h, w))


@functools.partial(jax.jit, static_argnames="sigma")
def gaussian_blur(images, sigma: float):
    """Separable Gaussian blur with edge padding, truncated at 3 sigma: (N, H, W, C) -> (N, H, W, C)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps = jnp.asarray(taps / taps.sum(), jnp.float32)
    x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(t * x[:, i : i + h] for i, t in enumerate(taps))
    return sum(t * x[:, :, i : i + w] for i, t in enumerate(taps))


@functools.partial(jax.jit, static_argnames="descending")
def pixel_ranks(saliency, key=None, descending: bool = True):
    """Removal order of each pixel: (N, H, W) saliency -> (N, H, W) int32 ranks, 0 = removed first.

    ``descending`` puts the most salient pixel first. Ties (flat CAM regions) are broken
    uniformly at random with ``key``, or in raster order if ``key`` is None.
    """
    n = saliency.shape[0]
    score = jnp.asarray(saliency, jnp.float32).reshape(n, -1)
    score = -score if descending else score
    if key is None:
        order = jnp.argsort(score, axis=-1, stable=True)
    else:  # lexsort's last key is the primary one.
        order = jnp.lexsort((jax.random.uniform(key, score.shape), score), axis=-1)
    return jnp.argsort(order, axis=-1).astype(jnp.int32).reshape(saliency.shape)


def _counts(fractions, ranks) -> np.ndarray:
    """Numbers of pixels for fractions of the image (static, so shapes stay fixed)."""
    pixels = ranks.shape[1] * ranks.shape[2]
    return np.round(np.asarray(fractions) * pixels).astype(np.int32)


# --------------------------------------------------------------------------- deletion and insertion


@functools.partial(jax.jit, static_argnames=("steps", "step_batch"))
def _perturbation_curve(logits_fn, start, end, ranks, targets, *, steps, step_batch):
    """Target probability as the pixels of rank < k switch from ``start`` to ``end``: (N, steps + 1)."""

    def some_steps(ks):  # (S,) pixel counts -> (S, N) probabilities, one forward pass of S * N images
        return _target_probabilities(logits_fn, jax.vmap(lambda k: jnp.where((ranks < k)[..., None], end, start))(ks), targets)

    counts = jnp.asarray(_counts(np.arange(steps + 1) / steps, ranks))
    # step_batch steps per forward pass bounds memory to N * step_batch images.
    return chunked_map(some_steps, counts, step_batch).T


def deletion_curve(
    logits_fn: LogitsFn, images, saliency, targets, *, steps: int = 32, baseline=None, blur_sigma: float = 4.0, key=None, step_batch: int = 4
):
    """Deletion curve (Petsiuk et al. 2018): (N, H, W, C), (N, H, W), (N,) -> (N, steps + 1).

    Entry i is the target probability after the ``i / steps`` most salient pixels are
    replaced by ``baseline`` (N, H, W, C) or broadcastable (default: the image blurred with
    ``blur_sigma`` pixels, the insertion curve's start; ``0.0`` is the mean colour in normalised space).
    ``key`` breaks saliency ties at random; ``step_batch`` steps share one forward pass.
    """
    images = jnp.asarray(images, jnp.float32)
    baseline = gaussian_blur(images, blur_sigma) if baseline is None else jnp.broadcast_to(baseline, images.shape)
    ranks = pixel_ranks(saliency, key)
    targets = jnp.asarray(targets, jnp.int32)
    return _perturbation_curve(_as_partial(logits_fn), images, baseline, ranks, targets, steps=steps, step_batch=step_batch)


def insertion_curve(
    logits_fn: LogitsFn, images, saliency, targets, *, steps: int = 32, baseline=None, blur_sigma: float = 4.0, key=None, step_batch: int = 4
):
    """Insertion curve (Petsiuk et al. 2018): (N, H, W, C), (N, H, W), (N,) -> (N, steps + 1).

    Starts from ``baseline`` (default: the image blurred with ``blur_sigma`` pixels) and
    puts back the ``i / steps`` most salient pixels of the image at entry i.
    """
    images = jnp.asarray(images, jnp.float32)
    baseline = gaussian_blur(images, blur_sigma) if baseline is None else jnp.broadcast_to(baseline, images.shape)
    ranks = pixel_ranks(saliency, key)
    targets = jnp.asarray(targets, jnp.int32)
    return _perturbation_curve(_as_partial(logits_fn), baseline, images, ranks, targets, steps=steps, step_batch=step_batch)


@jax.jit
def auc(curve):
    """Area under curves sampled at equal steps over [0, 1], trapezoid rule: (N, S + 1) -> (N,)."""
    return (curve[:, 1:] + curve[:, :-1]).sum(axis=-1) / (2 * (curve.shape[-1] - 1))


# --------------------------------------------------------------------------- ROAD

# (dy, dx, weight): direct neighbours 1/6, diagonal ones 1/12, as in the ROAD paper.
_NEIGHBOURS = tuple((dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def _neighbour_sum(x):
    """Weighted sum of each pixel's 8 neighbours, zeros outside the image: (N, H, W, C) -> same."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(wt * padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx, wt in _NEIGHBOURS)


@functools.partial(jax.jit, static_argnames=("noise", "iters"))
def noisy_linear_impute(images, removed, key, *, noise: float = 0.01, iters: int = 100):
    """ROAD's noisy linear imputation: (N, H, W, C) images, (N, H, W) bool removed -> (N, H, W, C).

    Each removed pixel becomes the weighted mean of its in-image 8-neighbours (removed
    ones being unknowns too), plus N(0, noise^2) noise; kept pixels are unchanged.
    """
    # Jacobi-preconditioned conjugate gradients, fixed iteration count: the system is symmetric
    # positive definite and matrix-free, and CG needs ~O(side) iterations where Jacobi needs ~O(side^2).
    images = jnp.asarray(images, jnp.float32)
    r_mask = jnp.asarray(removed, jnp.float32)[..., None]
    degree = _neighbour_sum(jnp.ones_like(r_mask))  # total in-image neighbour weight per pixel
    apply_a = lambda x: r_mask * (degree * x - _neighbour_sum(r_mask * x))
    b = r_mask * _neighbour_sum((1 - r_mask) * images)
    precond = r_mask / degree
    dot = lambda u, v: jnp.sum(u * v, axis=(1, 2, 3), keepdims=True)  # per image

    def cg_step(_, state):
        x, r, p, rz = state
        ap = apply_a(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        z = precond * r
        rz_new = dot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        return x, r, z + beta * p, rz_new

    z0 = precond * b
    x, *_ = jax.lax.fori_loop(0, iters, cg_step, (jnp.zeros_like(b), b, z0, dot(b, z0)))
    filled = x + noise * jax.random.normal(key, images.shape, jnp.float32)
    return jnp.where(r_mask > 0, filled, images)


@functools.partial(jax.jit, static_argnames=("percentages", "noise", "iters", "step_batch"))
def _road(logits_fn, images, saliency, targets, key, *, percentages, noise, iters, step_batch):
    """MoRF curve (N, P) for ``saliency``; LeRF is this with the saliency negated."""
    rank_key, noise_key = jax.random.split(key)
    ranks = pixel_ranks(saliency, rank_key)

    def some_levels(args):  # (L,) pixel counts and keys -> (L, N) probabilities, one forward pass of L * N images
        impute = lambda k, level_key: noisy_linear_impute(images, ranks < k, level_key, noise=noise, iters=iters)
        return _target_probabilities(logits_fn, jax.vmap(impute)(*args), targets)

    counts = jnp.asarray(_counts(percentages, ranks))
    keys = jax.random.split(noise_key, len(percentages))
    return chunked_map(some_levels, (counts, keys), step_batch).T


def road_curve(
    logits_fn: LogitsFn,
    images,
    saliency,
    targets,
    key,
    *,
    order: str = "morf",
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = 0.01,
    iters: int = 100,
    step_batch: int = 3,
):
    """ROAD (Rong et al. 2022): (N, H, W, C), (N, H, W), (N,) -> (N, P) target probabilities.

    Column j removes the ``percentages[j]`` most ("morf") or least ("lerf") salient pixels
    and fills them by ``noisy_linear_impute``; ``key`` draws the noise and breaks ties.
    Its mean over columns is the score: MoRF lower, LeRF higher = more faithful.
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', not {order!r}")
    saliency = jnp.asarray(saliency, jnp.float32)
    saliency = saliency if order == "morf" else -saliency  # LeRF removes the least salient first; one compiled function serves both.
    return _road(
        _as_partial(logits_fn), jnp.asarray(images, jnp.float32), saliency, jnp.asarray(targets, jnp.int32), key,
        percentages=tuple(float(p) for p in percentages), noise=float(noise), iters=int(iters), step_batch=step_batch,
    )


# --------------------------------------------------------------------------- average drop / increase in confidence


@jax.jit
def _confidence_change(logits_fn, images, saliency, targets, mean, std):
    m = saliency[..., None]
    if mean is None:  # Normalised space: scales towards zero, the mean colour.
        explained = images * m
    else:  # Pixel space: unnormalise, scale towards black, renormalise.
        explained = ((images * std + mean) * m - mean) / std
    both = target_probability(logits_fn, jnp.concatenate([images, explained]), jnp.concatenate([targets, targets]))
    y, o = both[: images.shape[0]], both[images.shape[0] :]
    return 100 * jax.nn.relu(y - o) / jnp.maximum(y, EPS), 100 * (o > y).astype(jnp.float32)


def average_drop_increase(logits_fn: LogitsFn, images, saliency, targets, *, mean=None, std=None):
    """Drop and increase in confidence (Chattopadhyay et al. 2018) per image, in percent.

    Shapes: (N, H, W, C), (N, H, W) in [0, 1], (N,) -> (drop (N,), increase (N,)), where
    drop = 100 max(0, Y - O) / Y and increase = 100 [O > Y] for the target probability Y of
    the image and O of the image times its map; their means are "average drop" (lower =
    better) and "increase in confidence" (higher = better). With (C,) ``mean`` and ``std``
    the map multiplies the [0, 1] pixels; without, the normalised image.
    """
    stats = None if mean is None else (jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
    return _confidence_change(
        _as_partial(logits_fn), jnp.asarray(images, jnp.float32), jnp.asarray(saliency, jnp.float32),
        jnp.asarray(targets, jnp.int32), *(stats or (None, None)),
    )


# --------------------------------------------------------------------------- all per-image metrics at once


def image_metrics(
    logits_fn: LogitsFn,
    images,
    saliency,
    targets,
    key,
    *,
    steps: int = 32,
    blur_sigma: float = 4.0,
    deletion_fill: str = "blur",
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = 0.01,
    road_iters: int = 100,
    mean=None,
    std=None,
    step_batch: int = 4,
) -> dict:
    """Every metric for one batch: (N, H, W, C), (N, H, W), (N,) -> dict of per-image arrays.

    ``deletion_fill``: what deleted pixels take, "blur" (the image blurred with ``blur_sigma``, the
    insertion curve's start) or "mean" (the mean colour: zeros in normalised space).

    Keys: deletion_auc, insertion_auc, average_drop, increase_confidence (N,) and
    road_morf, road_lerf (N, P). Use the same ``key`` for every method compared
    (common random numbers: the same noise and tie-breaking).
    """
    if deletion_fill not in ("blur", "mean"):
        raise ValueError(f"deletion_fill must be 'blur' or 'mean', not {deletion_fill!r}")
    k_rank, k_road = jax.random.split(key)
    common = dict(steps=steps, key=k_rank, step_batch=step_batch)
    road = dict(percentages=percentages, noise=noise, iters=road_iters, step_batch=step_batch)
    drop, increase = average_drop_increase(logits_fn, images, saliency, targets, mean=mean, std=std)
    blurred = gaussian_blur(jnp.asarray(images, jnp.float32), blur_sigma)  # insertion's start, deletion's end
    return {
        "deletion_auc": auc(deletion_curve(logits_fn, images, saliency, targets,
                                           baseline=0.0 if deletion_fill == "mean" else blurred, **common)),
        "insertion_auc": auc(insertion_curve(logits_fn, images, saliency, targets, baseline=blurred, **common)),
        "road_morf": road_curve(logits_fn, images, saliency, targets, k_road, order="morf", **road),
        "road_lerf": road_curve(logits_fn, images, saliency, targets, k_road, order="lerf", **road),
        "average_drop": drop,
        "increase_confidence": increase,
    }
