"""Train a CIFAR ResNet: ``python -m cifar_jax.train --config experiments/resnet18.py --workdir DIR``.

Per epoch: a tqdm bar with running loss/accuracy, then test loss/accuracy and
scikit-learn's per-class classification report; every figure is appended to
``DIR/metrics.jsonl``. Running the same command again resumes from the newest
checkpoint in DIR; Ctrl-C (SIGINT) or SIGTERM saves the current step first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from cifar_jax.config import ConfigError, apply_overrides, load_config, validate


class TrainError(RuntimeError):
    """A run that cannot go on (one-line message, exit code 1)."""


class Interrupted(Exception):
    """Raised in the loop after SIGINT/SIGTERM once the state is saved."""


def parse_args(argv):
    """Splits ``--config.a.b=v`` overrides from the ordinary flags."""
    parser = argparse.ArgumentParser(
        prog="python -m cifar_jax.train",
        description="Train a CIFAR ResNet; any config field can be overridden as --config.FIELD=VALUE.",
    )
    parser.add_argument("--config", required=True, help="config file with get_config(), e.g. experiments/resnet18.py")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, report")
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config.") :])
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    return args, overrides


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in the user cache dir (``$CIFAR_JAX_CACHE/jax``)."""
    import jax

    from cifar_jax.data import default_cache_dir

    if os.environ.get("CIFAR_JAX_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_library_logs() -> None:
    """Hides orbax/absl INFO and WARNING chatter (e.g. about read-only managers) from the CLI output."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` from config.distributed, or from the environment if set there."""
    import jax

    d = config.distributed
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    quiet_library_logs()
    try:
        config = apply_overrides(load_config(args.config), overrides)
        import jax

        if config.cpu_devices > 0:  # Must precede anything that starts a JAX backend.
            jax.config.update("jax_num_cpu_devices", config.cpu_devices)
        maybe_initialize_distributed(config)

        validate(config, jax.device_count())
        enable_compilation_cache()
        train_and_evaluate(config, args.workdir)
    except (ConfigError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return int(e.args[1]) if len(e.args) > 1 else 130
    except Exception as e:  # Data and checkpoint problems carry one-line messages of their own.
        from cifar_jax.checkpoints import CheckpointError
        from cifar_jax.data import DataError

        if isinstance(e, (DataError, CheckpointError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


def train_and_evaluate(config, workdir) -> list[dict]:
    """Trains (or resumes) the run in ``workdir``; returns the per-epoch metrics history."""
    import jax
    from sklearn.metrics import classification_report
    from tqdm.auto import tqdm

    from cifar_jax import checkpoints as ckpt
    from cifar_jax import train_lib
    from cifar_jax.data import load_dataset

    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    dataset = load_dataset(config.data)
    mean, std = dataset.channel_stats()
    num_classes = dataset.num_classes
    n_train = len(dataset.train_labels)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"batch_size {config.batch_size} is larger than the {n_train} training images")
    total_steps = steps_per_epoch * config.epochs

    model = train_lib.build_model(config, num_classes)
    tx = train_lib.make_optimizer(config.optim, total_steps)
    mesh = train_lib.make_mesh()
    state = train_lib.create_sharded_state(model, tx, config.seed, mesh, config.data.image_size)

    history: list[dict] = []
    progress = {"epoch": 0, "step_in_epoch": 0, "loss_sum": 0.0, "correct": 0, "count": 0}
    manager = _open_workdir(workdir, config, num_classes, ckpt)
    start_step = 0
    if manager.latest_step() is not None:
        step = manager.latest_step()
        meta = ckpt.read_meta(manager, step)
        state = ckpt.restore_state(manager, step, state)
        history, progress = meta["history"], meta["progress"]
        start_step = int(jax.device_get(state.step))
        say(f"Resuming from step {start_step} (epoch {progress['epoch'] + 1}, batch {progress['step_in_epoch']}) in {workdir}")
    if is_main:
        _write_metrics_file(workdir, history)  # Drops any line written after the checkpoint we resume from.
        if start_step == 0:
            (workdir / "model_summary.txt").write_text(model_summary(model, config.data.image_size))
            say(model_summary(model, config.data.image_size))
        ckpt.write_json_atomic(workdir / "config.json", config.to_dict())

    meta_base = {
        "config": config.to_dict(),
        "class_names": list(dataset.class_names),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "num_train": n_train,
        "num_test": len(dataset.test_labels),
    }
    aug = dict(
        crop_padding=config.augment.crop_padding,
        pad_mode=config.augment.pad_mode,
        flip=config.augment.flip,
        cutout_size=config.augment.cutout,
    )
    k = config.steps_per_dispatch
    train_step = train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing, steps_per_dispatch=k)
    single_step = train_step if k == 1 else train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing)
    eval_step = train_lib.make_eval_step(mesh, flip=config.eval_flip)
    schedule = train_lib.make_schedule(config.optim, total_steps)
    writer = _tensorboard_writer(workdir, config) if is_main else None

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs, pid = jax.process_count(), jax.process_index()
    rows_per_process = config.batch_size // procs
    try:
        for epoch in range(progress["epoch"], config.epochs):
            order = train_lib.epoch_order(config.seed, epoch, n_train)
            first = progress["step_in_epoch"] if progress["epoch"] == epoch else 0
            if first == 0:
                progress = {"epoch": epoch, "step_in_epoch": 0, "loss_sum": 0.0, "correct": 0, "count": 0}
            t0 = time.time()
            bar = tqdm(
                total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (is_main and config.log.progress_bar), dynamic_ncols=True, file=sys.stdout,
            )
            i = first
            while i < steps_per_epoch:
                n = k if (k > 1 and i + k <= steps_per_epoch) else 1
                idx = order[i * config.batch_size : (i + n) * config.batch_size].reshape(n, config.batch_size)
                local = idx[:, pid * rows_per_process : (pid + 1) * rows_per_process]
                imgs, labels = dataset.train_images[local], dataset.train_labels[local]
                if n == 1:
                    images, labels = train_lib.global_batch(mesh, imgs[0], labels[0], config.batch_size)
                    state, metrics = single_step(state, images, labels, mean, std)
                else:
                    images, labels = train_lib.global_batch(mesh, imgs, labels, config.batch_size, leading=(n,))
                    state, metrics = train_step(state, images, labels, mean, std)
                metrics = jax.device_get(metrics)
                if not math.isfinite(float(metrics["loss_sum"])):
                    last = manager.latest_step()
                    raise TrainError(
                        f"loss became non-finite at step {int(jax.device_get(state.step))} (epoch {epoch + 1}); "
                        f"nothing saved after it, last good checkpoint: {'none' if last is None else f'step {last}'}; "
                        "try a lower optim.lr"
                    )
                progress["loss_sum"] += float(metrics["loss_sum"])
                progress["correct"] += int(metrics["correct"])
                progress["count"] += int(metrics["count"])
                i += n
                progress["step_in_epoch"] = i
                bar.update(n)
                bar.set_postfix(loss=f"{progress['loss_sum'] / progress['count']:.4f}", acc=f"{progress['correct'] / progress['count']:.4f}")
                if stop["signal"] is not None and i < steps_per_epoch:
                    _save_interrupted(manager, state, meta_base, history, progress, stop["signal"], ckpt)
            bar.close()
            train_time = time.time() - t0
            test = evaluate(eval_step, state, dataset, mean, std, mesh, config.eval_batch_size)
            record = {
                "epoch": epoch + 1,
                "step": int(jax.device_get(state.step)),
                "lr": float(schedule(int(jax.device_get(state.step)) - 1)),
                "train_loss": progress["loss_sum"] / progress["count"],
                "train_accuracy": progress["correct"] / progress["count"],
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "train_time_s": train_time,
                "epoch_time_s": time.time() - t0,
                "classification_report": classification_report(
                    dataset.test_labels, test["predictions"], labels=list(range(num_classes)),
                    target_names=list(dataset.class_names), output_dict=True, zero_division=0,
                ),
            }
            history.append(record)
            progress = {"epoch": epoch + 1, "step_in_epoch": 0, "loss_sum": 0.0, "correct": 0, "count": 0}
            say(
                f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
                f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f} | {record['epoch_time_s']:.1f}s"
            )
            say(classification_report(
                dataset.test_labels, test["predictions"], labels=list(range(num_classes)),
                target_names=list(dataset.class_names), digits=4, zero_division=0,
            ))
            if is_main:
                with open(workdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
                        writer.add_scalar(key, record[key], epoch + 1)
                    writer.flush()
            last_epoch = epoch + 1 == config.epochs
            every = config.checkpoint.every_epochs
            if last_epoch or (every and (epoch + 1) % every == 0):
                ckpt.save(
                    manager, state, {**meta_base, "history": history, "progress": progress},
                    metrics={"test_accuracy": record["test_accuracy"]},
                )
            if stop["signal"] is not None and not last_epoch:
                _save_interrupted(manager, state, meta_base, history, progress, stop["signal"], ckpt)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        manager.close()
        if writer is not None:
            writer.close()
    if is_main and config.log.report:
        from cifar_jax.report import build_report

        build_report(workdir)
        say(f"Report written to {workdir / 'REPORT.md'}")
    return history


def evaluate(eval_step, state, dataset, mean, std, mesh, eval_batch_size: int) -> dict:
    """Test loss, accuracy and (M,) predictions over the whole test set, padding the last batch."""
    import jax

    from cifar_jax import train_lib

    devices, procs, pid = jax.device_count(), jax.process_count(), jax.process_index()
    batch = -(-eval_batch_size // devices) * devices  # Round up to a multiple of the device count.
    images, labels = dataset.test_images, dataset.test_labels
    m = len(labels)
    predictions, loss_sum = [], 0.0
    for start in range(0, m, batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        valid = len(y)
        if valid < batch:  # Pad with copies of the first image; the mask zeroes their loss.
            x = np.concatenate([x, np.repeat(x[:1], batch - valid, 0)])
            y = np.concatenate([y, np.repeat(y[:1], batch - valid, 0)])
        mask = np.arange(batch) < valid
        rows = slice(pid * batch // procs, (pid + 1) * batch // procs)
        gx, gy = train_lib.global_batch(mesh, x[rows], y[rows], batch)
        gmask = jax.make_array_from_process_local_data(train_lib.batch_sharded(mesh), mask[rows], (batch,))
        out = jax.device_get(eval_step(state, gx, gy, gmask, mean, std))
        predictions.append(np.argmax(out["logits"][:valid], -1))
        loss_sum += float(np.sum(out["loss"][:valid], dtype=np.float64))
    predictions = np.concatenate(predictions)
    return {"loss": loss_sum / m, "accuracy": float(np.mean(predictions == labels)), "predictions": predictions}


def model_summary(model, image_size: int = 32) -> str:
    """``nn.tabulate`` table (layer, output shape, parameters) of ``model`` on one image."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    table = nn.tabulate(model, jax.random.key(0), depth=2, console_kwargs={"width": 120, "force_terminal": False})
    return table(jnp.zeros((1, image_size, image_size, 3)), train=False)


def _open_workdir(workdir: Path, config, num_classes: int, ckpt):
    """Opens the checkpoint manager; refuses, without touching anything, a workdir of another model."""
    existing = ckpt.checkpoint_dir(workdir)
    if config.fresh and existing.exists():
        import shutil

        # Only our own files are removed: checkpoints and the files derived from them.
        shutil.rmtree(existing)
        for name in ("metrics.jsonl", "REPORT.md"):
            (workdir / name).unlink(missing_ok=True)
    if existing.exists() and not config.fresh:
        probe = ckpt.make_manager(workdir, read_only=True)
        latest = probe.latest_step()
        if latest is not None:
            meta = ckpt.read_meta(probe, latest)
            why = ckpt.describe_mismatch(meta["config"], config, num_classes, len(meta["class_names"]))
            if why:
                probe.close()
                raise TrainError(
                    f"workdir {str(workdir)!r} holds a checkpoint of another model ({why}); "
                    "use another --workdir, or --config.fresh=True to start over there"
                )
        probe.close()
    workdir.mkdir(parents=True, exist_ok=True)
    return ckpt.make_manager(workdir, keep=config.checkpoint.keep)


def _write_metrics_file(workdir: Path, history: list[dict]) -> None:
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(workdir / "metrics.jsonl")


def _save_interrupted(manager, state, meta_base, history, progress, signum, ckpt):
    import jax

    step = int(jax.device_get(state.step))
    if manager.latest_step() != step:
        ckpt.save(manager, state, {**meta_base, "history": history, "progress": progress})
    name = signal.Signals(signum).name
    raise Interrupted(
        f"{name}: saved step {step} (epoch {progress['epoch'] + 1}, batch {progress['step_in_epoch']}); "
        "run the same command again to resume",
        128 + signum,
    )


def _tensorboard_writer(workdir: Path, config):
    if not config.log.tensorboard:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise TrainError("log.tensorboard=True needs tensorboardX: pip install 'cifar_jax[tensorboard]'") from None
    return SummaryWriter(str(workdir / "tensorboard"))


if __name__ == "__main__":
    sys.exit(main())
