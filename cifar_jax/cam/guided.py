"""Guided backpropagation and Guided Grad-CAM (Springenberg et al. 2015; Selvaraju et al. 2017)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cifar_jax.cam.base import compute_cams
from cifar_jax.cam.ops import cached
from cifar_jax.cam.intercept import eval_kwargs
from cifar_jax.cam.ops import EPS, class_score


@jax.custom_vjp
def guided_relu(x):
    """ReLU whose backward pass lets only positive gradients through positive inputs (Springenberg et al. 2015)."""
    return jax.nn.relu(x)


def _guided_relu_fwd(x):
    return jax.nn.relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, 0.0).astype(g.dtype),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _build_guided(model):
    if not hasattr(model, "act"):  # ReLU is a function, not a module: interception cannot swap it.
        raise ValueError(f"guided backpropagation needs a model with an `act` field (its ReLU); {type(model).__name__} has none")
    guided = model.clone(act=guided_relu)
    kwargs = eval_kwargs(model)

    def run(variables, images, targets):
        def score(x):
            return class_score(guided.apply(variables, x, **kwargs).astype(jnp.float32), targets).sum()

        return jax.grad(score)(images)

    return jax.jit(run)


def guided_backprop(model, variables, images, targets):
    """Guided backpropagation: (N, H, W, C) input gradients of the target logits through guided ReLUs.

    ``model`` must have an ``act`` field (our ResNets, flax's example ResNets); ``targets`` an int or (N,) ints.
    """
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (images.shape[0],))
    return cached(model, ("guided",), lambda: _build_guided(model))(variables, jnp.asarray(images, jnp.float32), targets)


def guided_grad_cam(model, variables, images, targets=None, *, layer="layer4"):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map -> (N, H, W, C)."""
    cams = compute_cams(model, variables, images, targets, method="gradcam", layer=layer)
    return guided_backprop(model, variables, images, cams.targets) * cams.maps[..., None]


def deprocess_gradients(grads):
    """(N, H, W, C) gradients -> [0, 1] images for display (standardised, 0.1 std, centred at 0.5)."""
    g = grads - grads.mean(axis=(1, 2, 3), keepdims=True)
    g = g / (g.std(axis=(1, 2, 3), keepdims=True) + EPS) * 0.1 + 0.5
    return jnp.clip(g, 0.0, 1.0)
