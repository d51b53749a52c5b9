"""Milliseconds of training-mode BatchNorm (+ ReLU) on each activation shape of the width-16 train step.

    python benchmarks/batchnorm_kernels.py [--quick] [--batch 256] [--repeats 50] [--out b.json]

Per shape, each jitted alone on fixed inputs (mean of --repeats calls after a warm-up):
- statistics: the per-channel mean and mean of squares as XLA's reduction (what nn.BatchNorm runs) and
  as a (1, N*H*W) @ (N*H*W, 2C) product with a ones vector (a variant tried: can a dot use the cores better?);
- forward + backward of relu(BatchNorm(x)) with nn.BatchNorm's autodiff gradient and with the closed-form
  one of cifar_jax.models.batchnorm (model.norm_backward=closed_form).
"""

from __future__ import annotations

import time

from _common import finish, isa, parser

# (height = width, channels) of every BatchNorm input in ResNet18 at width 16, and how many there are.
SHAPES = [(32, 16, 5), (16, 32, 5), (8, 64, 5), (4, 128, 5)]
QUICK = [(8, 4, 1)]


def mean_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats * 1000


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from cifar_jax import runtime
    from cifar_jax.models.batchnorm import BatchNorm

    runtime.keep_freed_memory()
    print(f"ISA: {isa()}")
    repeats, batch = (3, 8) if args.quick else (args.repeats, args.batch)
    rows = []
    for size, c, count in QUICK if args.quick else SHAPES:
        x = jax.random.normal(jax.random.key(0), (batch, size, size, c))
        dy = jax.random.normal(jax.random.key(1), x.shape)
        m = batch * size * size

        def stats_reduce(x):
            return x.mean((0, 1, 2)), (x * x).mean((0, 1, 2))

        def stats_dot(x):  # Both sums in one product with a ones row.
            x2 = x.reshape(m, c)
            sums = jnp.full((1, m), 1.0 / m, x.dtype) @ jnp.concatenate([x2, x2 * x2], axis=1)
            return sums[0, :c], sums[0, c:]

        def train_bn(module):
            variables = module.init(jax.random.key(0), x[:1], use_running_average=True)

            def fwd_bwd(x, dy):
                def f(params, x):
                    y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                        use_running_average=False, mutable=["batch_stats"])
                    return nn.relu(y)

                y, vjp = jax.vjp(f, variables["params"], x)
                return y, vjp(dy)

            return fwd_bwd

        kernels = {
            "statistics, XLA reduction": (stats_reduce, (x,)),
            "statistics, ones-row matmul": (stats_dot, (x,)),
            "relu(BatchNorm) forward+backward, autodiff": (train_bn(nn.BatchNorm(momentum=0.9)), (x, dy)),
            "relu(BatchNorm) forward+backward, closed_form": (train_bn(BatchNorm(momentum=0.9)), (x, dy)),
        }
        for name, (fn, inputs) in kernels.items():
            ms = mean_ms(jax.jit(fn), *inputs, repeats=repeats)
            rows.append(dict(shape=f"{batch}x{size}x{size}x{c}", in_step=count, kernel=name, ms=ms,
                             ms_per_step=ms * count))
            print(f"{rows[-1]['shape']:>16}  {name:48s} {ms:8.3f} ms", flush=True)
    totals = {}
    for r in rows:
        totals[r["kernel"]] = totals.get(r["kernel"], 0.0) + r["ms_per_step"]
    for name, total in totals.items():
        rows.append(dict(shape="all (x count in the step)", in_step=sum(c for *_, c in (QUICK if args.quick else SHAPES)),
                         kernel=name, ms=float("nan"), ms_per_step=total))
    finish("batchnorm_kernels", args, rows, ["shape", "in_step", "kernel", "ms", "ms_per_step"], isa=isa())


if __name__ == "__main__":
    main()
