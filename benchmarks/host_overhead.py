"""Host overhead of the training loop: a real epoch's wall time vs steps x the pure compiled step time.

    python benchmarks/host_overhead.py [--quick] [--max-train 5120] [--out r.json]

"loop (train.py)" mirrors the loop of cifar_jax/train.py with steps_per_dispatch=1:
gather a uint8 batch from the in-memory dataset by the epoch's permutation,
train_lib.global_batch, the step, jax.device_get of the metrics, float()/int()
accumulation. "pure step" runs the same compiled step on one fixed on-device
batch. "loop, metrics read one step late" is a candidate fix: the host gathers
batch i+1 while step i runs, because it fetches step i's metrics only after
dispatching step i+1.
"""

from __future__ import annotations

import sys

import numpy as np

from _common import ROOT, benchmark_config, finish, parser, timed, warn_if_busy


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-train", type=int, default=5120, help="training images in the epoch (class-balanced subset)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    busy = warn_if_busy(args)
    import jax

    from cifar_jax import train_lib
    from cifar_jax.data import load_dataset

    config = benchmark_config()  # Width 16, float32, batch 256.
    if args.quick:
        config.model.width, config.batch_size, args.max_train, args.repeats = 4, 32, 128, 2
    config.data.max_train, config.data.max_test = args.max_train, 1
    config.data.path = str(ROOT / config.data.path)
    dataset = load_dataset(config.data)
    mean, std = dataset.channel_stats()
    batch, n = config.batch_size, len(dataset.train_labels)
    steps = n // batch
    mesh = train_lib.make_mesh()
    model = train_lib.build_model(config, dataset.num_classes)
    state = train_lib.create_sharded_state(model, train_lib.make_optimizer(config.optim, 10_000), config.seed, mesh)
    aug = dict(crop_padding=config.augment.crop_padding, pad_mode=config.augment.pad_mode,
               flip=config.augment.flip, cutout_size=config.augment.cutout)
    step = train_lib.make_train_step(mesh, aug=aug, label_smoothing=config.optim.label_smoothing)
    box, totals = [state], {"loss_sum": 0.0, "correct": 0, "count": 0}
    epoch_counter = iter(range(10**6))

    def host_batch(order, i):
        idx = order[i * batch : (i + 1) * batch]
        return train_lib.global_batch(mesh, dataset.train_images[idx], dataset.train_labels[idx], batch)

    def consume(metrics):
        metrics = jax.device_get(metrics)
        totals["loss_sum"] += float(metrics["loss_sum"])  # As train.py: Python floats, checked for finiteness.
        totals["correct"] += int(metrics["correct"])
        totals["count"] += int(metrics["count"])

    def loop_epoch():  # The loop of train.py.
        s, order = box[0], train_lib.epoch_order(config.seed, next(epoch_counter), n)
        for i in range(steps):
            images, labels = host_batch(order, i)
            s, metrics = step(s, images, labels, mean, std)
            consume(metrics)
        box[0] = jax.block_until_ready(s)

    def lagged_epoch():  # Metrics of step i fetched after step i+1 is dispatched.
        s, order, pending = box[0], train_lib.epoch_order(config.seed, next(epoch_counter), n), None
        for i in range(steps):
            images, labels = host_batch(order, i)
            s, metrics = step(s, images, labels, mean, std)
            if pending is not None:
                consume(pending)
            pending = metrics
        consume(pending)
        box[0] = jax.block_until_ready(s)

    fixed_images, fixed_labels = host_batch(np.arange(n), 0)

    def pure_steps():
        s = box[0]
        for _ in range(steps):
            s, _ = step(s, fixed_images, fixed_labels, mean, std)
        box[0] = jax.block_until_ready(s)

    print(f"width {config.model.width}, batch {batch}, {n} images = {steps} steps per epoch, {args.repeats} repeats", flush=True)
    loop_epoch()  # Compiles and warms up.
    pure, _ = timed(pure_steps, args.repeats)
    loop, _ = timed(loop_epoch, args.repeats)
    lagged, _ = timed(lagged_epoch, args.repeats)
    # Host-only cost of one batch (gather + global_batch), for reference.
    order = train_lib.epoch_order(config.seed, 0, n)
    gather, _ = timed(lambda: [jax.block_until_ready(host_batch(order, i)) for i in range(steps)], args.repeats)
    rows = [
        dict(variant="pure step x steps", steps=steps, seconds=pure, step_ms=1000 * pure / steps, overhead_pct=0.0),
        dict(variant="loop (train.py)", steps=steps, seconds=loop, step_ms=1000 * loop / steps, overhead_pct=100 * (loop / pure - 1)),
        dict(variant="loop, metrics read one step late", steps=steps, seconds=lagged, step_ms=1000 * lagged / steps,
             overhead_pct=100 * (lagged / pure - 1)),
        dict(variant="host gather + global_batch only", steps=steps, seconds=gather, step_ms=1000 * gather / steps,
             overhead_pct=100 * gather / pure),
    ]
    finish("host_overhead", args, rows, ["variant", "steps", "seconds", "step_ms", "overhead_pct"],
           overhead_pct=rows[1]["overhead_pct"], width=config.model.width, batch=batch, images=n, busy=busy)


if __name__ == "__main__":
    sys.exit(main())
