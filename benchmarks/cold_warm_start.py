"""Time to the first train step in a fresh process: persistent compilation cache off (cold) vs on and warm.

    python benchmarks/cold_warm_start.py [--quick] [--repeats 3] [--out r.json]

Each run is a new Python process (this file with --child) that imports JAX,
calls cifar_jax.runtime.enable_compilation_cache() exactly as the CLI does
(CIFAR_JAX_NO_COMPILE_CACHE=1 turns it off, CIFAR_JAX_CACHE=DIR points it at a
temporary folder), builds the sharded state and runs one train step of the CPU
config (width 16, batch 256). The parent times launch -> first step done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, benchmark_config, finish, parser, warn_if_busy


def child(quick: bool) -> None:
    """One cold or warm start; prints a JSON line with the phase times."""
    t0 = time.perf_counter()
    import jax
    import numpy as np

    import cifar_jax.config  # noqa: F401  Imported before t_import, as the phases always counted it.
    from cifar_jax import train_lib
    from cifar_jax.runtime import enable_compilation_cache

    enable_compilation_cache()
    t_import = time.perf_counter()
    config = benchmark_config()
    if quick:
        config.model.width, config.batch_size = 4, 16
    mesh = train_lib.make_mesh()
    model = train_lib.build_model(config, 10)
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, 1000), 0, mesh)
    jax.block_until_ready(state)
    t_state = time.perf_counter()
    aug = dict(crop_padding=config.augment.crop_padding, pad_mode=config.augment.pad_mode,
               flip=config.augment.flip, cutout_size=config.augment.cutout)
    step = train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing)
    b = config.batch_size
    images, labels = train_lib.global_batch(mesh, np.zeros((b, 32, 32, 3), np.uint8), np.zeros(b, np.int32), b)
    state, metrics = step(state, images, labels, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
    jax.device_get(metrics)
    t_step = time.perf_counter()
    print(json.dumps({"import_s": t_import - t0, "state_s": t_state - t_import, "first_step_s": t_step - t_state}))


def run_child(env_extra: dict, quick: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR_JAX_NO_COMPILE_CACHE", "CIFAR_JAX_CACHE")}
    env.update(env_extra)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *(["--quick"] if quick else [])],
                         env=env, capture_output=True, text=True, check=True)
    total = time.perf_counter() - t0  # Includes interpreter start-up and exit.
    return {"total_s": total, **json.loads(out.stdout.strip().splitlines()[-1])}


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # Internal: one timed start.
    args = p.parse_args()
    if args.child:
        return child(args.quick)
    busy = warn_if_busy(args)
    repeats = 2 if args.quick else args.repeats
    rows = []

    def record(kind, runs):
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(dict(start=kind, runs=len(runs), **med))
        print(f"  {kind}: {med['total_s']:.1f}s", flush=True)

    print("cold (CIFAR_JAX_NO_COMPILE_CACHE=1) ...", flush=True)
    record("cold, cache off", [run_child({"CIFAR_JAX_NO_COMPILE_CACHE": "1"}, args.quick) for _ in range(repeats)])
    with tempfile.TemporaryDirectory(prefix="cifar_jax_bench_cache") as cache:
        print(f"cache in {cache} ...", flush=True)
        record("first run, cache on and empty", [run_child({"CIFAR_JAX_CACHE": cache}, args.quick)])
        record("warm, cache on and filled", [run_child({"CIFAR_JAX_CACHE": cache}, args.quick) for _ in range(repeats)])
        entries = sum(1 for _ in Path(cache, "jax").iterdir()) if Path(cache, "jax").is_dir() else 0
    ratio = rows[2]["total_s"] / rows[0]["total_s"]
    finish("cold_warm_start", args, rows, ["start", "runs", "total_s", "import_s", "state_s", "first_step_s"],
           warm_over_cold=ratio, cache_entries=entries, busy=busy)
    print(f"warm / cold = {ratio:.2f} ({entries} cache entries)")


if __name__ == "__main__":
    sys.exit(main())
