"""Class activation maps, done functionally: split the model, differentiate the head.

The model is split at a stage (``layer4`` by default)::

    A      = model.apply(variables, x, end=layer)         # (N, h, w, K) activations
    logits = model.apply(variables, A, start=layer)       # (N, C)

and ``jax.grad`` of the chosen class logits (pre-softmax) with respect to A
gives the gradients G. There are no hooks and no mutable state; BatchNorm runs
in eval mode, so images in a batch do not interact and one backward pass of
the summed target logits yields every image's gradient.

Each method is one small function from a ``LayerContext`` to *weighted
activations* (N, h, w, K); the shared base sums them over channels (or takes
their first principal component with ``eigen_smooth``), applies ReLU,
upsamples to the input size with half-pixel bilinear interpolation
(``jax.image.resize``) and scales each map to [0, 1].

    cams = compute_cams(model, variables, images, method="gradcam")
    cams.maps   # (N, 32, 32) in [0, 1]
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

EPS = 1e-7
CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class LayerContext(NamedTuple):
    """What a CAM method may use; all arrays are for the whole batch."""

    activations: jax.Array  # (N, h, w, K) output of the split stage
    grads: jax.Array  # (N, h, w, K) d logit[target] / d activations
    targets: jax.Array  # (N,) int class per image
    head: Callable  # (N, h, w, K) activations -> (N, C) logits
    images: jax.Array  # (N, H, W, 3) normalised model input
    batch_size: int  # chunk size for methods that run extra forward passes


class CAMs(NamedTuple):
    """Output of ``compute_cams``; T is present only when several targets per image were asked for."""

    raw: jax.Array  # (N, [T,] h, w) after ReLU, at the stage's resolution
    maps: jax.Array  # (N, [T,] H, W) upsampled to the input and scaled per map to [0, 1]
    targets: jax.Array  # (N, [T]) the classes explained
    logits: jax.Array  # (N, C) model output


# --------------------------------------------------------------------------- methods
# Each returns weighted activations (N, h, w, K); the base sums over K.


def grad_cam(ctx: LayerContext):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradients."""
    weights = ctx.grads.mean(axis=(1, 2), keepdims=True)
    return weights * ctx.activations


def grad_cam_plus_plus(ctx: LayerContext):
    """Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the closed-form alphas."""
    g, a = ctx.grads, ctx.activations
    g2, g3 = g**2, g**3
    sum_a = a.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
    alpha = jnp.where(g != 0, alpha, 0.0)
    weights = jnp.sum(jax.nn.relu(g) * alpha, axis=(1, 2), keepdims=True)
    return weights * a


def xgrad_cam(ctx: LayerContext):
    """XGrad-CAM (Fu et al. 2020): weights = sum(G * A) / sum(A) per channel."""
    a = ctx.activations
    weights = jnp.sum(ctx.grads * a, axis=(1, 2), keepdims=True) / (a.sum(axis=(1, 2), keepdims=True) + EPS)
    return weights * a


def hires_cam(ctx: LayerContext):
    """HiResCAM (Draelos & Carin 2020): element-wise G * A, faithful to the model's own computation."""
    return ctx.grads * ctx.activations


def layer_cam(ctx: LayerContext):
    """LayerCAM (Jiang et al. 2021): element-wise ReLU(G) * A."""
    return jax.nn.relu(ctx.grads) * ctx.activations


def eigen_cam(ctx: LayerContext):
    """EigenCAM (Muhammad & Yeasin 2020): the activations themselves; the base takes their first principal component."""
    return ctx.activations


def score_cam(ctx: LayerContext):
    """Score-CAM (Wang et al. 2020): channel weight = target probability of the image masked by that channel.

    Each channel map is upsampled to the input, scaled to [0, 1] and multiplied
    into the image; the K masked copies of every image run through the model in
    chunks of ``batch_size`` (``lax.map``), no gradients needed.
    """
    a = ctx.activations
    n, h, w, k = a.shape
    size = ctx.images.shape[1:3]
    masks = jax.image.resize(a, (n, *size, k), "linear")
    lo = masks.min(axis=(1, 2), keepdims=True)
    hi = masks.max(axis=(1, 2), keepdims=True)
    masks = jnp.where(hi > lo, (masks - lo) / (hi - lo + EPS), 0.0)  # (N, H, W, K)
    masks = jnp.moveaxis(masks, -1, 1)  # (N, K, H, W)
    masked = ctx.images[:, None] * masks[..., None]  # (N, K, H, W, 3)
    full_model = ctx.head  # For Score-CAM the base passes the whole model (images -> logits) as head.
    flat = masked.reshape(n * k, *masked.shape[2:])
    chunk = max(1, min(ctx.batch_size, n * k))
    pad = (-flat.shape[0]) % chunk
    flat = jnp.concatenate([flat, jnp.zeros((pad, *flat.shape[1:]), flat.dtype)])
    logits = jax.lax.map(full_model, flat.reshape(-1, chunk, *flat.shape[1:]))
    logits = logits.reshape(-1, logits.shape[-1])
    probs = jax.nn.softmax(logits[: n * k], axis=-1).reshape(n, k, -1)
    weights = jnp.take_along_axis(probs, ctx.targets[:, None, None], axis=-1)[..., 0]  # (N, K)
    return weights[:, None, None, :] * a


METHODS: dict[str, Callable[[LayerContext], jax.Array]] = {
    "gradcam": grad_cam,
    "gradcam++": grad_cam_plus_plus,
    "xgradcam": xgrad_cam,
    "hirescam": hires_cam,
    "layercam": layer_cam,
    "scorecam": score_cam,
    "eigencam": eigen_cam,
}
# Methods whose map is the first principal component whatever eigen_smooth says.
_ALWAYS_EIGEN = ("eigencam",)


# --------------------------------------------------------------------------- shared base


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


def upsample_and_scale(raw, size):
    """(N, h, w) -> (N, H, W): half-pixel bilinear upsampling, then min-max scaling of each map to [0, 1]."""
    up = jax.image.resize(raw, (raw.shape[0], *size), "linear")
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    return jnp.where(hi > lo, (up - lo) / (hi - lo + EPS), 0.0)


def split_model(model, variables, layer: str):
    """Returns (features, head): images -> layer activations, activations -> logits (eval mode)."""
    features = lambda x: model.apply(variables, x, train=False, end=layer)
    head = lambda a: model.apply(variables, a, train=False, start=layer).astype(jnp.float32)
    return features, head


def activations_and_grads(model, variables, images, targets, layer: str = "layer4"):
    """Stage activations A (N, h, w, K), dlogit[target]/dA (N, h, w, K) and logits (N, C)."""
    features, head = split_model(model, variables, layer)
    acts = features(images).astype(jnp.float32)

    def target_score(a):
        logits = head(a)
        return jnp.take_along_axis(logits, targets[:, None], axis=1).sum(), logits

    grads, logits = jax.grad(target_score, has_aux=True)(acts)
    return acts, grads, logits


def _cam_single_target(model, variables, images, targets, *, method, layer, eigen_smooth, batch_size):
    acts, grads, logits = activations_and_grads(model, variables, images, targets, layer)
    _, head = split_model(model, variables, layer)
    if method == "scorecam":
        head = lambda x: model.apply(variables, x, train=False).astype(jnp.float32)
    ctx = LayerContext(acts, grads, targets, head, images, batch_size)
    weighted = METHODS[method](ctx)
    if eigen_smooth or method in _ALWAYS_EIGEN:
        raw = first_principal_component(weighted)
    else:
        raw = weighted.sum(-1)
    return jax.nn.relu(raw), logits


@functools.lru_cache(maxsize=64)
def _compiled(model, method: str, layer: str, eigen_smooth: bool, target_mode: str, batch_size: int):
    """A jitted (variables, images, targets) -> (raw, maps, targets, logits) for one configuration.

    target_mode: "given" (targets (N,)), "multi" (targets (N, T)), "predicted" or "all"
    (targets ignored and chosen from the logits inside the compiled function).
    """

    def run(variables, images, targets):
        size = images.shape[1:3]
        if target_mode in ("predicted", "all"):
            logits = model.apply(variables, images, train=False)
            n, c = logits.shape
            targets = jnp.argmax(logits, -1) if target_mode == "predicted" else jnp.broadcast_to(jnp.arange(c), (n, c))
        fn = functools.partial(
            _cam_single_target, model, variables, images,
            method=method, layer=layer, eigen_smooth=eigen_smooth, batch_size=batch_size,
        )
        if targets.ndim == 2:  # (N, T): one map per (image, target), vmapped over T.
            raw, logits = jax.vmap(fn, in_axes=1, out_axes=(1, None))(targets)
            n, t, h, w = raw.shape
            maps = upsample_and_scale(raw.reshape(n * t, h, w), size).reshape(n, t, *size)
        else:
            raw, logits = fn(targets)
            maps = upsample_and_scale(raw, size)
        return raw, maps, targets, logits

    return jax.jit(run)


def compute_cams(
    model,
    variables,
    images,
    targets=None,
    *,
    method: str = "gradcam",
    layer: str = "layer4",
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    batch_size: int = 256,
) -> CAMs:
    """Class activation maps for a batch, in one compiled forward+backward.

    Args:
      model, variables: a ResNet from ``cifar_jax.models`` and its variables.
      images: (N, H, W, 3) float, normalised as the model was trained.
      targets: None (each image's predicted class), an int, an (N,) int array,
        an (N, T) int array (T maps per image), or "all" (every class: T = C).
      method: a key of ``METHODS``.
      layer: the stage to explain, one of layer1..layer4.
      aug_smooth: average with the map of the mirrored image (mirrored back).
      eigen_smooth: use the first principal component of the weighted activations.
      batch_size: chunk of masked images per forward pass (Score-CAM only).

    Returns:
      CAMs(raw, maps, targets, logits); see the class for shapes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if layer not in CAM_LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(CAM_LAYERS)}")
    images = jnp.asarray(images, jnp.float32)
    n = images.shape[0]
    if targets is None:
        mode, targets = "predicted", jnp.zeros((n,), jnp.int32)
    elif isinstance(targets, str):
        if targets != "all":
            raise ValueError(f"targets must be None, 'all', an int or an int array, not {targets!r}")
        mode, targets = "all", jnp.zeros((n,), jnp.int32)
    else:
        targets = jnp.asarray(targets, jnp.int32)
        if targets.ndim == 0:
            targets = jnp.full((n,), targets)
        if targets.shape[0] != n or targets.ndim > 2:
            raise ValueError(f"targets of shape {targets.shape} do not match {n} images")
        mode = "multi" if targets.ndim == 2 else "given"
    fn = _compiled(model, method, layer, bool(eigen_smooth), mode, int(batch_size))
    raw, maps, targets, logits = fn(variables, images, targets)
    if aug_smooth:  # Test-time flip: explain the mirror image for the same targets and mirror its map back.
        flipped = _compiled(model, method, layer, bool(eigen_smooth), "multi" if targets.ndim == 2 else "given", int(batch_size))
        raw_f, maps_f, _, _ = flipped(variables, images[:, :, ::-1], targets)
        raw = 0.5 * (raw + raw_f[..., ::-1])
        maps = 0.5 * (maps + maps_f[..., ::-1])
        lo = maps.min(axis=(-2, -1), keepdims=True)
        hi = maps.max(axis=(-2, -1), keepdims=True)
        maps = jnp.where(hi > lo, (maps - lo) / (hi - lo + EPS), 0.0)
    return CAMs(raw, maps, targets, logits)


# --------------------------------------------------------------------------- guided backpropagation


@jax.custom_vjp
def guided_relu(x):
    """ReLU whose backward pass lets only positive gradients through positive inputs (Springenberg et al. 2015)."""
    return jax.nn.relu(x)


def _guided_relu_fwd(x):
    return jax.nn.relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, 0.0).astype(g.dtype),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@functools.lru_cache(maxsize=16)
def _compiled_guided(model):
    guided = model.clone(act=guided_relu)

    def run(variables, images, targets):
        def score(x):
            logits = guided.apply(variables, x, train=False)
            return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

        return jax.grad(score)(images)

    return jax.jit(run)


def guided_backprop(model, variables, images, targets):
    """Guided backpropagation: (N, H, W, 3) input gradients of the target logits through guided ReLUs."""
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (images.shape[0],))
    return _compiled_guided(model)(variables, jnp.asarray(images, jnp.float32), targets)


def guided_grad_cam(model, variables, images, targets=None, *, layer: str = "layer4"):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map -> (N, H, W, 3)."""
    cams = compute_cams(model, variables, images, targets, method="gradcam", layer=layer)
    return guided_backprop(model, variables, images, cams.targets) * cams.maps[..., None]


def deprocess_gradients(grads):
    """(N, H, W, 3) gradients -> [0, 1] images for display (standardised, 0.1 std, centred at 0.5)."""
    g = grads - grads.mean(axis=(1, 2, 3), keepdims=True)
    g = g / (g.std(axis=(1, 2, 3), keepdims=True) + EPS) * 0.1 + 0.5
    return jnp.clip(g, 0.0, 1.0)
