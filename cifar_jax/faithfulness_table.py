"""The faithfulness table: every CAM method and two baselines scored on the same images by every metric.

``evaluate_methods`` gives one row per method (means of ``faithfulness.image_metrics`` plus the
``sanity`` figure, ``sanity.full_randomization_spearman``); ``format_table`` prints the rows as markdown;
``trained_model_report`` is what ``python -m cifar_jax.explain --evaluate`` writes::

    rows = evaluate_methods(model, variables, images, labels, key=jax.random.key(0))
    print(format_table(rows))
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from cifar_jax import cam
from cifar_jax.faithfulness import LogitsFn, gaussian_saliency, image_metrics, model_logits_fn, random_saliency
from cifar_jax.sanity import SANITY_DRAWS, cascading_randomization, full_randomization_spearman, shared_pattern_spearman

BASELINES = ("random", "gaussian")
# Methods evaluated when none are named: Score-CAM needs K extra forward passes per image, so it is opt-in.
DEFAULT_METHODS = tuple(m for m in cam.METHODS if m != "scorecam")
# Maps within this of an earlier method's everywhere share its scores: float rounding, not a different explanation.
SAME_MAPS_ATOL = 1e-5
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


def _same_maps(a, b, atol: float = SAME_MAPS_ATOL) -> bool:
    """Whether two (N, H, W) batches of [0, 1] maps differ by at most ``atol`` anywhere."""
    return a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) <= atol


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
    sanity_draws: int = SANITY_DRAWS,
    cascade: Sequence[str] = (),
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
      sanity_draws: random re-initialisations the sanity figure averages (``sanity.full_randomization_spearman``).
      cascade: methods whose row also gets "sanity_cascade", the ``sanity.cascading_randomization`` rows
        computed with the same key and weights; its last row is then their sanity_spearman.
      logits_fn: the predictor the metrics perturb (default ``model_logits_fn(model, variables)``;
        ``inference.TrainedModel.logits_fn`` adds flip averaging where the run used it).
      progress: show a tqdm bar (with ETA) over the batches and the sanity checks.
      metric_kwargs: passed to ``image_metrics`` (steps, blur_sigma, deletion_fill, percentages, noise, road_iters, step_batch).

    Returns:
      rows with "method", "images", the means of deletion_auc, insertion_auc, road_morf,
      road_lerf, average_drop, increase_confidence, sanity_spearman (mean Spearman vs the maps
      after re-initialising every layer, over ``sanity_draws`` re-initialisations drawn from the key's
      third split; 1.0 for the model-independent baselines) and the mean
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
    starts = range(0, n, batch_size)
    # One bar over the metric batches and then each method's sanity check, with tqdm's ETA; also in a log file.
    bar = tqdm(total=len(starts) + (len(methods) if sanity_images > 0 else 0), desc="faithfulness", unit="part",
               disable=not progress)
    for start in starts:
        x, t = images[start : start + batch_size], targets[start : start + batch_size]
        batch_key = jax.random.fold_in(k_metric, start)  # shared by all methods: common random numbers
        scored = []  # (maps, metrics) of this batch
        for name in names:
            sal = _saliency(name, model, variables, x, t, jax.random.fold_in(k_random, start), layer)
            # Maps equal to an earlier method's (Grad-CAM, XGrad-CAM and HiResCAM at the last layer) are scored once.
            metrics = next((m for earlier, m in scored if _same_maps(earlier, sal)), None)
            if metrics is None:
                metrics = image_metrics(logits_fn, x, sal, t, batch_key, mean=mean, std=std, **metric_kwargs)
            scored.append((sal, metrics))
            per_image[name].append(metrics)
        bar.update()
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
            check = dict(method=name, layer=layer, draws=sanity_draws, batch_size=batch_size)
            if name in cascade:
                row["sanity_cascade"] = cascading_randomization(model, variables, images[:m], targets[:m], k_sanity, **check)
                row["sanity_spearman"] = row["sanity_cascade"][-1]["spearman"]
            else:
                row["sanity_spearman"] = full_randomization_spearman(model, variables, images[:m], targets[:m], k_sanity, **check)
            bar.update()
        row["road_morf_curve"] = [float(v) for v in metrics["road_morf"].mean(0)]
        row["road_lerf_curve"] = [float(v) for v in metrics["road_lerf"].mean(0)]
        rows.append(row)
    bar.close()
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

    Maps and metrics use the run's network (``trained.network``: the kernels its evaluation used) on the image
    alone: a map of that function is scored on that function, also where predictions average test-time views
    (which would double every metric's forward passes). Explains the true labels (or the predictions with ``use_predicted``); average drop is
    taken in pixel space with the model's mean and std. ``kwargs`` go to ``evaluate_methods``.
    """
    from cifar_jax.augment import normalize

    images = normalize(images_uint8, trained.mean, trained.std)
    targets = None if use_predicted else jnp.asarray(labels, jnp.int32)
    return evaluate_methods(
        trained.network, trained.variables, images, targets, methods=methods, key=jax.random.key(seed),
        layer=layer, mean=trained.mean, std=trained.std, **kwargs,
    )


def trained_model_report(trained, images_uint8, labels, methods=None, seed: int = 0, layer: str = "layer4",
                         progress: bool = False, sanity_images: int = 100) -> tuple[str, dict]:
    """The faithfulness table of a trained model plus Grad-CAM's cascading randomisation.

    The cascade is computed with the table's key and weights, so its last row is Grad-CAM's sanity_spearman.
    Returns (markdown text, JSON-able record with the rows and the cascade).
    """
    rows = evaluate_trained(trained, images_uint8, labels, methods=methods, seed=seed, layer=layer, progress=progress,
                            sanity_images=sanity_images, cascade=("gradcam",))
    cascade = next((row.pop("sanity_cascade") for row in rows if "sanity_cascade" in row), None)
    m = min(sanity_images, len(labels))
    text = (
        f"Faithfulness on {len(labels)} test images (class-balanced, true labels explained), "
        f"layer {layer}, seed {seed}. Arrows: which way is better. sanity_spearman: mean over "
        f"{SANITY_DRAWS} random re-initialisations of every layer of the mean Spearman vs the trained maps "
        f"({m} images).\n\n" + format_table(rows)
    )
    null = None
    if cascade:
        from cifar_jax.augment import normalize

        null = shared_pattern_spearman(trained.network, trained.variables, normalize(images_uint8[:m], trained.mean, trained.std),
                                       jnp.asarray(labels[:m], jnp.int32), method="gradcam", layer=layer)
        draws = len(cascade[0]["spearman_draws"])
        text += (
            f"\n\nGrad-CAM cascading randomisation sanity check on {m} images, {draws} re-initialisations "
            "(the table's; the last row is its sanity_spearman):\n\n"
            "| layers randomised (top down) | Spearman vs trained, mean | min | max |\n|---|---:|---:|---:|\n"
            + "\n".join(f"| {r['randomized']} | {r['spearman']:.3f} | {min(r['spearman_draws']):.3f} | "
                        f"{max(r['spearman_draws']):.3f} |" for r in cascade)
            + f"\n\nThe trained Grad-CAM maps of different images (i vs i - 1) correlate {null:.3f}: the spatial "
            "pattern all maps share, the level a map that lost what is specific to its image sits near."
        )
    record = {"num_images": len(labels), "layer": layer, "seed": seed, "rows": rows, "cascade": cascade or [],
              "different_images_spearman": null}
    return text + "\n", record
