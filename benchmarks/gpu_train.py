"""The original recipe's train step on one accelerator: this project against PyTorch on the same card.

Same model (CIFAR ResNet18, width 64), batch 512, the recipe's augmentation (reflect-pad crop 4,
flip, cutout 16), Nesterov SGD:

  (a) cifar_jax's device loop (``train_lib.make_device_train_chunk``: data on the device, K steps a dispatch),
  (b) PyTorch eager, channels_last + bf16 autocast, augmentation on the GPU,
  (c) ``torch.compile`` of (b),

reporting images/s, seconds per 50,000-image epoch and compile time of each; the host overhead of
(a) (a chunked epoch with metrics read each chunk vs chunks x the pure chunk time); and batched
Grad-CAM against a per-image loop (``cam.make_cam_fn``). Prints a table and ratios, writes JSON:

    python benchmarks/gpu_train.py --out gpu_train.json            # on the GPU
    python benchmarks/gpu_train.py --quick --skip-compile           # seconds on a CPU: checks it runs
"""

from __future__ import annotations

import time

import _common
import numpy as np


def jax_train(width, batch, steps, chunk, n_images, dtype):
    """(a): compile seconds, steady images/s, and host overhead of a chunked epoch."""
    import jax

    from cifar_jax import train_lib
    from cifar_jax.config import base_config

    config = base_config()
    config.model.width, config.model.dtype = width, dtype
    mesh = train_lib.make_mesh(jax.devices()[:1])
    state = train_lib.create_sharded_state(train_lib.build_model(config, 10), train_lib.make_optimizer(config.optim, 10_000), 0, mesh)
    aug = dict(crop_padding=4, pad_mode="reflect", flip=True, cutout_size=16)
    rng = np.random.default_rng(0)
    images = train_lib.replicate(mesh, rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8))
    labels = train_lib.replicate(mesh, rng.integers(0, 10, n_images).astype(np.int32))
    order = train_lib.replicate(mesh, rng.permutation(n_images).astype(np.int32))
    mean, std = np.full(3, 0.47, np.float32), np.full(3, 0.25, np.float32)
    fn = train_lib.make_device_train_chunk(mesh, aug=aug, batch_size=batch)
    k = np.int32(chunk)
    chunks_per_epoch = n_images // batch // chunk
    t0 = time.perf_counter()
    state, m = fn(state, images, labels, order, np.int32(0), k, mean, std)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    pure = []
    for i in range(max(1, steps // chunk)):  # Pure chunk time: dispatch and block, nothing read.
        t0 = time.perf_counter()
        state, m = fn(state, images, labels, order, np.int32((i % chunks_per_epoch) * chunk), k, mean, std)
        jax.block_until_ready(m)
        pure.append(time.perf_counter() - t0)
    chunk_s = float(np.median(pure))
    t0 = time.perf_counter()
    for i in range(chunks_per_epoch):  # An epoch as train.py runs it: metrics read on the host every chunk.
        state, m = fn(state, images, labels, order, np.int32(i * chunk), k, mean, std)
        float(jax.device_get(m)["loss_sum"])
    epoch_s = time.perf_counter() - t0
    return {"variant": f"cifar_jax device loop ({dtype}, {chunk} steps/dispatch)", "compile_s": compile_s,
            "images_per_s": chunk * batch / chunk_s, "epoch_s": 50_000 / (chunk * batch / chunk_s),
            "host_overhead_pct": 100 * (epoch_s / (chunks_per_epoch * chunk_s) - 1)}


def torch_train(width, batch, steps, compiled):
    """(b) or (c): compile seconds (first steps), steady images/s."""
    import torch

    from _torch_resnet import ResNet18

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ResNet18(width).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (batch * 8, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 10, (batch * 8,), device=device, generator=gen)
    mean = torch.tensor([0.49, 0.48, 0.45], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26], device=device).view(1, 3, 1, 1)
    rows, cols = torch.arange(32, device=device), torch.arange(32, device=device)

    def augment(x):  # The recipe's augmentation on the GPU: reflect-pad crop 4, flip, cutout 16.
        n = x.shape[0]
        x = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4), mode="reflect")
        dy, dx = torch.randint(0, 9, (2, n, 1, 1), device=device)
        iy, ix = (rows.view(1, 32, 1) + dy), (cols.view(1, 1, 32) + dx)
        x = x[torch.arange(n, device=device).view(n, 1, 1), :, iy, ix].permute(0, 3, 1, 2)
        x = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        x = (x - mean) / std
        cy, cx = torch.randint(0, 32, (2, n, 1, 1), device=device)
        inside = ((rows.view(1, 32, 1) - cy).abs() < 8) & ((cols.view(1, 1, 32) - cx).abs() < 8)
        return (x * (~inside).unsqueeze(1)).contiguous(memory_format=torch.channels_last)

    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(augment(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        step = torch.compile(step)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(3):  # Warm-up (and compilation for (c)).
        step(data[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch])
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        j = i % 8
        step(data[j * batch : (j + 1) * batch], labels[j * batch : (j + 1) * batch])
    sync()
    ips = steps * batch / (time.perf_counter() - t0)
    name = "PyTorch torch.compile (channels_last, bf16 autocast)" if compiled else "PyTorch eager (channels_last, bf16 autocast)"
    return {"variant": name, "compile_s": compile_s, "images_per_s": ips, "epoch_s": 50_000 / ips, "host_overhead_pct": None}


def gradcam(width, n, loop_images):
    """Batched Grad-CAM of n images in one call vs a per-image loop: images/s of each."""
    import jax
    import jax.numpy as jnp

    from cifar_jax import cam
    from cifar_jax.models import get_model

    model = get_model("resnet18", width=width)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    fn = cam.make_cam_fn(model, variables, layer="layer4", method="gradcam")
    x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
    jax.block_until_ready(fn(x).maps)
    jax.block_until_ready(fn(x[:1]).maps)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x).maps)
    batched = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(loop_images):
        jax.block_until_ready(fn(x[i : i + 1]).maps)
    looped = loop_images / (time.perf_counter() - t0)
    return batched, looped


def main():
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="timed steps of each variant")
    p.add_argument("--chunk", type=int, default=20, help="steps per dispatch of the JAX device loop")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="skip torch.compile (c)")
    args = p.parse_args()
    if args.quick:
        args.batch, args.width, args.steps, args.chunk = 32, 8, 4, 2
    n_images = 50_000 if not args.quick else 256
    rows = [jax_train(args.width, args.batch, args.steps, args.chunk, n_images, args.dtype)]
    if not args.skip_torch:
        rows.append(torch_train(args.width, args.batch, args.steps, compiled=False))
        if not args.skip_compile:
            rows.append(torch_train(args.width, args.batch, args.steps, compiled=True))
    batched, looped = gradcam(args.width, 64 if args.quick else 512, 8 if args.quick else 128)
    import jax

    device = jax.devices()[0]
    best_torch = max((r["images_per_s"] for r in rows[1:]), default=None)
    extra = {
        "device": f"{device.platform} ({device.device_kind})",
        "ratio_vs_best_torch": rows[0]["images_per_s"] / best_torch if best_torch else None,
        "gradcam_batched_images_per_s": batched, "gradcam_loop_images_per_s": looped, "gradcam_speedup": batched / looped,
    }
    _common.finish("gpu_train", args, rows, ["variant", "images_per_s", "epoch_s", "compile_s", "host_overhead_pct"], **extra)
    print(f"device: {extra['device']}")
    if best_torch:
        print(f"cifar_jax / best PyTorch: {extra['ratio_vs_best_torch']:.2f}x")
    print(f"Grad-CAM batched {batched:.0f} img/s vs per-image loop {looped:.0f} img/s: {batched / looped:.1f}x")


if __name__ == "__main__":
    main()
