"""Runs a few train steps of a tiny ResNet on a mesh and saves loss and params (helper for tests).

    python tests/scripts/parallel_train.py OUT.npz --devices N [--process-id P --num-processes K --port PORT]

Every process feeds its own rows of each global batch, as the trainer does. ``train_steps`` is the same run in the
calling process (on its devices), for the one-device reference.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # The repo root: works with or without `pip install -e .`.


def train_steps(devices: int, steps: int = 3):
    """(losses (steps,), {param path: array}) of ``steps`` SGD steps on ``devices`` devices of this JAX job."""
    import jax
    import numpy as np

    from cifar_jax import train_lib
    from cifar_jax.config import base_config

    config = base_config()
    config.model.name = "resnet10"
    config.model.width = 4
    # Gentle steps: the sharded and one-device reductions round differently, and a large step (PyTorch's small initial
    # weights take ~6x larger effective ones than He's) grows that rounding past the comparison's tolerance.
    config.optim.lr = 0.01
    batch = 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * steps, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (batch * steps,)).astype(np.int32)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)

    mesh = train_lib.make_mesh(jax.devices()[:devices])
    model = train_lib.build_model(config, 10)
    tx = train_lib.make_optimizer(config.optim, 10)
    state = train_lib.create_sharded_state(model, tx, 0, mesh)
    aug = dict(crop_padding=4, pad_mode="reflect", flip=True, cutout_size=8)
    step = train_lib.make_train_step(mesh, aug=aug)
    rows = batch // jax.process_count()
    pid = jax.process_index()
    losses = []
    for i in range(steps):
        x, y = images[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]
        gx, gy = train_lib.global_batch(mesh, x[pid * rows : (pid + 1) * rows], y[pid * rows : (pid + 1) * rows], batch)
        state, metrics = step(state, gx, gy, mean, std)
        losses.append(float(metrics["loss_sum"]) / batch)
    params = jax.device_get(state.params)
    return np.array(losses), {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1, help="devices of the mesh (local CPU devices per process x processes)")
    parser.add_argument("--local-devices", type=int, default=1, help="CPU devices this process exposes")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"

    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id)
    losses, flat = train_steps(args.devices, args.steps)
    if jax.process_index() == 0:
        np.savez(args.out, losses=losses, **flat)
    print("devices", jax.device_count(), "losses", losses.tolist())
    sys.exit(0)
