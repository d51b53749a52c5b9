"""Runs a few train steps of a tiny ResNet on a mesh and saves loss and params (helper for tests).

    python tests/scripts/parallel_train.py OUT.npz --devices N [--process-id P --num-processes K --port PORT]

Every process feeds its own rows of each global batch, as the trainer does.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # The repo root: works with or without `pip install -e .`.

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

import jax  # noqa: E402

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id)

import numpy as np  # noqa: E402

from cifar_jax import train_lib  # noqa: E402
from cifar_jax.config import base_config  # noqa: E402

config = base_config()
config.model.name = "resnet10"
config.model.width = 4
config.optim.lr = 0.05
batch = 16
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (batch * args.steps, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 10, (batch * args.steps,)).astype(np.int32)
mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)

mesh = train_lib.make_mesh(jax.devices()[: args.devices])
model = train_lib.build_model(config, 10)
tx = train_lib.make_optimizer(config.optim, 10)
state = train_lib.create_sharded_state(model, tx, 0, mesh)
aug = dict(crop_padding=4, pad_mode="reflect", flip=True, cutout_size=8)
step = train_lib.make_train_step(mesh, aug=aug)
rows = batch // jax.process_count()
pid = jax.process_index()
losses = []
for i in range(args.steps):
    x, y = images[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]
    gx, gy = train_lib.global_batch(mesh, x[pid * rows : (pid + 1) * rows], y[pid * rows : (pid + 1) * rows], batch)
    state, metrics = step(state, gx, gy, mean, std)
    losses.append(float(metrics["loss_sum"]) / batch)
flat = {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
if pid == 0:
    np.savez(args.out, losses=np.array(losses), **flat)
print("devices", jax.device_count(), "losses", losses)
sys.exit(0)
