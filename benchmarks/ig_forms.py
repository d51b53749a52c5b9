"""Integrated Gradients, as ``cam.integrated_gradients`` computes it vs path points folded into the batch dimension.

    python benchmarks/ig_forms.py

An untrained width-16 ResNet18, 32 random images, 16 steps (17 path points): best of 3 wall times of the
library's form (``chunked_map`` = ``lax.map`` over chunks of ``jax.vmap``-ed path points) and of one
``lax.scan`` whose step runs ``chunk`` path points x 32 images as one batch; prints the largest difference.
"""
import time, functools
import jax, jax.numpy as jnp, numpy as np
from cifar_jax.models import get_model
from cifar_jax.cam import integrated_gradients
from cifar_jax.cam.attribution import _input_grads
from cifar_jax.cam.ops import class_score, as_float32

model = get_model("resnet18", width=16)
v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
x = jax.random.normal(jax.random.key(1), (32, 32, 32, 3))
t = jnp.arange(32) % 10
steps = 16
apply_fn = functools.partial(model.apply, train=False)

@functools.partial(jax.jit, static_argnames="chunk")
def ig_batched(v, x, t, chunk):
    """Path points folded into the batch: chunk points x N images per forward/backward."""
    n = x.shape[0]
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    w = jnp.ones(steps + 1).at[0].set(0.5).at[-1].set(0.5) / steps
    pad = (-(steps + 1)) % chunk
    a = jnp.concatenate([alphas, jnp.zeros(pad)]).reshape(-1, chunk)
    wp = jnp.concatenate([w, jnp.zeros(pad)]).reshape(-1, chunk)
    tt = jnp.tile(t, chunk)
    def body(acc, aw):
        ac, wc = aw
        pts = (ac[:, None, None, None, None] * x[None]).reshape(chunk * n, *x.shape[1:])
        g = jax.grad(lambda p: class_score(as_float32(apply_fn(v, p)), tt).sum())(pts).reshape(chunk, n, *x.shape[1:])
        return acc + jnp.tensordot(wc, g, axes=1), None
    acc, _ = jax.lax.scan(body, jnp.zeros_like(x), (a, wp))
    return x * acc

def bench(f, reps=3):
    f().block_until_ready()
    ts = []
    for _ in range(reps):
        s = time.perf_counter(); out = f(); out.block_until_ready(); ts.append(time.perf_counter() - s)
    return out, min(ts)

ref, t0 = bench(lambda: integrated_gradients(model, v, x, t, steps=steps, batch_size=256))
print(f"current (chunked_map vmap, batch_size 256 -> {256//32} points/pass): {t0:.3f}s")
for chunk in (1, 8, 17):
    out, t1 = bench(lambda: ig_batched(v, x, t, chunk))
    print(f"folded into batch, {chunk} points/pass: {t1:.3f}s, x{t0/t1:.2f}, max|diff| {float(jnp.abs(out-ref).max()):.2e} (max|ref| {float(jnp.abs(ref).max()):.2e})")
