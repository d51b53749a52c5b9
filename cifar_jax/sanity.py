"""Model-parameter randomisation sanity check (Adebayo et al. 2018): does a saliency map depend on the weights?

Re-initialise the model's layers (all at once, or top down one group at a time: the cascade) and compare each
randomised model's maps with the trained model's by Spearman rank correlation; a method whose maps really
depend on the weights falls well below 1. Parameters and BatchNorm statistics are re-initialised with the
model's own initialisers (``model.init``).

One draw of random weights gives every image the same random network, whose maps share one spatial
pattern; its correlation with the trained maps' shared pattern (objects sit near the centre) does not
average out over images. So the sanity figure averages ``SANITY_DRAWS`` re-initialisations, and the
cascade's rows and the figure use the same keys and weights: its last row is the figure.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from cifar_jax import cam
from cifar_jax.models import PARAM_GROUPS


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
    """Variables with the params and batch statistics of ``groups`` (names in PARAM_GROUPS) re-initialised.

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


SANITY_DRAWS = 8  # random re-initialisations averaged by the sanity figure (docs/faithfulness.md)


def sanity_keys(key, draws: int = SANITY_DRAWS):
    """The (draws,) keys of the re-initialised weights: one ``fresh_variables`` per key."""
    return jax.random.split(key, draws)


def randomized_spearmans(
    model, variables, images, targets, key, steps: Sequence[Sequence[str]], *, method: str = "gradcam",
    layer: str = "layer4", draws: int = SANITY_DRAWS, batch_size: int = 256,
):
    """Mean-over-images Spearman of each randomised model's maps vs the trained model's: (len(steps), draws).

    Args:
      images: (N, H, W, 3) normalised; targets: (N,) int classes, kept fixed throughout.
      key: split by ``sanity_keys`` into ``draws`` keys; draw d re-initialises with ``fresh_variables(model, keys[d])``.
      steps: step s re-initialises the groups ``steps[s]`` (names in PARAM_GROUPS); every step of a draw
        takes its new values from the same fresh variables.

    Maps are the method's (N, H, W) ``cam.saliency_maps`` (upsampled, min-max scaled), the maps the
    perturbation metrics score; images whose randomised map is constant (no ranks) are left out of the mean.
    """
    images = jnp.asarray(images, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    maps = functools.partial(_maps_in_batches, model, images=images, targets=targets, method=method, layer=layer, batch_size=batch_size)
    reference = maps(variables)
    out = []
    for k in sanity_keys(key, draws):
        fresh = fresh_variables(model, k, images.shape[1:])
        out.append([float(jnp.nanmean(spearman(reference, maps(_replace_groups(variables, fresh, g))))) for g in steps])
    return jnp.asarray(out).T


def cascading_randomization(
    model, variables, images, targets, key, *, method: str = "gradcam", layer: str = "layer4",
    groups: Sequence[str] = PARAM_GROUPS, draws: int = SANITY_DRAWS, batch_size: int = 256,
) -> list[dict]:
    """Adebayo et al. (2018) cascading randomisation: list of {"randomized", "spearman", "spearman_draws"} rows.

    Args:
      model, variables: a ResNet from ``cifar_jax.models`` and its (trained) variables.
      images: (N, H, W, 3) normalised; targets: (N,) int classes, kept fixed throughout.
      key: PRNG key of the re-initialised weights (``draws`` of them, see ``randomized_spearmans``).
      groups: top-down order; row i randomises groups[:i] (row 0, "none", is the reference).

    ``spearman`` is the mean over the draws of the mean (over images with non-constant maps) rank
    correlation between the randomised model's maps and the trained model's; ``spearman_draws`` lists
    the draws. With the default groups the last row is ``full_randomization_spearman`` for the same key.
    """
    steps = [tuple(groups[:i]) for i in range(1, len(groups) + 1)]
    table = randomized_spearmans(model, variables, images, targets, key, steps, method=method, layer=layer,
                                 draws=draws, batch_size=batch_size)
    rows = [{"randomized": "none", "spearman": 1.0, "spearman_draws": [1.0] * draws}]
    for g, per_draw in zip(steps, table):
        rows.append({"randomized": "+".join(g), "spearman": float(per_draw.mean()), "spearman_draws": [float(v) for v in per_draw]})
    return rows


def full_randomization_spearman(model, variables, images, targets, key, *, method="gradcam", layer="layer4",
                                draws: int = SANITY_DRAWS, batch_size=256) -> float:
    """The sanity figure: mean over ``draws`` fully re-initialised copies of the mean Spearman between their maps and the model's.

    The last row of ``cascading_randomization`` (same key, same weights) without the intermediate steps.
    """
    table = randomized_spearmans(model, variables, images, targets, key, [tuple(PARAM_GROUPS)], method=method,
                                 layer=layer, draws=draws, batch_size=batch_size)
    return float(table[0].mean())


def different_images_spearman(maps) -> float:
    """Mean Spearman between the maps of image i and image i - 1 (cyclically): (N, H, W) -> float.

    The spatial pattern all maps share (the null the sanity figure is read against): 1 for N copies of
    one map, about 0 for independent maps.
    """
    return float(jnp.nanmean(spearman(maps, jnp.roll(maps, 1, axis=0))))


def shared_pattern_spearman(model, variables, images, targets, *, method="gradcam", layer="layer4", batch_size=256) -> float:
    """``different_images_spearman`` of the method's maps of the (N, H, W, 3) images under ``variables``."""
    images = jnp.asarray(images, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    return different_images_spearman(_maps_in_batches(model, variables, images, targets, method=method, layer=layer, batch_size=batch_size))
