"""Explanation quality: how faithful is a saliency map to the model it explains?

Every metric takes a ``logits_fn`` (a callable (B, H, W, C) normalised images ->
(B, classes) logits, any model, not only our ResNets), the images, saliency
maps (N, H, W) (higher = more relevant) and the explained classes (N,), and
returns per-image arrays; a table is their mean over images.

* Deletion / insertion AUC (Petsiuk et al. 2018): remove (or insert) pixels in
  order of saliency and integrate the target probability. Deletion lower,
  insertion higher = more faithful.
* ROAD (Rong et al. 2022): remove the most (MoRF) or least (LeRF) relevant
  pixels, fill them by noisy linear imputation, read the target probability.
  MoRF lower, LeRF higher = more faithful.
* Average drop / increase in confidence (Chattopadhyay et al. 2018) for the
  image multiplied by its map. Drop lower, increase higher = better.
* Cascading model-parameter randomisation (Adebayo et al. 2018): maps of a
  faithful method change (low Spearman correlation) when the weights do.

Two baselines, a uniform random map and a centred Gaussian, are usable
wherever a CAM map is. Wrap a Flax model with ``model_logits_fn``::

    logits_fn = model_logits_fn(model, variables)
    curves = deletion_curve(logits_fn, images, cams.maps, cams.targets)
    rows = evaluate_methods(model, variables, images, labels, key=jax.random.key(0))
    print(format_table(rows))

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

from cifar_jax import cam
from cifar_jax.cam.ops import EPS, chunked_map
from cifar_jax.models import EvalLogits

LogitsFn = Callable[[jax.Array], jax.Array]  # (B, H, W, C) normalised images -> (B, classes) logits
ROAD_PERCENTAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Top-down order of the cascading randomisation; "stem" covers stem_conv and stem_bn.
CASCADE = ("head", "layer4", "layer3", "layer2", "layer1", "stem")
BASELINES = ("random", "gaussian")
# Methods evaluated when none are named: Score-CAM needs K extra forward passes per image, so it is opt-in.
DEFAULT_METHODS = tuple(m for m in cam.METHODS if m != "scorecam")
# Which way is better, for the table header.
DIRECTIONS = {
    "deletion_auc": "↓",
    "insertion_auc": "↑",
    "road_morf": "↓",
    "road_lerf": "↑",
    "average_drop": "↓",
    "increase_confidence": "↑",
    "sanity_spearman": "↓",
}


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

    def one_step(k):
        return target_probability(logits_fn, jnp.where((ranks < k)[..., None], end, start), targets)

    counts = jnp.asarray(_counts(np.arange(steps + 1) / steps, ranks))
    # step_batch steps per forward pass bounds memory to N * step_batch images.
    return chunked_map(jax.vmap(one_step), counts, step_batch).T


def deletion_curve(logits_fn: LogitsFn, images, saliency, targets, *, steps: int = 32, baseline=None, key=None, step_batch: int = 4):
    """Deletion curve (Petsiuk et al. 2018): (N, H, W, C), (N, H, W), (N,) -> (N, steps + 1).

    Entry i is the target probability after the ``i / steps`` most salient pixels are
    replaced by ``baseline`` (N, H, W, C) (default zeros: the mean colour in normalised space).
    ``key`` breaks saliency ties at random; ``step_batch`` steps share one forward pass.
    """
    images = jnp.asarray(images, jnp.float32)
    baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(baseline, images.shape)
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

    def one_level(args):
        k, level_key = args
        filled = noisy_linear_impute(images, ranks < k, level_key, noise=noise, iters=iters)
        return target_probability(logits_fn, filled, targets)

    counts = jnp.asarray(_counts(percentages, ranks))
    keys = jax.random.split(noise_key, len(percentages))
    return chunked_map(jax.vmap(one_level), (counts, keys), step_batch).T


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
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = 0.01,
    road_iters: int = 100,
    mean=None,
    std=None,
    step_batch: int = 4,
) -> dict:
    """Every metric for one batch: (N, H, W, C), (N, H, W), (N,) -> dict of per-image arrays.

    Keys: deletion_auc, insertion_auc, average_drop, increase_confidence (N,) and
    road_morf, road_lerf (N, P). Use the same ``key`` for every method compared
    (common random numbers: the same noise and tie-breaking).
    """
    k_rank, k_road = jax.random.split(key)
    common = dict(steps=steps, key=k_rank, step_batch=step_batch)
    road = dict(percentages=percentages, noise=noise, iters=road_iters, step_batch=step_batch)
    drop, increase = average_drop_increase(logits_fn, images, saliency, targets, mean=mean, std=std)
    return {
        "deletion_auc": auc(deletion_curve(logits_fn, images, saliency, targets, **common)),
        "insertion_auc": auc(insertion_curve(logits_fn, images, saliency, targets, blur_sigma=blur_sigma, **common)),
        "road_morf": road_curve(logits_fn, images, saliency, targets, k_road, order="morf", **road),
        "road_lerf": road_curve(logits_fn, images, saliency, targets, k_road, order="lerf", **road),
        "average_drop": drop,
        "increase_confidence": increase,
    }


# --------------------------------------------------------------------------- parameter randomisation sanity check


@jax.jit
def spearman(a, b):
    """Spearman rank correlation (average ranks for ties) per map: (N, H, W), (N, H, W) -> (N,).

    NaN where either map is constant (its ranks have no variance).
    """
    n = a.shape[0]
    ra = jax.scipy.stats.rankdata(a.reshape(n, -1), axis=-1)
    rb = jax.scipy.stats.rankdata(b.reshape(n, -1), axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    denom = jnp.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    return jnp.where(denom > 0, (ra * rb).sum(-1) / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def _in_groups(name: str, groups) -> bool:
    return any(name == g or name.startswith(g + "_") for g in groups)


def randomize_params(model, variables, groups: Sequence[str], key, image_shape=(32, 32, 3)) -> dict:
    """Variables with the params and batch statistics of ``groups`` (names in CASCADE) re-initialised.

    The new values come from ``model.init(key, ...)``, so they have the model's own
    initialisers and shapes; the same key gives the same weights in every cascade step.
    """
    return _replace_groups(variables, fresh_variables(model, key, tuple(image_shape)), groups)


@functools.lru_cache(maxsize=16)
def _compiled_init(model, image_shape):
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))


def fresh_variables(model, key, image_shape=(32, 32, 3)) -> dict:
    """``model.init`` for one (1, *image_shape) input, compiled once per model and shape: key -> variables."""
    return _compiled_init(model, tuple(image_shape))(key)


def _replace_groups(variables, fresh, groups) -> dict:
    """``variables`` with every top-level entry named by ``groups`` taken from ``fresh`` instead."""
    return {
        col: {name: fresh[col][name] if _in_groups(name, groups) else value for name, value in dict(tree).items()}
        for col, tree in dict(variables).items()
    }


def _maps_in_batches(model, variables, images, targets, *, method, layer, batch_size):
    """CAM maps (N, H, W) computed batch_size images at a time."""
    parts = [
        cam.saliency_maps(method, model, variables, images[i : i + batch_size], targets[i : i + batch_size], layer=layer)
        for i in range(0, images.shape[0], batch_size)
    ]
    return jnp.concatenate(parts)


def cascading_randomization(
    model, variables, images, targets, key, *, method: str = "gradcam", layer: str = "layer4",
    groups: Sequence[str] = CASCADE, batch_size: int = 256,
) -> list[dict]:
    """Adebayo et al. (2018) cascading randomisation: list of {"randomized", "spearman"} rows.

    Args:
      model, variables: a ResNet from ``cifar_jax.models`` and its (trained) variables.
      images: (N, H, W, 3) normalised; targets: (N,) int classes, kept fixed throughout.
      key: PRNG key of the re-initialised weights.
      groups: top-down order; row i randomises groups[:i] (row 0, "none", is the reference).

    ``spearman`` is the mean (over images with non-constant maps) rank correlation
    between each randomised model's map and the trained model's map; a method that
    really depends on the weights falls well below 1.
    """
    images = jnp.asarray(images, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    maps = functools.partial(_maps_in_batches, model, images=images, targets=targets, method=method, layer=layer, batch_size=batch_size)
    reference = maps(variables)
    fresh = fresh_variables(model, key, images.shape[1:])  # one init serves every step of the cascade
    rows = [{"randomized": "none", "spearman": float(jnp.nanmean(spearman(reference, reference)))}]
    for i in range(1, len(groups) + 1):
        randomized = _replace_groups(variables, fresh, groups[:i])
        rows.append({"randomized": "+".join(groups[:i]), "spearman": float(jnp.nanmean(spearman(reference, maps(randomized))))})
    return rows


def full_randomization_spearman(model, variables, images, targets, key, *, method="gradcam", layer="layer4", batch_size=256) -> float:
    """Mean Spearman correlation between the maps (N images) of the model and of a fully re-initialised copy.

    The last row of ``cascading_randomization`` without the intermediate steps.
    """
    images = jnp.asarray(images, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    maps = functools.partial(_maps_in_batches, model, images=images, targets=targets, method=method, layer=layer, batch_size=batch_size)
    randomized = randomize_params(model, variables, CASCADE, key, images.shape[1:])
    return float(jnp.nanmean(spearman(maps(variables), maps(randomized))))


# --------------------------------------------------------------------------- tables


@jax.jit
def _predict(logits_fn, images):
    """Predicted class per image: (N, H, W, C) -> (N,)."""
    return jnp.argmax(logits_fn(images), axis=-1)


def _saliency(name, model, variables, images, targets, key, layer):
    """(N, H, W) map of a CAM method or a baseline for one batch."""
    if name == "random":
        return random_saliency(key, images.shape[:3])
    if name == "gaussian":
        return gaussian_saliency(images.shape[:3])
    return cam.saliency_maps(name, model, variables, images, targets, layer=layer, key=key)


def evaluate_methods(
    model,
    variables,
    images,
    targets=None,
    *,
    methods: Sequence[str] | None = None,
    key=None,
    layer: str = "layer4",
    mean=None,
    std=None,
    batch_size: int = 100,
    sanity_images: int = 100,
    logits_fn: LogitsFn | None = None,
    progress: bool = False,
    **metric_kwargs,
) -> list[dict]:
    """One row per CAM method and per baseline ("random", "gaussian"), one column per metric.

    Args:
      model, variables: a ResNet and its variables.
      images: (N, H, W, 3) normalised; targets: (N,) classes to explain, or None for the predictions.
      methods: keys of ``cam.METHODS``; None means ``DEFAULT_METHODS`` (all but Score-CAM).
      key: PRNG key (default ``jax.random.key(0)``) for the random map, ROAD noise, ties, randomisation.
      mean, std: (C,) normalisation, for average drop in pixel space (else normalised space).
      batch_size: images per compiled call.
      sanity_images: images for the sanity check (0 skips it; column then NaN).
      logits_fn: the predictor the metrics perturb (default ``model_logits_fn(model, variables)``;
        ``inference.TrainedModel.logits_fn`` adds flip averaging where the run used it).
      progress: show a tqdm bar over batches.
      metric_kwargs: passed to ``image_metrics`` (steps, blur_sigma, percentages, noise, road_iters, step_batch).

    Returns:
      rows with "method", "images", the means of deletion_auc, insertion_auc, road_morf,
      road_lerf, average_drop, increase_confidence, sanity_spearman (Spearman after
      randomising every layer; 1.0 for the model-independent baselines) and the mean
      ROAD curves "road_morf_curve", "road_lerf_curve" (lists over percentages).
    """
    from tqdm.auto import tqdm

    methods = DEFAULT_METHODS if methods is None else tuple(methods)
    key = jax.random.key(0) if key is None else key
    k_random, k_metric, k_sanity = jax.random.split(key, 3)
    logits_fn = model_logits_fn(model, variables) if logits_fn is None else logits_fn
    images = jnp.asarray(images, jnp.float32)
    n = images.shape[0]
    if targets is None:
        targets = jnp.concatenate([_predict(logits_fn, images[i : i + batch_size]) for i in range(0, n, batch_size)])
    targets = jnp.asarray(targets, jnp.int32)
    names = methods + BASELINES
    per_image = {name: [] for name in names}
    for start in tqdm(range(0, n, batch_size), desc="faithfulness", disable=None if progress else True):
        x, t = images[start : start + batch_size], targets[start : start + batch_size]
        batch_key = jax.random.fold_in(k_metric, start)  # shared by all methods: common random numbers
        for name in names:
            sal = _saliency(name, model, variables, x, t, jax.random.fold_in(k_random, start), layer)
            per_image[name].append(image_metrics(logits_fn, x, sal, t, batch_key, mean=mean, std=std, **metric_kwargs))
    rows = []
    for name in names:
        metrics = {k: jnp.concatenate([batch[k] for batch in per_image[name]]) for k in per_image[name][0]}
        row = {"method": name, "images": n}
        for k, v in metrics.items():
            row[k] = float(v.mean())
        if name in BASELINES:  # Model-independent maps: identical after randomisation.
            row["sanity_spearman"] = 1.0
        elif sanity_images <= 0:
            row["sanity_spearman"] = float("nan")
        else:
            m = min(sanity_images, n)
            row["sanity_spearman"] = full_randomization_spearman(
                model, variables, images[:m], targets[:m], k_sanity, method=name, layer=layer, batch_size=batch_size
            )
        row["road_morf_curve"] = [float(v) for v in metrics["road_morf"].mean(0)]
        row["road_lerf_curve"] = [float(v) for v in metrics["road_lerf"].mean(0)]
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Markdown table of ``evaluate_methods`` rows; default columns are the scalar ones, arrows say which way is better."""
    if not rows:
        return ""
    if columns is None:
        columns = [k for k, v in rows[0].items() if isinstance(v, (str, int, float))]
    header = [f"{c} {DIRECTIONS[c]}" if c in DIRECTIONS else c for c in columns]
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def evaluate_trained(trained, images_uint8, labels, methods=None, seed: int = 0, layer: str = "layer4", *, use_predicted: bool = False, **kwargs) -> list[dict]:
    """``evaluate_methods`` for an ``inference.TrainedModel`` on (N, H, W, 3) uint8 images and (N,) labels.

    The metrics perturb THE predictor (``trained.logits_fn``, flip-averaged if the run used it).
    Explains the true labels (or the predictions with ``use_predicted``); average drop is
    taken in pixel space with the model's mean and std. ``kwargs`` go to ``evaluate_methods``.
    """
    from cifar_jax.augment import normalize

    images = normalize(images_uint8, trained.mean, trained.std)
    targets = None if use_predicted else jnp.asarray(labels, jnp.int32)
    return evaluate_methods(
        trained.model, trained.variables, images, targets, methods=methods, key=jax.random.key(seed),
        layer=layer, mean=trained.mean, std=trained.std, logits_fn=trained.logits_fn, **kwargs,
    )


def trained_model_report(trained, images_uint8, labels, methods=None, seed: int = 0, layer: str = "layer4",
                         progress: bool = False, sanity_images: int = 100) -> tuple[str, dict]:
    """The faithfulness table of a trained model plus Grad-CAM's cascading randomisation.

    Returns (markdown text, JSON-able record with the rows and the cascade).
    """
    from cifar_jax.augment import normalize

    rows = evaluate_trained(trained, images_uint8, labels, methods=methods, seed=seed, layer=layer, progress=progress)
    m = min(sanity_images, len(labels))
    cascade = cascading_randomization(
        trained.model, trained.variables, normalize(images_uint8[:m], trained.mean, trained.std),
        labels[:m], jax.random.key(seed), method="gradcam", layer=layer,
    )
    cascade_table = "| layers randomised (top down) | Spearman vs trained |\n|---|---:|\n" + "\n".join(
        f"| {r['randomized']} | {r['spearman']:.3f} |" for r in cascade
    )
    text = (
        f"Faithfulness on {len(labels)} test images (class-balanced, true labels explained), "
        f"layer {layer}, seed {seed}. Arrows: which way is better.\n\n"
        + format_table(rows)
        + f"\n\nGrad-CAM cascading randomisation sanity check on {m} images:\n\n" + cascade_table + "\n"
    )
    record = {"num_images": len(labels), "layer": layer, "seed": seed, "rows": rows, "cascade": cascade}
    return text, record
