"""One entry point for every method by name, returning display-ready (N, H, W) maps (gallery, benchmarks, CLIs)."""

from __future__ import annotations

import jax.numpy as jnp

from cifar_jax.cam.base import compute_cams
from cifar_jax.cam.guided import guided_backprop, guided_grad_cam
from cifar_jax.cam.methods import ALL_METHODS, REGISTRY, canonical_method
from cifar_jax.cam.ops import minmax_scale


def pixel_map(attr):
    """(N, H, W, C) attribution -> (N, H, W) in [0, 1]: |attribution| summed over channels, min-max scaled."""
    return minmax_scale(jnp.abs(attr).sum(-1) if attr.ndim == 4 else attr)


def saliency_maps(method: str, model, variables, images, targets=None, *, layer="layer4", key=None, **kwargs):
    """(N, H, W) maps in [0, 1] from any method in ``ALL_METHODS`` (any spelling), by its ``REGISTRY`` kind.

    CAM methods use ``layer``; methods that draw noise (SmoothGrad) use ``key`` (default
    ``jax.random.key(0)``); ``kwargs`` go to the method (e.g. steps=, window=).
    Pixel attributions are shown as |attribution| summed over channels.
    """
    m = REGISTRY[canonical_method(method, ALL_METHODS)]
    images = jnp.asarray(images, jnp.float32)
    if m.kind in ("cam", "fullgrad"):
        return compute_cams(model, variables, images, targets, method=m.name, layer=layer, **kwargs).maps
    if m.kind == "guided":
        if targets is None:
            targets = compute_cams(model, variables, images, None, layer=layer).targets
        if m.weigh is None:
            return pixel_map(guided_backprop(model, variables, images, targets))
        return pixel_map(guided_grad_cam(model, variables, images, targets, layer=layer))
    if m.random and key is not None:
        kwargs = {**kwargs, "key": key}
    return pixel_map(m.attribute(model, variables, images, targets, **kwargs))
