"""Train a CIFAR ResNet: python -m cifar_jax.train --config experiments/resnet18.py --workdir DIR

Per epoch: a tqdm bar with running loss/accuracy, then test loss/accuracy and
scikit-learn's per-class classification report; every figure is appended to
``DIR/metrics.jsonl``. Running the same command again resumes from the newest
checkpoint in DIR; Ctrl-C (SIGINT) or SIGTERM saves the current step first.
The compiled steps live in ``train_lib``; this file is the loop and the CLI.
"""

from __future__ import annotations

import time

STARTED = time.time()  # Before the heavy imports below: the "startup" phase of the run's timings starts here.

if __name__ == "__main__":  # Run as a command: a signal from here on ends it in one line (cifar_jax.early).
    from cifar_jax import early

    early.install()

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from cifar_jax import checkpoints as ckpt
from cifar_jax import early
from cifar_jax import feeds, reporting, runtime, train_lib
from cifar_jax import workdir as workdir_lib
from cifar_jax.config import DTYPES, apply_overrides, describe_fields, load_config, resolve_dtype, validate
from cifar_jax.data import Dataset, load_dataset
from cifar_jax.errors import UserError
from cifar_jax.files import write_json_atomic
from cifar_jax.progress import PhaseClock, Progress, format_duration, run_left_s


class TrainError(UserError):
    """A run that cannot go on (one-line message, exit code 1)."""


class Interrupted(UserError):
    """SIGINT/SIGTERM arrived and the state is saved: exit 128 + signal number."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------- CLI


def parse_args(argv):
    """Splits ``--config.a.b=v`` overrides from the ordinary flags; returns (args, overrides)."""
    parser = argparse.ArgumentParser(
        prog="python -m cifar_jax.train",
        description="Train a CIFAR ResNet; any config field can be overridden as --config.FIELD=VALUE. How long each "
                    "config takes, measured: docs/results.md.",
        epilog="config fields (defaults of cifar_jax.config.base_config; a config file changes some):\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config file with get_config(), e.g. experiments/resnet18.py")
    parser.add_argument("--workdir", help="run directory: checkpoints, metrics.jsonl, report (required unless --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (file + overrides) and exit")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if not args.workdir and not args.print_config:
        parser.error("--workdir is required")
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return runtime.run_cli(lambda: _run(args, overrides))


def _run(args, overrides) -> int:
    config = apply_overrides(load_config(args.config), overrides)
    if args.print_config:
        print(config.to_json_best_effort(indent=1, sort_keys=True))
        return 0
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise TrainError(f"--workdir {str(workdir)!r} is a file, not a directory")
    runtime.initialize_devices(config)  # Must precede anything that starts a JAX backend.
    resolve_auto_dtype(config, workdir, overrides)
    validate(config, jax.device_count())
    if config.model.conv != "xla":  # model.conv=onednn that cannot run here fails now, before the workdir exists.
        from cifar_jax import onednn

        onednn.conv_for(config.model.conv, config.model.dtype)
    runtime.enable_compilation_cache()
    train_and_evaluate(config, workdir)
    return 0


def resolve_auto_dtype(config, workdir: Path, overrides=()) -> None:
    """Resolves ``model.dtype="auto"`` in place and prints the one line that says to what and why.

    A workdir whose config.json holds a resolved dtype keeps it (a resumed run computes as it started, on any
    CPU); otherwise ``onednn.fast_dtype`` decides. Fields given as ``overrides`` win over ``auto_float32``.
    """
    if config.model.dtype != "auto":
        return
    from cifar_jax import onednn

    saved = None
    if not config.fresh:
        try:
            saved = json.loads((workdir / "config.json").read_text())["model"]["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
    if saved in DTYPES:
        dtype, why = saved, f"as this workdir's run resolved it, in {workdir / 'config.json'}"
    else:
        dtype, why = onednn.fast_dtype(config.model.conv)
    line = resolve_dtype(config, dtype, why, keep={o.split("=", 1)[0] for o in overrides})
    if jax.process_index() == 0:
        print(line, flush=True)


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Run:
    """What stays fixed for a whole run: data, mesh, how batches reach the device, the evaluators, sizes."""

    config: ml_collections.ConfigDict
    workdir: Path
    dataset: Dataset
    mean: np.ndarray  # (3,) channel means of the training images, in [0, 1]
    std: np.ndarray  # (3,) their standard deviations
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    feed: feeds.HostFeed | feeds.DeviceFeed  # runs up to K steps from an epoch position
    evaluate: feeds.HostEvaluator | feeds.DeviceEvaluator  # state -> {"loss", "accuracy", "predictions"}, the run's views
    evaluate_single_view: feeds.HostEvaluator | feeds.DeviceEvaluator | None  # one view; None without test-time views
    schedule: optax.Schedule
    meta: dict  # saved with every checkpoint
    is_main: bool

    def say(self, *args, **kwargs) -> None:
        """print on the main process only."""
        if self.is_main:
            print(*args, **kwargs)


def train_and_evaluate(config, workdir) -> list[dict]:
    """Trains (or resumes) the run in ``workdir``; returns the per-epoch metrics history.

    Prints one line of per-phase seconds at the end and writes them to ``workdir/timings.json``.
    """
    workdir = Path(workdir)
    resolve_auto_dtype(config, workdir)  # Already done by the CLI; here for callers that pass a config file's "auto".
    clock = PhaseClock(STARTED)
    clock.lap("startup")  # Python, imports, config, devices.
    dataset = load_dataset(config.data)
    clock.lap("data")
    run, state = setup(config, workdir, dataset)
    manager, lock = workdir_lib.open_workdir(workdir, config, dataset.num_classes, meta=run.meta)
    try:
        history = _train_locked(run, manager, state, clock)
    finally:
        lock.release()
    if run.is_main:
        run.say(clock.summary())
        write_json_atomic(workdir / "timings.json",
                          {"seconds": clock.seconds, "total": clock.last - clock.started, "epochs_run": len(history)})
    return history


def _train_locked(run: Run, manager, state, clock: PhaseClock) -> list[dict]:
    """The epochs, then the report: everything done while holding the workdir lock."""
    config, workdir = run.config, run.workdir
    try:
        state, history, progress = restore_or_start(run, manager, state)
        clock.lap("setup")  # Model, state, uploads, workdir, summary.
        if progress.epoch < config.epochs:  # A finished run (rerun) trains nothing: nothing to compile.
            compile_programs(run, state)
            run.say(f"Compiled the train and evaluation programs in {clock.lap('compile'):.1f}s")
        with catch_signals() as stop, EpochLog(run) as log:
            for epoch in range(progress.epoch, config.epochs):
                state, progress, train_time = run_epoch(run, state, progress, stop, manager, history)
                last = epoch + 1 == config.epochs
                record = epoch_record(run, state, progress, train_time, evaluate=last or (epoch + 1) % config.eval_every == 0,
                                      last=last)
                history.append(record)
                if not last:
                    run.say(f"run: {epoch + 1} of {config.epochs} epochs done, about "
                            f"{format_duration(run_left_s(history, config.epochs, epoch, 0, 0, 0.0))} left")
                progress = Progress(epoch=epoch + 1)
                log.write(record)
                if checkpoint_due(config.checkpoint, epoch, last):
                    tested = "test_accuracy" in record  # Only evaluated epochs can be kept as the best.
                    ckpt.save(manager, state, {**run.meta, "history": history, "progress": dataclasses.asdict(progress)},
                              metrics={"test_accuracy": record["test_accuracy"]} if tested else None)
                if stop.signum is not None:
                    save_and_stop(run, manager, state, history, progress, stop.signum, finished=last)
    finally:
        manager.close()
    clock.lap("epochs")  # Training, evaluation, checkpoints.
    if run.is_main and config.log.report:
        run.say(f"Report written to {reporting.build_report(workdir).path}")
        clock.lap("report")
    return history


def checkpoint_due(checkpoint_config, epoch: int, last: bool) -> bool:
    """Whether the end of (0-based) ``epoch`` saves: after the last epoch, and every ``every_epochs`` (0 = never)."""
    every = checkpoint_config.every_epochs
    return last or bool(every and (epoch + 1) % every == 0)


def compile_programs(run: Run, state) -> None:
    """Compiles the train and evaluation programs ahead of the first epoch, side by side (XLA compiles without the GIL)."""
    jobs = [(run.feed.compile, state, run.mean, run.std), (run.evaluate.compile, state)]
    if run.evaluate_single_view is not None:
        jobs.append((run.evaluate_single_view.compile, state))
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(*job) for job in jobs]:
            future.result()


def setup(config, workdir: Path, dataset):
    """The fixed parts of a run and a freshly initialised (replicated) train state."""

    mean, std = dataset.channel_stats()
    n_train = len(dataset.train_labels)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"batch_size {config.batch_size} is larger than the {n_train} training images")
    total_steps = steps_per_epoch * config.epochs
    model = train_lib.build_model(config, dataset.num_classes)
    onednn_kernels = getattr(model, "conv_general_dilated", None) is not None  # A family without the option: XLA's.
    mesh = train_lib.make_mesh()
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, total_steps), config.seed, mesh,
                                           config.data.image_size)
    aug = dict(crop_padding=config.augment.crop_padding, pad_mode=config.augment.pad_mode, flip=config.augment.flip,
               cutout_size=config.augment.cutout)
    on_cpu = jax.default_backend() == "cpu"
    loop = config.loop if config.loop != "auto" else ("host" if on_cpu else "device")
    k = config.steps_per_dispatch or (1 if on_cpu else 20)  # Scanned steps are slow on XLA:CPU; on a GPU they hide the host.
    feed_cls, make_evaluator = (feeds.HostFeed, feeds.host_evaluator) if loop == "host" else (feeds.DeviceFeed, feeds.device_evaluator)
    meta = {
        "config": config.to_dict(),
        "class_names": list(dataset.class_names),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "num_train": n_train,
        "num_test": len(dataset.test_labels),
        # The kernels the test set is evaluated with: the trained-model predictor (reports) uses the same ones.
        "conv": "onednn" if onednn_kernels else "xla",
        "backend": jax.default_backend(),
    }
    evaluate = make_evaluator(mesh, dataset, config, mean, std)
    has_views = config.eval_flip or config.eval_translate > 0
    run = Run(
        config=config, workdir=workdir, dataset=dataset, mean=mean, std=std, mesh=mesh, steps_per_epoch=steps_per_epoch,
        feed=feed_cls(mesh, dataset, config.batch_size, k, aug, config.optim.label_smoothing),
        evaluate=evaluate, evaluate_single_view=evaluate.with_views(False, 0) if has_views else None,
        schedule=train_lib.make_schedule(config.optim, total_steps), meta=meta, is_main=jax.process_index() == 0,
    )
    run.say(f"Data: {getattr(dataset, 'description', config.data.path)}: {n_train} training and "
            f"{len(dataset.test_labels)} test images, {dataset.num_classes} classes")
    kernels = "oneDNN (cifar_jax.onednn)" if onednn_kernels else "XLA"
    if kernels == "XLA" and config.model.conv == "auto" and on_cpu:
        from cifar_jax import onednn

        kernels += f"; not oneDNN: {onednn.unavailable_reason() or 'it needs one CPU device and float32'}"
    run.say(f"Convolutions: {kernels} (model.conv={config.model.conv}); {loop} loop, {k} step(s) per dispatch, "
            f"{mesh.size} {jax.default_backend()} device(s)")
    return run, state


def restore_or_start(run: Run, manager, state):
    """(state, history, progress) from the newest checkpoint, or the fresh state; writes the run's own files."""
    history, progress = [], Progress()
    step = manager.latest_step()
    if step is not None:
        loaded = ckpt.load_intact(manager, run.workdir, "latest", lambda s, meta: ckpt.restore_tree(manager, s, state),
                                  warn=False, training=True)
        workdir_lib.set_aside_damaged(manager, run.workdir, loaded, run.is_main)
        step, meta = loaded.step, loaded.meta
        state = ckpt.tree_to_state(state, loaded.tree)
        history, progress = meta["history"], Progress(**meta["progress"])
        run.say(f"Resuming from step {int(jax.device_get(state.step))} (epoch {progress.epoch + 1}, "
                f"batch {progress.step_in_epoch}) in {run.workdir}")
    if run.is_main:
        workdir_lib.write_metrics_file(run.workdir, history)  # Drops any line written after the checkpoint we resume from.
        if step is None:
            summary = model_summary(run.config, run.dataset.num_classes)
            (run.workdir / "model_summary.txt").write_text(summary)
            run.say(summary)
        write_json_atomic(run.workdir / "config.json", run.config.to_dict())
    return state, history, progress


def run_epoch(run: Run, state, progress: Progress, stop, manager, history):
    """Trains the rest of epoch ``progress.epoch``, K steps per dispatch; returns (state, progress, seconds).

    The host reads the metrics once per dispatch: the non-finite check and SIGINT/SIGTERM act at that granularity.
    """
    config, epoch, n = run.config, progress.epoch, run.steps_per_epoch
    run.feed.start_epoch(train_lib.epoch_order(config.seed, epoch, len(run.dataset.train_labels)))
    t0, first = time.time(), progress.step_in_epoch
    # A bar with this epoch's ETA and the run's in a terminal; nothing when stdout is a file (the epoch lines remain).
    with tqdm(total=n, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True,
              disable=None if run.is_main and config.log.progress_bar else True, file=sys.stdout) as bar:
        while progress.step_in_epoch < n:
            i = progress.step_in_epoch
            steps = run.feed.steps_for(n - i)
            state, metrics = run.feed.dispatch(state, i, steps, run.mean, run.std)
            metrics = jax.device_get(metrics)
            check_finite(metrics, state, epoch, manager)
            progress.add(metrics, steps)
            bar.update(steps)
            left = run_left_s(history, config.epochs, epoch, progress.step_in_epoch - first, n - progress.step_in_epoch,
                              time.time() - t0)
            bar.set_postfix({"loss": f"{progress.loss:.4f}", "acc": f"{progress.accuracy:.4f}", "run left": format_duration(left)})
            if stop.signum is not None and progress.step_in_epoch < n:
                bar.close()
                save_and_stop(run, manager, state, history, progress, stop.signum)
    return state, progress, time.time() - t0


def check_finite(metrics: dict, state, epoch: int, manager) -> None:
    """Stops the run (TrainError) at a non-finite loss; nothing after the last good checkpoint is saved."""
    if not math.isfinite(float(metrics["loss_sum"])):
        last = manager.latest_step()
        raise TrainError(
            f"loss became non-finite at step {int(jax.device_get(state.step))} (epoch {epoch + 1}); "
            f"nothing saved after it, last good checkpoint: {'none' if last is None else f'step {last}'}; "
            "try a lower optim.lr"
        )


def epoch_record(run: Run, state, progress: Progress, train_time: float, evaluate: bool = True, last: bool = False) -> dict:
    """The epoch's metrics record (also printed), with test metrics if ``evaluate`` (see ``eval_every``).

    On the ``last`` epoch of a run with test-time views it also holds ``test_accuracy_single_view``.
    """
    t0 = time.time()
    step = int(jax.device_get(state.step))
    record = {
        "epoch": progress.epoch + 1,
        "step": step,
        "lr": float(run.schedule(step - 1)),
        "train_loss": progress.loss,
        "train_accuracy": progress.accuracy,
    }
    line = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"
    if evaluate:
        test = run.evaluate(state)
        names = run.dataset.class_names
        report = reporting.class_report(run.dataset.test_labels, test["predictions"], names)
        record.update(test_loss=test["loss"], test_accuracy=test["accuracy"], classification_report=report)
        line += f" | test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
        if last and run.evaluate_single_view is not None:
            record["test_accuracy_single_view"] = run.evaluate_single_view(state)["accuracy"]
            line += f" (single view {record['test_accuracy_single_view']:.4f})"
    record.update(train_time_s=train_time, epoch_time_s=train_time + time.time() - t0)
    run.say(f"{line} | {record['epoch_time_s']:.1f}s")
    if evaluate:
        run.say(reporting.format_class_report(report, names) + "\n")
    return record


def save_and_stop(run: Run, manager, state, history, progress: Progress, signum: int, finished: bool = False):
    """Saves the current step (unless just saved) and raises Interrupted; ``finished``: the last epoch is done (the
    signal came while it was evaluated and saved), so only the report is skipped."""
    step = int(jax.device_get(state.step))
    if manager.latest_step() != step:
        ckpt.save(manager, state, {**run.meta, "history": history, "progress": dataclasses.asdict(progress)})
    if finished:
        raise Interrupted(f"{signal.Signals(signum).name}: the run finished and saved its last epoch (step {step}); the "
                          f"report was not written (python -m cifar_jax.report --workdir {run.workdir} writes it)", signum)
    raise Interrupted(
        f"{signal.Signals(signum).name}: saved step {step} (epoch {progress.epoch + 1}, batch {progress.step_in_epoch}); "
        "run the same command again to resume",
        signum,
    )


class _Stop:
    signum: int | None = None


@contextlib.contextmanager
def catch_signals():
    """Within the block, SIGINT/SIGTERM/SIGHUP only set ``.signum`` on the yielded object; the loop saves and stops."""
    stop = _Stop()

    def on_signal(signum, frame):
        stop.signum = signum

    old = {s: signal.signal(s, on_signal) for s in early.SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class EpochLog:
    """Appends each epoch's record to ``metrics.jsonl`` and, if configured, TensorBoard (main process only)."""

    def __init__(self, run: Run):
        self.path = run.workdir / "metrics.jsonl"
        self.enabled = run.is_main
        self.tensorboard = None
        if self.enabled and run.config.log.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise TrainError("log.tensorboard=True needs tensorboardX: pip install 'cifar_jax[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(run.workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
                if key in record:  # Test metrics only on evaluated epochs (eval_every).
                    self.tensorboard.add_scalar(key, record[key], record["epoch"])
            self.tensorboard.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tensorboard is not None:
            self.tensorboard.close()


def model_summary(config, num_classes: int) -> str:
    """``nn.tabulate`` table (layer, output shape, parameters) of the config's model on one image, plus the trainable count."""
    import flax.linen as nn
    import jax.numpy as jnp

    from cifar_jax.models import build_model

    model, size = build_model(config, num_classes), config.data.image_size
    x = jnp.zeros((1, size, size, 3))
    table = nn.tabulate(model, jax.random.key(0), depth=2, console_kwargs={"width": 120, "force_terminal": False})(x, train=False)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    return (f"{table}\nTrainable parameters: {count(variables['params']):,}; the table's total also counts the "
            f"{count(variables['batch_stats']):,} BatchNorm running statistics (batch_stats), which are not trained.\n")


if __name__ == "__main__":
    runtime.exit_process(main())
