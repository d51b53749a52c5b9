"""Milliseconds of each ResNet18 convolution and its two gradients: XLA:CPU vs oneDNN (cifar_jax.onednn).

    python benchmarks/conv_kernels.py [--quick] [--repeats 30] [--out c.json]

For every distinct 3x3/1x1 convolution of the width-16/batch-256 and width-64/batch-64 train steps:
forward, input gradient and weight gradient, each jitted alone and timed on fixed inputs
(mean of --repeats calls after a warm-up), with XLA's kernels (lax.conv_general_dilated and its
autodiff) and with oneDNN's primitives called directly: forward, the forward computed as a
backward-data call of the flipped kernel (what cifar_jax.onednn does for stride 1), backward-data,
backward-weights. The stem (3 input channels) is also timed with its channels zero-padded to 8.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from _common import finish, isa, parser

# (batch, size, in channels, out channels, kernel, stride)
SHAPES = [
    (256, 32, 3, 16, 3, 1), (256, 32, 16, 16, 3, 1), (256, 32, 16, 32, 3, 2), (256, 32, 16, 32, 1, 2),
    (256, 16, 32, 32, 3, 1), (256, 8, 64, 64, 3, 1), (256, 4, 128, 128, 3, 1),
    (64, 32, 3, 64, 3, 1), (64, 32, 64, 64, 3, 1), (64, 16, 128, 128, 3, 1), (64, 8, 256, 256, 3, 1),
    (64, 4, 512, 512, 3, 1), (64, 8, 256, 512, 3, 2),
]
QUICK = [(8, 8, 3, 4, 3, 1), (8, 8, 4, 8, 3, 2)]


def mean_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t0) / repeats * 1000


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    from jax import lax

    from cifar_jax import onednn, runtime

    runtime.keep_freed_memory()
    if not onednn.available():
        raise SystemExit(f"oneDNN unavailable: {onednn.unavailable_reason()}")
    print(f"ISA: {isa()}")
    repeats = 3 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    rows = []
    for n, size, c, o, k, s in QUICK if args.quick else SHAPES:
        p_ = k // 2
        pads, strides = ((p_, p_), (p_, p_)), (s, s)
        x = jnp.asarray(rng.normal(size=(n, size, size, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
        out = size // s
        dy = jnp.asarray(rng.normal(size=(n, out, out, o)), jnp.float32)
        xla = lambda a, b: lax.conv_general_dilated(a, b, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        kernels = {
            "xla forward": (jax.jit(xla), x, w),
            "xla input-grad": (jax.jit(lambda d, b: jax.vjp(lambda a: xla(a, b), x)[1](d)[0]), dy, w),
            "xla weight-grad": (jax.jit(lambda a, d: jax.vjp(lambda b: xla(a, b), w)[1](d)[0]), x, dy),
            "onednn forward": (jax.jit(lambda a, b: onednn._call("forward", dy.shape, a, b, strides=strides, padding=pads)), x, w),
            "onednn input-grad": (jax.jit(lambda d, b: onednn._call("backward_data", x.shape, d, b, strides=strides, padding=pads)), dy, w),
            "onednn weight-grad": (jax.jit(lambda a, d: onednn._call("backward_weights", w.shape, a, d, strides=strides, padding=pads)), x, dy),
        }
        if s == 1:  # What onednn.conv2d runs: the forward as backward-data of the flipped, transposed kernel.
            kernels["onednn forward via backward-data"] = (jax.jit(lambda a, b: onednn.conv2d(a, b, strides, pads)), x, w)
        if c == 3:
            x8, w8 = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 5))), jnp.pad(w, ((0, 0), (0, 0), (0, 5), (0, 0)))
            kernels["onednn forward, channels padded to 8"] = (jax.jit(lambda a, b: onednn.conv2d(a, b, strides, pads)), x8, w8)
        gflop = 2 * n * out * out * o * c * k * k / 1e9
        shape = f"{n}x{size}x{size}x{c} -> {o}, {k}x{k}/{s}"
        for name, (fn, a, b) in kernels.items():
            ms = mean_ms(fn, a, b, repeats=repeats)
            rows.append(dict(shape=shape, gflop=gflop, kernel=name, ms=ms, gflop_per_s=gflop / ms * 1000))
        print(f"{shape}: " + ", ".join(f"{r['kernel']} {r['ms']:.2f}" for r in rows[-len(kernels):]), flush=True)
    finish("conv_kernels", args, rows, ["shape", "gflop", "kernel", "ms", "gflop_per_s"])


if __name__ == "__main__":
    sys.exit(main())
