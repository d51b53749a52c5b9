"""Where a train step's time goes: a per-op profile (jax.profiler) of the real train step, grouped by kind.

    python benchmarks/step_profile.py [--configs cpu,full] [--convs xla,onednn] [--steps 3] [--top 10] [--out p.json]

Runs train_lib.make_train_step (as train_throughput.py does) under ``jax.profiler.trace``, reads the
thunk events of the trace, and maps each to its HLO instruction (op_name metadata, custom-call target,
output shape) to sort it into: convolution forward / input gradient / weight gradient, XLA's layout
copies around its convolutions, BatchNorm
forward / backward, ReLU-add-pool forward / backward, head + loss, augmentation, optimizer, other.
The profiler itself costs time (the sum of ops is printed beside the step's wall time); read the
shares, not the absolute milliseconds. Concurrent ops on two threads can make the sum exceed the wall.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import numpy as np

from _common import ROOT, finish, isa, parser

CONFIGS = {"cpu": ("resnet18_cpu.py", 16, 256), "full": ("resnet18.py", 64, 64)}
QUICK = {"cpu": ("resnet18_cpu.py", 4, 16), "full": ("resnet18.py", 8, 8)}
KINDS = ("conv forward", "conv input-gradient", "conv weight-gradient", "layout copies", "BatchNorm forward", "BatchNorm backward",
         "ReLU/add/pool forward", "ReLU/add/pool backward", "head + loss", "augmentation", "optimizer", "other")


def hlo_instructions(hlo_text: str) -> dict:
    """name -> (op_name, custom-call target, output dims) for every instruction of a compiled HLO module.

    A fusion without an op_name of its own (XLA's layout-copy and convolution fusions) takes the first
    op_name inside the computation it calls, and "conv_general_dilated" when that computation convolves.
    """
    out, computation, inside = {}, None, collections.defaultdict(list)
    for line in hlo_text.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{$", line) or re.match(r"^ENTRY %?([\w.\-]+)", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        dims = tuple(int(d) for d in m.group(3).split(",") if d)
        op_name = op.group(1) if op else ""
        inside[computation].append((op_name, " convolution(" in line))
        out[m.group(1)] = [op_name, target.group(1) if target else "", dims, calls.group(1) if calls else None]
    for name, entry in out.items():
        body = inside.get(entry[3], [])
        if any(conv for _, conv in body):
            first = next((o for o, conv in body if conv and o), next((o for o, _ in body if o), entry[0]))
            entry[0] = first if "conv_general_dilated" in first else first + "/conv_general_dilated"
        elif not entry[0]:
            entry[0] = next((o for o, _ in body if o), "")
    return {name: tuple(entry[:3]) for name, entry in out.items()}


def kind_of(name: str, op_name: str, target: str, dims: tuple) -> str:
    """The KINDS entry of one HLO instruction (``name`` is its HLO name, e.g. "transpose_copy_fusion.3")."""
    backward = "transpose(" in op_name
    if target.startswith("cifar_jax_onednn_") or "conv_general_dilated" in op_name:
        # A weight gradient has a kernel's shape (two window dims of 1 or 3, in any layout); activations do not.
        if len(dims) == 4 and (sorted(dims)[:2] == [3, 3] or sorted(dims)[:2] == [1, 1]):
            return "conv weight-gradient"
        return "conv input-gradient" if backward else "conv forward"
    if name.startswith(("transpose_copy", "copy_transpose", "transpose_fusion", "copy_fusion")):
        return "layout copies"  # XLA's relayouts around its convolution kernels.
    if "ResNet" in op_name:
        if "/head/" in op_name:
            return "head + loss"
        if re.search(r"/(\w*bn\w*)/", op_name):
            return "BatchNorm backward" if backward else "BatchNorm forward"
        return "ReLU/add/pool backward" if backward else "ReLU/add/pool forward"
    if any(k in op_name for k in ("augment", "crop", "flip", "cutout", "random")):
        return "augmentation"
    if any(k in op_name for k in ("optax", "apply_updates", "sgd", "trace", "momentum")):
        return "optimizer"
    if any(k in op_name for k in ("log_softmax", "cross_entropy", "loss")):
        return "head + loss"
    return "other"


def profile(config, batch: int, steps: int):
    """({kind: ms per step}, wall ms per step, [(ms, kind, op_name)] per instruction) for one config."""
    import jax

    from cifar_jax import train_lib

    model = train_lib.build_model(config, 10)
    mesh = train_lib.make_mesh(jax.devices()[:1])
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, 10_000), 0, mesh)
    aug = dict(crop_padding=config.augment.crop_padding, pad_mode=config.augment.pad_mode,
               flip=config.augment.flip, cutout_size=config.augment.cutout)
    step = train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (batch,), dtype=np.int32)
    images, labels = train_lib.global_batch(mesh, images, labels, batch)
    mean, std = np.array([0.49, 0.48, 0.45], np.float32), np.array([0.25, 0.24, 0.26], np.float32)
    hlo = hlo_instructions(step.lower(state, images, labels, mean, std).compile().as_text())
    for _ in range(3):  # Compile and warm up.
        state, _ = step(state, images, labels, mean, std)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, _ = step(state, images, labels, mean, std)
            jax.block_until_ready(state)
            wall = (time.perf_counter() - t0) / steps * 1000
        trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_kind, per_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in hlo:
            op_name, target, dims = hlo[e["name"]]
            kind = kind_of(e["name"], op_name, target, dims)
            ms = e.get("dur", 0) / 1000 / steps
            per_kind[kind] += ms
            per_op[(kind, op_name.replace("jit(train_step)/", "") or e["name"])] += ms
    top = [(ms, kind, op) for (kind, op), ms in per_op.most_common()]
    return per_kind, wall, top


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="cpu,full")
    p.add_argument("--convs", default="xla,onednn")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=0, help="also print the N most expensive instructions")
    p.add_argument("--dtype", default="float32", help="model.dtype (float32, or bfloat16 where oneDNN has native bfloat16)")
    args = p.parse_args()
    from cifar_jax import onednn, runtime
    from cifar_jax.config import load_config

    runtime.keep_freed_memory()
    print(f"ISA: {isa()}")
    rows = []
    for name in args.configs.split(","):
        file, width, batch = (QUICK if args.quick else CONFIGS)[name]
        for conv in args.convs.split(","):
            if conv == "onednn" and not onednn.available():
                print(f"skipping onednn: {onednn.unavailable_reason()}")
                continue
            config = load_config(ROOT / "experiments" / file)
            config.model.width, config.model.conv, config.cpu_devices = width, conv, 0
            config.model.dtype = args.dtype  # Not the config file's (the CPU config computes in bfloat16).
            per_kind, wall, top = profile(config, batch, 1 if args.quick else args.steps)
            total = sum(per_kind.values())
            row = dict(config=name, width=width, batch=batch, conv=conv, dtype=args.dtype, wall_ms=wall, sum_of_ops_ms=total)
            row.update({k: per_kind.get(k, 0.0) for k in KINDS})
            rows.append(row)
            print(f"\n[{name}, {conv} convs] wall {wall:.0f} ms/step (profiled), ops sum {total:.0f} ms")
            for k in KINDS:
                print(f"  {k:24s} {per_kind.get(k, 0.0):8.1f} ms  {100 * per_kind.get(k, 0.0) / max(total, 1e-9):5.1f}%")
            for ms, kind, op in top[: args.top]:
                print(f"    {ms:7.2f} ms  {kind:22s} {op[:100]}")
    print()
    finish("step_profile", args, rows, ["config", "width", "batch", "conv", "dtype", "wall_ms", "sum_of_ops_ms", *KINDS])


if __name__ == "__main__":
    sys.exit(main())
