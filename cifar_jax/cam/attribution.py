"""Pixel-space attributions: vanilla gradients, input x gradient, Integrated Gradients, SmoothGrad, occlusion, FullGrad.

Each is a pure function of (model, variables, images, targets[, key]) returning
(N, H, W, C) or (N, H, W) arrays, compiled once per model and configuration.
``model`` is a Flax module (evaluation mode) or an apply function; ``targets``
is None (predicted class), an int, (N,) ints or a callable on the outputs -> (N,).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.cam.intercept import as_apply_fn
from cifar_jax.cam.ops import as_float32, cached, chunked_map, class_score, minmax_scale, over_flat_batch, target_mode, targets_for


def _attribute(kind, impl, model, variables, images, targets, apply_kwargs, *dynamic, **static):
    """Runs ``impl(apply_fn, variables, images, score, *dynamic, **static)`` compiled, with ``score`` from ``targets``."""
    mode, fixed, target_fn = target_mode(targets)
    if mode in ("all", "multi"):
        raise ValueError("attributions take one target per image: None, an int, (N,) ints or a callable")
    apply_fn = as_apply_fn(model, apply_kwargs)

    def build():
        def run(variables, images, t, *dynamic):
            if mode == "predicted":
                t = jnp.argmax(as_float32(apply_fn(variables, images)), -1)
            score = target_fn if mode == "callable" else (lambda out: class_score(out, t))
            return impl(apply_fn, variables, images, score, *dynamic, **static)

        return jax.jit(run)

    frozen = tuple(sorted((apply_kwargs or {}).items()))
    fn = cached(model, (kind, mode, target_fn, frozen, tuple(sorted(static.items()))), build)
    images = jnp.asarray(images, jnp.float32)
    return fn(variables, images, targets_for(mode, fixed, images.shape[0]), *dynamic)


def _input_grads(apply_fn, variables, x, score):
    """dscore/dx (N, H, W, C) of the summed per-image scores."""
    return jax.grad(lambda x: score(as_float32(apply_fn(variables, x))).sum())(x)


def gradients(model, variables, images, targets=None, *, apply_kwargs=None):
    """Vanilla gradients (Simonyan et al. 2014): (N, H, W, C) dscore/dimage."""
    impl = lambda f, v, x, s: _input_grads(f, v, x, s)
    return _attribute("gradients", impl, model, variables, images, targets, apply_kwargs)


def input_x_gradient(model, variables, images, targets=None, *, apply_kwargs=None):
    """Input x gradient (Shrikumar et al. 2016): (N, H, W, C) image * dscore/dimage."""
    impl = lambda f, v, x, s: x * _input_grads(f, v, x, s)
    return _attribute("input_x_gradient", impl, model, variables, images, targets, apply_kwargs)


def _path_gradients(apply_fn, variables, images, score, baseline, alphas, weights):
    """sum_p weights[p] dscore/dx at x = baseline + alphas[p] (images - baseline), the P points as one batch: -> (N, H, W, C)."""
    points = baseline + alphas[:, None, None, None, None] * (images - baseline)  # (P, N, H, W, C)
    total = lambda x: jax.vmap(score)(over_flat_batch(lambda flat: as_float32(apply_fn(variables, flat)), x)).sum()
    return jnp.tensordot(weights, jax.grad(total)(points), axes=1)


def integrated_gradients(model, variables, images, targets=None, *, baseline=None, steps: int = 64, batch_size: int = 256,
                         apply_kwargs=None):
    """Integrated Gradients (Sundararajan et al. 2017): (N, H, W, C), summing to score(x) - score(baseline).

    ``baseline``: (N, H, W, C) or broadcastable, default zeros; the path integral uses the
    trapezoid rule over ``steps`` intervals, ``batch_size // N`` path points per pass.
    """
    images = jnp.asarray(images, jnp.float32)
    baseline = jnp.broadcast_to(jnp.zeros(()) if baseline is None else jnp.asarray(baseline, jnp.float32), images.shape)
    if targets is None:  # Each image's predicted class, once for every pass.
        targets = jnp.argmax(as_float32(as_apply_fn(model, apply_kwargs)(variables, images)), -1)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1 / steps, np.float32)
    weights[[0, -1]] /= 2  # trapezoid rule on [0, 1]
    per_pass = min(steps + 1, max(1, batch_size // images.shape[0]))
    pad = (-(steps + 1)) % per_pass  # zero-weight points: every pass has one shape, one compiled program
    alphas, weights = np.pad(alphas, (0, pad)).reshape(-1, per_pass), np.pad(weights, (0, pad)).reshape(-1, per_pass)
    # Passes in a Python loop: XLA:CPU runs a network's gradient 4-6x slower inside lax.map's loop (benchmarks/ig_forms.py).
    total = sum(_attribute("integrated_gradients", _path_gradients, model, variables, images, targets, apply_kwargs,
                           baseline, jnp.asarray(a), jnp.asarray(w)) for a, w in zip(alphas, weights))
    return (images - baseline) * total


def smooth_grad(fn, images, key, *, samples: int = 16, noise: float = 0.15):
    """SmoothGrad (Smilkov et al. 2017) over any method: mean of ``fn`` over noisy copies of the images.

    ``fn``: images (N, H, W, C) -> array (or ``CAMs``, whose ``maps`` are used), e.g.
    ``lambda x: gradients(model, variables, x, targets)``; pass explicit targets, since the
    prediction of a noisy copy may differ. Noise std = ``noise`` * (max - min) of each image.
    Returns the mean over ``samples`` copies, shaped like ``fn``'s output.
    """
    images = jnp.asarray(images, jnp.float32)
    axes = tuple(range(1, images.ndim))
    sigma = noise * (images.max(axis=axes, keepdims=True) - images.min(axis=axes, keepdims=True))

    total = 0.0
    for k in jax.random.split(key, samples):  # a Python loop: fn's own compiled function is reused, none is rebuilt per call
        out = fn(images + sigma * jax.random.normal(k, images.shape))
        total = total + getattr(out, "maps", out)
    return total / samples



def smooth_gradients(model, variables, images, targets=None, *, key=None, samples: int = 16, noise: float = 0.15,
                     apply_kwargs=None):
    """SmoothGrad of vanilla gradients: (N, H, W, C). ``targets`` None: each clean image's predicted class, kept for
    every noisy copy; ``key`` (default ``jax.random.key(0)``) draws the noise."""
    images = jnp.asarray(images, jnp.float32)
    if targets is None:
        targets = jnp.argmax(as_float32(as_apply_fn(model, apply_kwargs)(variables, images)), -1)
    key = jax.random.key(0) if key is None else key
    return smooth_grad(lambda x: gradients(model, variables, x, targets, apply_kwargs=apply_kwargs), images, key,
                       samples=samples, noise=noise)

def _windows(size: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - window, 0) + 1, stride))
    return starts if starts[-1] + window >= size else starts + [size - window]  # the last window reaches the edge


def _occlusion(apply_fn, variables, images, score, *, window, stride, value, batch_size):
    n, h, w = images.shape[:3]
    rows = [(y, x) for y in _windows(h, window, stride) for x in _windows(w, window, stride)]
    masks = np.zeros((len(rows), h, w), bool)
    for i, (y, x) in enumerate(rows):
        masks[i, y : y + window, x : x + window] = True
    base = score(as_float32(apply_fn(variables, images)))

    def drops(chunk):  # (P', H, W) masks -> (P', N) score drops, the P' occluded copies as one batch
        occluded = jnp.where(chunk[:, None, :, :, None], value, images)  # (P', N, H, W, C)
        return base - jax.vmap(score)(over_flat_batch(lambda x: as_float32(apply_fn(variables, x)), occluded))

    drop = chunked_map(drops, jnp.asarray(masks), max(1, batch_size // n))
    count = np.maximum(masks.sum(0), 1)
    return jnp.einsum("pn,phw->nhw", drop, jnp.asarray(masks, jnp.float32)) / count


def occlusion(model, variables, images, targets=None, *, window: int = 8, stride: int = 4, value: float = 0.0,
              batch_size: int = 256, apply_kwargs=None):
    """Occlusion (Zeiler & Fergus 2014): (N, H, W) mean drop of the score when a window x window square
    around each pixel is set to ``value`` (as Captum, averaged over the windows covering the pixel)."""
    return _attribute("occlusion", _occlusion, model, variables, images, targets, apply_kwargs,
                      window=int(window), stride=int(stride), value=float(value), batch_size=int(batch_size))


# --------------------------------------------------------------------------- FullGrad


def _bias_layer(mdl, out) -> bool:
    """As pytorch-grad-cam: 2-D convolutions and batch norms (4-D outputs) that have a bias."""
    return getattr(out, "ndim", 0) == 4 and (
        (isinstance(mdl, nn.Conv) and mdl.use_bias) or (isinstance(mdl, nn.BatchNorm) and mdl.use_bias))


def _effective_bias(mdl):
    """(K,) bias of the layer's affine map in evaluation mode; for BatchNorm bias - mean * scale / sqrt(var + eps)."""
    params = mdl.variables["params"]
    if isinstance(mdl, nn.Conv):
        return params["bias"]
    stats = mdl.variables["batch_stats"]
    scale = params["scale"] if mdl.use_scale else 1.0
    return params["bias"] - stats["mean"] * scale / jnp.sqrt(stats["var"] + mdl.epsilon)


def full_grad_raw(apply_fn, variables, images, score):
    """FullGrad (Srinivas & Fleuret 2019), as pytorch-grad-cam: (N, H, W) map and the model outputs.

    Sum of |image * dscore/dimage| (each (image, channel) map min-max scaled) and, for
    every bias layer, |bias * dscore/doutput| (each channel scaled, summed over
    channels, upsampled). The output gradients are taken with respect to zero deltas
    added to each bias layer's output through interception; one backward pass gives all.
    """
    shapes = []

    def probe(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and _bias_layer(context.module, out):
            shapes.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
        return out

    def run_probe(v, x):
        with nn.intercept_methods(probe):
            return apply_fn(v, x)

    jax.eval_shape(run_probe, variables, images)

    def total(x, deltas):
        state = {"i": 0, "biases": []}  # local to this trace

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _bias_layer(context.module, out):
                state["biases"].append(_effective_bias(context.module).astype(jnp.float32))
                out = out + deltas[state["i"]].astype(out.dtype)
                state["i"] += 1
            return out

        with nn.intercept_methods(interceptor):
            outputs = as_float32(apply_fn(variables, x))
        scores = score(outputs)
        return scores.sum(), (outputs, state["biases"])

    deltas = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    (g_x, g_layers), (outputs, biases) = jax.grad(total, argnums=(0, 1), has_aux=True)(images, deltas)
    n, size = images.shape[0], images.shape[1:3]
    total_map = minmax_scale(jnp.abs(g_x * images), axes=(1, 2)).sum(-1)
    for bias, g in zip(biases, g_layers):
        per_layer = minmax_scale(jnp.abs(bias * g.astype(jnp.float32)), axes=(1, 2)).sum(-1)  # scale each channel, then sum
        total_map = total_map + jax.image.resize(per_layer, (n, *size), "linear")  # resize is linear: sum first
    return total_map, outputs


def full_grad(model, variables, images, targets=None, *, apply_kwargs=None):
    """FullGrad saliency (N, H, W) in [0, 1] (see ``full_grad_raw``)."""
    impl = lambda f, v, x, s: minmax_scale(full_grad_raw(f, v, x, s)[0])
    return _attribute("fullgrad", impl, model, variables, images, targets, apply_kwargs)
