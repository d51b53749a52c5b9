"""The PyTorch reference trainer: the original's model and optimizer in PyTorch, driven by a cifar_jax config.

It reads the same config files and overrides as ``cifar_jax.train`` and the same data (``cifar_jax.data``: the JPEG
archive or the official release, the same class-balanced subsets, the same channel statistics and the same data
order, ``train_lib.epoch_order``), and trains ``_torch_resnet.ResNet18`` with the recipe's fields:

- ``model.width``; ``model.init``: "pytorch" keeps PyTorch's defaults (the original's), "he" applies torchvision's;
- ``optim``: ``torch.optim.SGD`` (coupled weight decay, Nesterov, momentum); schedule "onecycle" is
  ``torch.optim.lr_scheduler.OneCycleLR`` (momentum cycled only when ``optim.momentum_range`` is set, with its
  range), "linear", "cosine" and "constant" are cifar_jax's own curves step for step (``LambdaLR``);
  ``label_smoothing`` is ``CrossEntropyLoss``'s;
- ``augment``: crop after padding (``pad_mode``), mirror, cutout (the same square rule as ``cifar_jax.augment``),
  drawn with torch's generator on the device;
- epochs, batch size (the last partial batch of an epoch dropped, as cifar_jax does), seed.

On CUDA it computes in bfloat16 (``torch.autocast``) with channels_last when ``model.dtype`` is bfloat16, else
float32; on a CPU in float32. It prints one line per seed and a last JSON line: the final test accuracy, single view
and with the mirror averaged in (the same two figures ``cifar_jax.train`` logs as ``test_accuracy_single_view`` and,
with ``eval_flip``, ``test_accuracy``). For example, the CPU comparison of docs/recipes.md:

    python benchmarks/torch_reference.py --config experiments/resnet18.py --seeds 0 1 2 \
        --set model.width=16 epochs=4 batch_size=256 model.dtype=float32 eval_translate=0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torch_resnet import ResNet18  # noqa: E402

from cifar_jax import train_lib  # noqa: E402
from cifar_jax.config import apply_overrides, load_config, validate  # noqa: E402


def build_model(config) -> ResNet18:
    """The original's ResNet18 at ``model.width``, initialised as ``model.init`` says (PyTorch's default, or He)."""
    if config.model.name.lower() != "resnet18":
        raise SystemExit(f"torch_reference: only resnet18 is written in PyTorch here, not {config.model.name!r}")
    model = ResNet18(config.model.width, num_classes=10)
    if config.model.init == "he":  # torchvision's ResNet init; the head keeps PyTorch's default.
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def make_optimizer(model: nn.Module, optim, total_steps: int):
    """(torch.optim.SGD, its per-step scheduler) for a cifar_jax ``optim`` block: the original's optimizer."""
    if optim.name != "sgd":
        raise SystemExit(f"torch_reference: only optim.name='sgd' (the original's), not {optim.name!r}")
    momentum_range = tuple(optim.get("momentum_range", ()))
    opt = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                          weight_decay=optim.weight_decay)
    if optim.schedule == "onecycle":
        if optim.warmup_fraction * total_steps <= 1:  # OneCycleLR divides by zero there (cifar_jax does not).
            raise SystemExit(f"torch_reference: OneCycleLR needs optim.warmup_fraction * steps > 1, got "
                             f"{optim.warmup_fraction} * {total_steps}")
        base, top = momentum_range or (optim.momentum, optim.momentum)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=optim.lr, total_steps=total_steps, pct_start=optim.warmup_fraction, anneal_strategy="cos",
            div_factor=optim.div_factor, final_div_factor=optim.final_div_factor,
            cycle_momentum=bool(momentum_range), base_momentum=base, max_momentum=top)
    else:  # cifar_jax's own curve, step for step: the original had only the one-cycle one.
        lrs = np.asarray([float(train_lib.make_schedule(optim, total_steps)(i)) for i in range(total_steps + 1)])
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lrs[min(i, total_steps)] / optim.lr)
    return opt, scheduler


def augment(images: torch.Tensor, generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor, *,
            crop_padding: int, pad_mode: str, flip: bool, cutout: int) -> torch.Tensor:
    """``cifar_jax.augment.augment_batch`` in torch: (N, 3, H, W) pixel values in [0, 255] -> the normalised batch.

    Crop after padding (pixel value 0 for "constant"), mirror, normalise, then cutout (zero = the mean colour),
    each drawn from ``generator`` on the batch's device.
    """
    n, _, h, w = images.shape
    dev = images.device
    if crop_padding:
        p = crop_padding
        mode = {"reflect": "reflect", "edge": "replicate", "constant": "constant"}.get(pad_mode)
        if mode is None:
            raise SystemExit(f"torch_reference: augment.pad_mode {pad_mode!r} has no torch padding mode")
        padded = nn.functional.pad(images, (p, p, p, p), mode=mode)
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator, device=dev)
        rows = (offsets[:, 0, None] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
        cols = (offsets[:, 1, None] + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
        batch = torch.arange(n, device=dev)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(n, generator=generator, device=dev) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    images = (images / 255.0 - mean[:, None, None]) / std[:, None, None]
    if cutout:
        cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=dev)
        cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=dev)
        r, c = torch.arange(h, device=dev)[None, :, None], torch.arange(w, device=dev)[None, None, :]
        inside = (r >= cy - cutout // 2) & (r < cy + (cutout + 1) // 2) & (c >= cx - cutout // 2) & (c < cx + (cutout + 1) // 2)
        images = images.masked_fill(inside[:, None], 0.0)
    return images


def train_step(model, opt, scheduler, x: torch.Tensor, y: torch.Tensor, label_smoothing: float, autocast) -> torch.Tensor:
    """One step of the original's loop: forward in train mode, mean cross-entropy, backward, SGD step, scheduler step."""
    with autocast():
        loss = nn.functional.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, mean, std, batch: int, autocast) -> dict:
    """Final test accuracy: single view, and with the mirror's logits averaged in (eval mode, running statistics)."""
    model.eval()
    single = flip = 0
    for i in range(0, len(labels), batch):
        x = (images[i:i + batch] / 255.0 - mean[:, None, None]) / std[:, None, None]
        with autocast():
            logits = model(x).float()
            mirrored = model(x.flip(3)).float()
        single += int((logits.argmax(1) == labels[i:i + batch]).sum())
        flip += int(((logits + mirrored).argmax(1) == labels[i:i + batch]).sum())
    model.train()
    return {"single_view": single / len(labels), "flip": flip / len(labels)}


def train(config, dataset, device: str, log=print) -> dict:
    """Trains one seed of ``config`` on ``dataset``; returns {"single_view", "flip", "seconds", "images_per_s"}."""
    torch.manual_seed(config.seed)
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest kernels per shape (speed only; as cifar_jax's autotuning).
    generator = torch.Generator(device=device).manual_seed(config.seed)
    mean_np, std_np = dataset.channel_stats()
    mean, std = (torch.tensor(a, device=device) for a in (mean_np, std_np))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device, torch.float32)
    train_x, test_x = as_tensor(dataset.train_images), as_tensor(dataset.test_images)
    train_y = torch.from_numpy(dataset.train_labels.astype(np.int64)).to(device)
    test_y = torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device)
    bf16 = device.startswith("cuda") and config.model.dtype == "bfloat16"
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = build_model(config).to(device, memory_format=memory_format)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if bf16 else contextlib.nullcontext
    b, n = config.batch_size, len(dataset.train_labels)
    steps_per_epoch = n // b
    opt, scheduler = make_optimizer(model, config.optim, steps_per_epoch * config.epochs)
    a = config.augment
    model.train()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.from_numpy(train_lib.epoch_order(config.seed, epoch, n)).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * b:(i + 1) * b]
            x = augment(train_x[idx], generator, mean, std, crop_padding=a.crop_padding, pad_mode=a.pad_mode,
                        flip=a.flip, cutout=a.cutout).contiguous(memory_format=memory_format)
            loss_sum += train_step(model, opt, scheduler, x, train_y[idx], config.optim.label_smoothing, autocast)
        log(f"  epoch {epoch + 1}/{config.epochs}: train loss {float(loss_sum) / steps_per_epoch:.4f}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = evaluate(model, test_x, test_y, mean, std, config.eval_batch_size, autocast)
    return {**result, "seconds": seconds, "images_per_s": steps_per_epoch * b * config.epochs / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a cifar_jax config file, e.g. experiments/resnet18.py")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides, as train's --config.FIELD=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(load_config(args.config), args.set)
    if config.model.dtype == "auto":
        config.model.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    validate(config)
    from cifar_jax.data import load_dataset

    dataset = load_dataset(config.data)
    print(f"torch {torch.__version__} on {args.device}; {len(dataset.train_labels)} train / {len(dataset.test_labels)} test "
          f"images; width {config.model.width}, init {config.model.init}, {config.epochs} epochs of batch "
          f"{config.batch_size}, dtype {config.model.dtype if args.device.startswith('cuda') else 'float32'}", flush=True)
    runs = []
    for seed in args.seeds:
        config.seed = seed
        r = train(config, dataset, args.device, log=lambda line: print(line, flush=True))
        runs.append(r)
        print(f"seed {seed}: single view {100 * r['single_view']:.2f}%, with flip {100 * r['flip']:.2f}%, "
              f"{r['seconds']:.1f} s ({r['images_per_s']:.0f} images/s)", flush=True)
    summary = {key: [r[key] for r in runs] for key in ("single_view", "flip")}
    for key, values in list(summary.items()):
        summary[f"{key}_mean"] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    print(json.dumps({"seeds": args.seeds, "torch": torch.__version__, "device": args.device, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
