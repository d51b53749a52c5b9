"""Images/s of the compiled JAX train step vs a PyTorch eager step of the same ResNet18, same batch, same process.

    python benchmarks/train_throughput.py [--quick] [--configs cpu,full] [--convs xla,onednn] [--out r.json]

JAX: train_lib.make_train_step on a 1-device mesh (crop/flip/cutout augmentation,
forward, backward, SGD-Nesterov update, all in one XLA call), once per convolution
kernel (model.conv: xla, onednn). PyTorch: eager forward/backward/SGD-Nesterov step
on an already-normalised float batch (no augmentation, so the comparison is, if
anything, tilted towards PyTorch), contiguous and channels_last; the faster layout
is the reference. Both run in this one process with the allocator the CLIs use
(runtime.keep_freed_memory, which speeds PyTorch too); --default-malloc leaves glibc's defaults.
"""

from __future__ import annotations

import itertools

import os
import statistics
import sys
import time

import numpy as np

from _common import ROOT, finish, isa, parser, timed, warn_if_busy

# name: (experiment file, width, batch, timed steps per repeat)
CONFIGS = {"cpu": ("resnet18_cpu.py", 16, 256, 10), "full": ("resnet18.py", 64, 64, 4)}
QUICK = {"cpu": ("resnet18_cpu.py", 4, 16, 2), "full": ("resnet18.py", 8, 8, 2)}


def jax_runner(config, batch, steps, k=1, devices=1):
    """(run, compile s, parameter count): ``run()`` times ``steps`` real train steps and returns images/s.

    k > 1 runs k steps per call (lax.scan). compile s is the first call's time minus one steady call's
    (tracing, lowering and XLA compilation). devices > 1 shards the batch over that many CPU devices
    (main() splits the CPU into them, as ``--config.cpu_devices`` does in the training CLI).
    """
    import jax

    from cifar_jax import train_lib

    model = train_lib.build_model(config, 10)
    mesh = train_lib.make_mesh(jax.devices()[:devices])
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, 10_000), 0, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    aug = dict(crop_padding=config.augment.crop_padding, pad_mode=config.augment.pad_mode,
               flip=config.augment.flip, cutout_size=config.augment.cutout)
    step = train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing, steps_per_dispatch=k)
    rng = np.random.default_rng(0)
    lead = (k,) if k > 1 else ()
    images = rng.integers(0, 256, (*lead, batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (*lead, batch), dtype=np.int32)
    images, labels = train_lib.global_batch(mesh, images, labels, batch, leading=lead)  # Fixed, already on device.
    mean, std = np.array([0.49, 0.48, 0.45], np.float32), np.array([0.25, 0.24, 0.26], np.float32)
    box = [state]

    def run_calls(calls):
        s = box[0]
        for _ in range(calls):
            s, _ = step(s, images, labels, mean, std)  # The state is donated: always continue from the new one.
        jax.block_until_ready(s)
        box[0] = s

    t0 = time.perf_counter()
    run_calls(1)  # Compiles (the step is traced here, so flags read at trace time must be set around this call).
    compile_s = time.perf_counter() - t0
    run_calls(2)  # Warm-up.
    calls = max(1, steps // k)
    one = timed(lambda: run_calls(calls), 1)[0]
    return (lambda: calls * k * batch / timed(lambda: run_calls(calls), 1)[0]), compile_s - one / calls, n_params


def torch_runner(width, batch, steps, label_smoothing, channels_last, expect_params, bfloat16=False):
    """``run()`` times ``steps`` PyTorch eager train steps of the same ResNet18 and returns images/s.

    ``bfloat16``: under ``torch.autocast("cpu", torch.bfloat16)``, PyTorch's mixed precision (float32 weights).
    """
    import torch
    from torch import nn

    from _torch_resnet import ResNet18, num_params

    torch.set_num_threads(os.cpu_count())  # Every core, as XLA uses.
    torch.manual_seed(0)
    model = ResNet18(width).train()
    if num_params(model) != expect_params:
        raise SystemExit(f"PyTorch model has {num_params(model)} parameters, the JAX one {expect_params}")
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def run_steps(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    run_steps(2)  # Warm-up (allocator, oneDNN primitive caches).
    return lambda: steps * batch / timed(lambda: run_steps(steps), 1)[0]


def interleaved(runners: dict, repeats: int) -> dict:
    """{name: median images/s} timing every runner once per round, ``repeats`` rounds: drifts of a noisy
    machine hit all of them alike instead of whichever ran last."""
    seen = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            seen[name].append(run())
    return {name: statistics.median(v) for name, v in seen.items()}


def onednn_ready(devices: int, dtype: str) -> bool:
    """Whether model.conv=onednn can run in this benchmark (prints why not)."""
    from cifar_jax import onednn

    from cifar_jax.errors import ConfigError

    try:
        onednn.conv_for("onednn", dtype)
    except ConfigError as e:
        print(f"skipping {dtype} oneDNN: {e}")
        return False
    return True


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", default="cpu,full", help="comma-separated: cpu (width 16, batch 256), full (width 64, batch 64)")
    p.add_argument("--steps-per-dispatch", type=int, default=1, help="JAX steps per compiled call (lax.scan)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (each variant timed once a round); medians")
    p.add_argument("--devices", type=int, default=1, help="CPU devices to shard the JAX batch over (as config.cpu_devices)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--no-augment", action="store_true", help="JAX step without crop/flip/cutout, like the PyTorch reference")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated JAX model.dtype values (float32, bfloat16); bfloat16 adds PyTorch under bf16 autocast")
    p.add_argument("--norm-dtype", default="same",
                   help="comma-separated model.norm_dtype values (same, float32): BatchNorm's precision around bfloat16 convs")
    p.add_argument("--norm-backward", default="autodiff",
                   help="comma-separated model.norm_backward values (autodiff, closed_form): BatchNorm's training gradient")
    p.add_argument("--batch", type=int, help="override the batch of every config (e.g. 512 for the full recipe's)")
    p.add_argument("--steps", type=int, help="override the timed steps per repeat")
    p.add_argument("--width", type=int, help="override the width of every config (e.g. 24 to price a wider CPU run)")
    p.add_argument("--convs", default="xla,onednn",
                   help="model.conv values to time: xla, onednn (skipped where unavailable), onednn-direct (oneDNN's forward primitive also for stride 1)")
    p.add_argument("--default-malloc", action="store_true", help="skip runtime.keep_freed_memory (glibc defaults, both sides)")
    args = p.parse_args()
    from cifar_jax import runtime

    malloc = "default" if args.default_malloc or not runtime.keep_freed_memory() else "kept"
    print(f"allocator: {malloc}; ISA: {isa()}")
    busy = warn_if_busy(args)
    if args.devices > 1:  # Before the first JAX backend call, like cifar_jax.train.main.
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
    repeats = 2 if args.quick else args.repeats
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
        print("PyTorch is not importable: skipping the PyTorch column (pip install torch==2.13.0 for a CPU wheel).")
    from cifar_jax.config import load_config

    rows, ratios = [], {}
    for name in args.configs.split(","):
        file, width, batch, steps = (QUICK if args.quick else CONFIGS)[name]
        batch, steps, width = args.batch or batch, args.steps or steps, args.width or width
        config = load_config(ROOT / "experiments" / file)
        config.model.width = width
        if args.no_augment:
            config.augment.crop_padding, config.augment.flip, config.augment.cutout = 0, False, 0
        k = args.steps_per_dispatch
        steps = max(steps, k)
        runners, meta = {}, {}
        for dtype in args.dtype.split(","):
            config.model.dtype = dtype
            for conv, norm, grad in itertools.product(args.convs.split(","), args.norm_dtype.split(","),
                                                      args.norm_backward.split(",")):
                if conv.startswith("onednn") and not onednn_ready(args.devices, dtype):
                    continue
                from cifar_jax import onednn

                config.model.conv = "onednn" if conv.startswith("onednn") else conv
                config.model.norm_dtype = norm
                config.model.norm_backward = grad
                onednn.FORWARD_AS_BACKWARD_DATA = conv != "onednn-direct"  # Read when the step is traced (compiled).
                print(f"[{name}] JAX ({conv} convs, {dtype}, BatchNorm {norm}, {grad}) width {width}, batch {batch}: compiling ...",
                      flush=True)
                run, compile_s, n_params = jax_runner(config, batch, steps, k, args.devices)
                onednn.FORWARD_AS_BACKWARD_DATA = True
                label = ([conv, f"k={k}", dtype] + [f"BatchNorm {norm}"] * (norm != "same")
                         + [f"BatchNorm {grad}"] * (grad != "autodiff")
                         + [f"{args.devices} devices"] * (args.devices > 1) + ["no aug"] * args.no_augment)
                runners[f"jax ({', '.join(label)})"], meta[f"jax ({', '.join(label)})"] = run, dict(compile_s=compile_s)
        if not runners:
            continue
        if torch is not None and not args.skip_torch:
            for channels_last in (False, True):
                runners[f"torch eager{' channels_last' if channels_last else ''}"] = torch_runner(
                    width, batch, steps, config.optim.label_smoothing, channels_last, n_params)
            if "bfloat16" in args.dtype.split(","):
                runners["torch eager channels_last bf16 autocast"] = torch_runner(
                    width, batch, steps, config.optim.label_smoothing, True, n_params, bfloat16=True)
        print(f"[{name}] timing {len(runners)} variants, {steps} steps each, interleaved, {repeats} rounds ...", flush=True)
        medians = interleaved(runners, repeats)
        def best_torch(bf16: bool):  # Each JAX precision against PyTorch's faster layout at the same precision.
            return max((v for i, v in medians.items() if i.startswith("torch") and ("bf16" in i) == bf16), default=None)

        for impl, ips in medians.items():
            row = dict(config=name, width=width, batch=batch, params=n_params, impl=impl, images_per_s=ips,
                       step_ms=1000 * batch / ips, **meta.get(impl, {}))
            torch_ips = best_torch("bfloat16" in impl)
            if torch_ips and impl.startswith("jax"):
                row["jax_over_torch"] = ips / torch_ips
            rows.append(row)
        ratios[name] = max((r["jax_over_torch"] for r in rows if r["config"] == name and "jax_over_torch" in r), default=None)
        if ratios[name] is None:
            del ratios[name]
    finish("train_throughput", args, rows, ["config", "width", "batch", "params", "impl", "images_per_s", "step_ms", "compile_s", "jax_over_torch"],
           jax_over_torch=ratios, busy=busy, allocator=malloc)
    for name, r in ratios.items():
        print(f"{name}: JAX (faster kernel) / PyTorch (faster layout) = {r:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
