"""Integrated Gradients: passes of path points in a Python loop (``cam.integrated_gradients``) vs the same passes
inside one compiled ``lax.map``.

    python benchmarks/ig_forms.py [--dtype bfloat16]

An untrained width-16 ResNet18 with XLA's convolutions, 32 random images, 16 steps (17 path points), 8 points
a pass: best of 3 wall times of each form (compilation excluded) and their largest difference. The pass
itself (``attribution._path_gradients``: the points folded into the batch, one backward pass) is the same.
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.cam import integrated_gradients
from cifar_jax.cam.attribution import _path_gradients
from cifar_jax.cam.ops import class_score
from cifar_jax.models import get_model

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
args = p.parse_args()
model = get_model("resnet18", width=16, dtype=jnp.dtype(args.dtype))
v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
x = jax.random.normal(jax.random.key(1), (32, 32, 32, 3))
t = jnp.arange(32) % 10
steps, per_pass = 16, 8
apply_fn = functools.partial(model.apply, train=False)


@jax.jit
def ig_lax_map(v, x, t):
    """The same passes inside one program: lax.map over the (passes, per_pass) path points."""
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1 / steps, np.float32)
    weights[[0, -1]] /= 2
    pad = (-(steps + 1)) % per_pass
    alphas, weights = np.pad(alphas, (0, pad)).reshape(-1, per_pass), np.pad(weights, (0, pad)).reshape(-1, per_pass)
    one_pass = lambda aw: _path_gradients(apply_fn, v, x, lambda out: class_score(out, t), jnp.zeros_like(x), *aw)
    return x * jax.lax.map(one_pass, (jnp.asarray(alphas), jnp.asarray(weights))).sum(0)


def best(f, reps=3):
    out = jax.block_until_ready(f())
    times = []
    for _ in range(reps):
        s = time.perf_counter(); jax.block_until_ready(f()); times.append(time.perf_counter() - s)
    return out, min(times)


loop, t_loop = best(lambda: integrated_gradients(model, v, x, t, steps=steps, batch_size=per_pass * 32))
mapped, t_map = best(lambda: ig_lax_map(v, x, t))
print(f"{args.dtype}, 32 images, {steps + 1} path points, {per_pass} a pass")
print(f"Python loop of passes (cam.integrated_gradients): {t_loop:.2f}s, {32 / t_loop:.1f} images/s")
print(f"lax.map over the same passes: {t_map:.2f}s, {32 / t_map:.1f} images/s ({t_map / t_loop:.1f}x the loop's time)")
print(f"largest difference {float(jnp.abs(loop - mapped).max()):.2e} (largest value {float(jnp.abs(loop).max()):.2e})")
