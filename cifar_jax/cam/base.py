"""The shared base: gradient of a target score with respect to any layer, one compiled function per configuration.

    cam_fn = make_cam_fn(model, variables, layer="layer3/block0", method="gradcam++")
    cams = cam_fn(images)          # CAMs(raw (N, h, w), maps (N, H, W), targets (N,), logits)

Per batch, one forward pass runs under ``flax.linen.intercept_methods``: the
chosen module's output A is recorded and a zero ``delta`` is added to it;
``jax.grad`` of the summed target scores with respect to ``delta`` is dscore/dA
for every image at once (evaluation mode: images do not interact). A method
turns (A, G) into weighted activations; the base sums them over channels (or
takes the first principal component), applies ReLU, upsamples to the input with
half-pixel bilinear interpolation and scales each map to [0, 1].
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cifar_jax.cam.attribution import full_grad_raw
from cifar_jax.cam.intercept import Layer, as_apply_fn, layer_output_shape, run_with_layer
from cifar_jax.cam.methods import ALWAYS_EIGEN, CAM_METHODS, canonical_method
from cifar_jax.cam.ops import (
    CAMs, as_float32, cached, target_mode, targets_for, LayerContext, chunked_map, class_probability, class_score, first_principal_component, minmax_scale,
    upsample_and_scale,
)



# --------------------------------------------------------------------------- gradients at a layer


def layer_gradients(apply_fn, variables, images, layer: Layer, score: Callable):
    """Output A of ``layer``, dscore/dA, model outputs and scores, in one forward and one backward pass.

    ``score`` maps the (float32) model outputs to (N,) per-image scores.
    Returns (A (N, ...), G like A, outputs, scores (N,)); A and G in the layer's dtype and layout.
    """
    shape = layer_output_shape(apply_fn, variables, images, layer)

    def total(delta):
        outputs, acts = run_with_layer(apply_fn, variables, images, layer, delta=delta)
        outputs = as_float32(outputs)
        scores = score(outputs)
        return scores.sum(), (acts, outputs, scores)

    grads, (acts, outputs, scores) = jax.grad(total, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    return acts, grads, outputs, scores


def activations_and_grads(model, variables, images, targets, layer: Layer = "layer4"):
    """Layer activations A (N, h, w, K), dlogit[target]/dA (N, h, w, K) and logits (N, C), float32.

    ``model`` is a Flax module (evaluated with train=False) or an apply function; ``targets`` (N,) ints.
    """
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (images.shape[0],))
    acts, grads, logits, _ = layer_gradients(as_apply_fn(model), variables, images, layer, lambda out: class_score(out, targets))
    return acts.astype(jnp.float32), grads.astype(jnp.float32), logits


def split_model(model, variables, layer: str):
    """Our ResNet only: (features, head): images -> stage activations, activations -> logits (eval mode)."""
    features = lambda x: model.apply(variables, x, train=False, end=layer)
    head = lambda a: model.apply(variables, a, train=False, start=layer).astype(jnp.float32)
    return features, head


# --------------------------------------------------------------------------- one configuration


def _cam_single_target(apply_fn, variables, images, targets, *, layer, method, reshape_transform, eigen_smooth,
                       batch_size, score, weight_score):
    """(raw (N, h, w) after ReLU, outputs) for (N,) targets."""
    if method == "fullgrad":

        return full_grad_raw(apply_fn, variables, images, lambda out: score(out, targets))
    acts_raw, grads_raw, outputs, scores = layer_gradients(apply_fn, variables, images, layer, lambda out: score(out, targets))
    transform = reshape_transform or (lambda a: a)
    acts, grads = transform(acts_raw).astype(jnp.float32), transform(grads_raw).astype(jnp.float32)
    if acts.ndim != 4:
        raise ValueError(f"layer {layer!r} gives activations of shape {acts.shape}, not (N, h, w, K); "
                         "pass reshape_transform (e.g. vit_reshape_transform(h, w)) for tokens")

    def channel_scores(modify):  # (N, K) target scores with modify(A, k) in place of A, for every channel k
        def one(k):
            out, _ = run_with_layer(apply_fn, variables, images, layer, replace=modify(acts_raw, k))
            return score(as_float32(out), targets)

        chunk = max(1, batch_size // images.shape[0])
        return chunked_map(jax.vmap(one), jnp.arange(acts_raw.shape[-1]), chunk).T

    head = lambda x: as_float32(apply_fn(variables, x))
    ctx = LayerContext(acts, grads, targets, head, images, batch_size, weight_score, channel_scores, scores)
    weighted = CAM_METHODS[method](ctx)
    raw = first_principal_component(weighted) if eigen_smooth or method in ALWAYS_EIGEN else weighted.sum(-1)
    return jax.nn.relu(raw), outputs


def _build(apply_fn, *, layer, method, reshape_transform, eigen_smooth, aug_smooth, mode, target_fn, batch_size):
    """A jitted (variables, images, targets) -> CAMs for one configuration.

    mode: "given" (targets (N,)), "multi" (targets (N, T)), "predicted" or "all" (targets
    chosen from the outputs inside the compiled function), "callable" (``target_fn``).
    """
    if mode == "callable":
        score = weight_score = lambda out, t: target_fn(out)
    else:
        score, weight_score = class_score, class_probability
    single = functools.partial(_cam_single_target, apply_fn, layer=layer, method=method, reshape_transform=reshape_transform,
                               eigen_smooth=eigen_smooth, batch_size=batch_size, score=score, weight_score=weight_score)

    def cams(variables, images, targets):
        size = images.shape[1:3]
        if targets.ndim == 2:  # (N, T): one map per (image, target), vmapped over T.
            raw, outputs = jax.vmap(lambda t: single(variables, images, t), in_axes=1, out_axes=(1, None))(targets)
            n, t, h, w = raw.shape
            return raw, upsample_and_scale(raw.reshape(n * t, h, w), size).reshape(n, t, *size), outputs
        raw, outputs = single(variables, images, targets)
        return raw, upsample_and_scale(raw, size), outputs

    def run(variables, images, targets):
        if mode in ("predicted", "all"):
            logits = as_float32(apply_fn(variables, images))
            n, c = logits.shape
            targets = jnp.argmax(logits, -1) if mode == "predicted" else jnp.broadcast_to(jnp.arange(c), (n, c))
        raw, maps, outputs = cams(variables, images, targets)
        if aug_smooth:  # Test-time flip: explain the mirror image for the same targets and mirror its map back.
            raw_f, maps_f, _ = cams(variables, images[:, :, ::-1], targets)
            raw = 0.5 * (raw + raw_f[..., ::-1])
            maps = minmax_scale(0.5 * (maps + maps_f[..., ::-1]))
        shown = jnp.full(targets.shape, -1, jnp.int32) if mode == "callable" else targets
        return CAMs(raw, maps, shown, outputs)

    return jax.jit(run)


def make_cam_fn(
    model,
    variables,
    *,
    layer: Layer,
    method: str = "gradcam",
    target: Any = None,
    reshape_transform: Callable | None = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    apply_kwargs: dict | None = None,
    batch_size: int = 256,
) -> Callable[..., CAMs]:
    """A compiled CAM function for any Flax model, no change to the model.

    Args:
      model: a Flax module (applied in evaluation mode: train=False / deterministic=True
        when its ``__call__`` takes them, then ``apply_kwargs``), or an apply function
        ``(variables, x) -> outputs`` such as ``functools.partial(model.apply, train=False)``.
      variables: the model's variables (params, batch_stats, ...).
      layer: a module path ("layer4", "layer3/block0/conv2"; see ``list_layers``) or a
        predicate ``lambda mdl: ...`` on bound modules; its first ``__call__`` is explained.
      method: a name in ``CAM_METHODS`` or "fullgrad" (spellings are normalised).
      target: None (predicted class), an int, an (N,) or (N, T) int array, "all", or a
        callable from the model outputs to (N,) scores (``classifier_output(c)``,
        ``softmax_output(c)``, a segmentation or regression score).
      reshape_transform: maps the layer output to (N, h, w, K), e.g. ``vit_reshape_transform(h, w)``.
      aug_smooth: average with the map of the mirrored image, mirrored back.
      eigen_smooth: first principal component of the weighted activations instead of their sum.
      batch_size: images per extra forward pass (Score-CAM, Ablation-CAM).

    Returns:
      ``fn(images (N, H, W, C), targets=None) -> CAMs``; ``targets`` there overrides
      ``target`` for that call. ``fn`` is traceable (it may be used inside ``jax.jit``/``vmap``);
      its compiled function lives in the closure.
    """
    method = canonical_method(method, (*CAM_METHODS, "fullgrad"))
    mode, fixed, target_fn = target_mode(target)
    build = functools.partial(_build, as_apply_fn(model, apply_kwargs), layer=layer, method=method,
                              reshape_transform=reshape_transform, eigen_smooth=bool(eigen_smooth),
                              aug_smooth=bool(aug_smooth), batch_size=int(batch_size))
    compiled = {}  # mode -> jitted function, built on first use

    def fn(images, targets=None):
        m, f, t_fn = (mode, fixed, target_fn) if targets is None else target_mode(targets)
        images = jnp.asarray(images, jnp.float32)
        key = (m, t_fn)
        if key not in compiled:
            compiled[key] = build(mode=m, target_fn=t_fn)
        return compiled[key](variables, images, targets_for(m, f, images.shape[0]))

    return fn


# --------------------------------------------------------------------------- compute_cams (today's entry point)

def compute_cams(
    model,
    variables,
    images,
    targets=None,
    *,
    method: str = "gradcam",
    layer: Layer = "layer4",
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    batch_size: int = 256,
) -> CAMs:
    """Class activation maps for a batch, in one compiled forward+backward (``make_cam_fn``, cached per model).

    Args:
      model, variables: a Flax module (evaluation mode) and its variables.
      images: (N, H, W, C) float, normalised as the model was trained.
      targets: None (each image's predicted class), an int, an (N,) int array,
        an (N, T) int array (T maps per image), "all" (every class: T = C) or a callable.
      method: a name in ``CAM_METHODS`` or "fullgrad".
      layer: a module path (default "layer4") or a predicate on modules.
      aug_smooth, eigen_smooth, batch_size: as in ``make_cam_fn``.

    Returns:
      CAMs(raw, maps, targets, logits); see the class for shapes.
    """
    method = canonical_method(method, (*CAM_METHODS, "fullgrad"))
    mode, fixed, target_fn = target_mode(targets)
    images = jnp.asarray(images, jnp.float32)
    config = (layer, method, bool(eigen_smooth), bool(aug_smooth), mode, target_fn, int(batch_size))
    fn = cached(model, ("cam", *config), lambda: _build(
        as_apply_fn(model), layer=layer, method=method, reshape_transform=None, eigen_smooth=bool(eigen_smooth),
        aug_smooth=bool(aug_smooth), mode=mode, target_fn=target_fn, batch_size=int(batch_size)))
    return fn(variables, images, targets_for(mode, fixed, images.shape[0]))
