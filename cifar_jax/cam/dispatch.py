"""One entry point for every method by name, returning display-ready (N, H, W) maps (gallery, benchmarks, CLIs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cifar_jax.cam.attribution import gradients, input_x_gradient, integrated_gradients, occlusion, smooth_grad
from cifar_jax.cam.guided import guided_backprop, guided_grad_cam
from cifar_jax.cam.base import compute_cams
from cifar_jax.cam.methods import ALL_METHODS, CAM_METHODS, canonical_method
from cifar_jax.cam.ops import minmax_scale


def pixel_map(attr):
    """(N, H, W, C) attribution -> (N, H, W) in [0, 1]: |attribution| summed over channels, min-max scaled."""
    return minmax_scale(jnp.abs(attr).sum(-1) if attr.ndim == 4 else attr)


def saliency_maps(method: str, model, variables, images, targets=None, *, layer="layer4", key=None, **kwargs):
    """(N, H, W) maps in [0, 1] from any method in ``ALL_METHODS`` (any spelling).

    CAM methods use ``layer``; "smoothgrad" smooths vanilla gradients with ``key``
    (default ``jax.random.key(0)``); ``kwargs`` go to the method (e.g. steps=, window=).
    Pixel attributions are shown as |attribution| summed over channels.
    """
    name = canonical_method(method, ALL_METHODS)
    images = jnp.asarray(images, jnp.float32)
    if name in CAM_METHODS or name == "fullgrad":
        return compute_cams(model, variables, images, targets, method=name, layer=layer, **kwargs).maps
    if name in ("guided-backprop", "guided-gradcam"):
        if targets is None:
            targets = compute_cams(model, variables, images, None, layer=layer).targets
        if name == "guided-backprop":
            return pixel_map(guided_backprop(model, variables, images, targets))
        return pixel_map(guided_grad_cam(model, variables, images, targets, layer=layer))
    if name == "smoothgrad":
        if targets is None:  # fix the classes of the clean images for every noisy copy
            targets = jnp.argmax(compute_cams(model, variables, images, None, layer=layer).logits, -1)
        key = jax.random.key(0) if key is None else key
        return pixel_map(smooth_grad(lambda x: gradients(model, variables, x, targets), images, key, **kwargs))
    fn = {"gradients": gradients, "input-x-gradient": input_x_gradient,
          "integrated-gradients": integrated_gradients, "occlusion": occlusion}[name]
    return pixel_map(fn(model, variables, images, targets, **kwargs))
