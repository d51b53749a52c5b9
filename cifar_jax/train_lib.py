"""The pure core of training: state, optimizer, compiled train/eval steps, sharding.

Nothing here reads files or prints. ``make_train_step`` and
``make_eval_step`` return ``jax.jit``-compiled functions whose batch
arguments are sharded over the ``"data"`` axis of a device mesh and whose
state is replicated, so the same code runs on one device, many devices or
many hosts; the loss is a mean over the *global* batch, so gradients are
never double-counted.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_jax.augment import augment_batch, normalize
from cifar_jax.models import build_model, eval_logits  # noqa: F401  (build_model is part of this module's API)


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics and the augmentation PRNG key."""

    batch_stats: Any
    rng: jax.Array


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Learning rate per step: one-cycle (cosine up then down), linear (straight up then down), cosine decay, or constant.

    "onecycle" and "linear" rise from lr / div_factor to lr over ``warmup_fraction`` of the steps and fall to
    lr / div_factor / final_div_factor at the last step; "linear" uses straight lines for both.
    """
    if optim.schedule == "linear":
        total = max(total_steps, 1)
        up = max(int(round(optim.warmup_fraction * total)), 1)
        start, end = optim.lr / optim.div_factor, optim.lr / optim.div_factor / optim.final_div_factor
        return optax.join_schedules(
            [optax.linear_schedule(start, optim.lr, up), optax.linear_schedule(optim.lr, end, max(total - up, 1))], [up])
    if optim.schedule == "onecycle":
        return one_cycle(total_steps, optim.warmup_fraction, optim.lr / optim.div_factor, optim.lr,
                         optim.lr / optim.div_factor / optim.final_div_factor)
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1))
    return optax.constant_schedule(optim.lr)


def one_cycle(total_steps: int, warmup_fraction: float, start: float, peak: float, end: float) -> optax.Schedule:
    """PyTorch's ``OneCycleLR`` curve, step for step: cosine from ``start`` at step 0 to ``peak`` at step
    ``warmup_fraction * total_steps - 1``, then cosine to ``end`` at the last step, ``total_steps - 1``.

    Written out because optax's ``cosine_onecycle_schedule`` reaches the peak and the end one step later.
    Also PyTorch's momentum cycle (``start=end=max_momentum, peak=base_momentum``).
    """
    up, last = float(warmup_fraction * total_steps) - 1.0, float(max(total_steps, 1) - 1)

    def anneal(a, b, pct):  # PyTorch's _annealing_cos: a at pct 0, b at pct 1.
        return b + (a - b) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)

    def schedule(step):
        step = jnp.asarray(step, jnp.result_type(float))  # float32, or float64 where x64 is on (the PyTorch parity test).
        rising = anneal(start, peak, step / up if up > 0 else 1.0)
        falling = anneal(peak, end, (step - up) / (last - up) if last > up else 1.0)
        return jnp.where(step <= up, rising, falling)

    return schedule


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """SGD (PyTorch-style coupled L2 weight decay, optional Nesterov), Adam (L2) or AdamW.

    With ``optim.momentum_range = (base, max)`` (one-cycle SGD), the momentum cycles inversely to the lr from
    ``max`` down to ``base`` at the peak and back, as PyTorch's ``OneCycleLR`` does by default (0.85, 0.95).
    """
    schedule = make_schedule(optim, total_steps)
    if optim.name == "sgd":
        momentum_range = tuple(optim.get("momentum_range", ()))  # Configs saved before the field: none.
        if momentum_range:
            base, top = momentum_range
            momentum = one_cycle(total_steps, optim.warmup_fraction, top, base, top)
            sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=momentum, nesterov=optim.nesterov)
        else:
            sgd = optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov)
        return optax.chain(optax.add_decayed_weights(optim.weight_decay), sgd)
    if optim.name == "adam":
        return optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(schedule))
    if optim.name == "adamw":
        return optax.adamw(schedule, weight_decay=optim.weight_decay)
    raise ValueError(f"unknown optimizer {optim.name!r}")


def init_variables(model, key: jax.Array, image_size: int = 32) -> dict:
    """``{"params", "batch_stats"}`` for a (1, image_size, image_size, 3) input."""
    return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def create_train_state(model, tx, key: jax.Array, image_size: int = 32) -> TrainState:
    """A fresh TrainState: params and batch_stats from ``key``, the augmentation key split off it."""
    init_key, aug_key = jax.random.split(key)
    variables = init_variables(model, init_key, image_size)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        rng=aug_key,
    )


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: XLA propagates the batch sharding through the step (no explicit-sharding types).
    return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


# XLA options for a program that runs once (the initialisation): optimising its random draws cost more than running
# them unoptimised (ResNet18 width 64 on 2 CPU cores: compile 9.4 s + run 0.15 s against 2.3 s + 0.8 s); the values
# are the optimised program's up to float rounding (1 ulp), the same every time.
RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def create_sharded_state(model, tx, seed: int, mesh, image_size: int = 32) -> TrainState:
    """create_train_state compiled (``RUN_ONCE``) with a replicated output, so every host builds the same state."""
    init = jax.jit(
        lambda key: create_train_state(model, tx, key, image_size),
        out_shardings=replicated(mesh),
    )
    key = jax.random.key(seed)
    return init.lower(key).compile(compiler_options=RUN_ONCE)(key)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy (N,) with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, images, labels, mean, std, *, aug, label_smoothing=0.0):
    """One SGD step on a global batch.

    Args:
      state: replicated TrainState.
      images: (B, H, W, 3) uint8, sharded over "data".
      labels: (B,) int32.
      mean, std: (3,) normalisation constants.
      aug: dict of augment_batch keyword arguments.

    Returns:
      (new_state, metrics) with metrics = {"loss_sum", "correct", "count"} scalars
      summed over the batch (so per-epoch means are exact).
    """
    key = jax.random.fold_in(state.rng, state.step)  # Augmentation depends only on (seed, step).
    x = augment_batch(key, images, mean, std, **aug)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        losses = cross_entropy(logits, labels, logits.shape[-1], label_smoothing)
        return losses.mean(), (logits, updates["batch_stats"], losses)

    (_, (logits, batch_stats, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        "loss_sum": losses.sum(),
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": jnp.asarray(labels.shape[0]),
    }
    return state, metrics


def eval_step(state: TrainState, images, labels, mask, mean, std, *, flip=False, translate=0):
    """Evaluates a (padded) batch with running BatchNorm statistics.

    Args:
      images: (B, H, W, 3) uint8; labels: (B,) int32; mask: (B,) bool, False on padding.
      flip, translate: test-time augmentation, as in ``models.eval_logits``.

    Returns:
      {"logits": (B, classes) float32, "loss": (B,) float32 (0 on padding)}.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = eval_logits(state.apply_fn, variables, normalize(images, mean, std), flip, translate)
    loss = cross_entropy(logits, labels, logits.shape[-1]) * mask
    return {"logits": logits, "loss": loss}


def make_train_step(mesh, *, aug: dict, label_smoothing: float = 0.0, steps_per_dispatch: int = 1):
    """Compiles train_step for ``mesh``: ``step(state, images, labels, mean, std) -> (state, metrics)``.

    With ``steps_per_dispatch`` = K > 1, images/labels carry a leading axis of K
    batches and one call runs K steps with ``lax.scan`` (fewer host round trips);
    metrics are then summed over the K steps.
    """
    single = functools.partial(train_step, aug=aug, label_smoothing=label_smoothing)
    repl, data = replicated(mesh), batch_sharded(mesh)
    if steps_per_dispatch == 1:
        fn, batch_spec = single, data
    else:

        def fn(state, images, labels, mean, std):
            def body(s, batch):
                return single(s, batch[0], batch[1], mean, std)

            state, metrics = jax.lax.scan(body, state, (images, labels))
            return state, jax.tree.map(lambda m: m.sum(0), metrics)

        batch_spec = NamedSharding(mesh, P(None, "data"))
    return jax.jit(
        fn,
        in_shardings=(repl, batch_spec, batch_spec, repl, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),  # The old state's buffers are reused for the new one.
    )


def replicate(mesh, array: np.ndarray) -> jax.Array:
    """A host array copied whole onto every device of ``mesh`` (every host passes the same array)."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def make_device_train_chunk(mesh, *, aug: dict, label_smoothing: float = 0.0, batch_size: int):
    """Compiles train steps whose batches are gathered ON the device from a device-resident dataset.

    ``chunk(state, images, labels, order, first, steps, mean, std) -> (state, metrics)`` with
    images (N, H, W, 3) uint8 and labels (N,) replicated on every device (``replicate``),
    order (N,) int32 the epoch's permutation (``epoch_order``), first the index of the
    chunk's first batch in the epoch and steps (int32) how many batches it trains. Step i
    trains on ``order[(first+i)*B : (first+i+1)*B]``, exactly the batch the host loop would
    feed, and the same ``train_step``; metrics are summed on the device, so the host reads
    them once per chunk. ``steps`` is an argument, not a constant, so one compiled program
    serves every chunk length (the tail of an epoch included); ``steps=0`` returns the state
    unchanged.
    """
    single = functools.partial(train_step, aug=aug, label_smoothing=label_smoothing)
    data = batch_sharded(mesh)

    def chunk(state, images, labels, order, first, steps, mean, std):
        def body(i, carry):
            state, sums = carry
            idx = jax.lax.dynamic_slice(order, ((first + i) * batch_size,), (batch_size,))
            idx = jax.lax.with_sharding_constraint(idx, data)  # Each device gathers only its rows.
            state, metrics = single(state, images[idx], labels[idx], mean, std)
            return state, jax.tree.map(jnp.add, sums, metrics)

        zeros = {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}
        return jax.lax.fori_loop(0, steps, body, (state, zeros))

    repl = replicated(mesh)
    return jax.jit(chunk, in_shardings=(repl,) * 8, out_shardings=(repl, repl), donate_argnums=(0,))


def device_multiple(rows: int) -> int:
    """``rows`` rounded up to a multiple of the device count (a batch every device gets an equal share of)."""
    devices = jax.device_count()
    return -(-rows // devices) * devices


def pad_batch(images: np.ndarray, labels: np.ndarray, rows: int):
    """Pads (M, ...) images and (M,) labels to ``rows`` >= M with copies of the first; returns (x, y, mask (rows,) bool)."""
    pad = rows - len(labels)
    x = np.concatenate([images, np.repeat(images[:1], pad, 0)]) if pad else images
    y = np.concatenate([labels, np.repeat(labels[:1], pad, 0)]) if pad else labels
    return x, y, np.arange(rows) < len(labels)


def put_eval_set(mesh, images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Uploads a whole evaluation split once: ((nb, B, H, W, 3) images, (nb, B) labels, (nb, B) mask), sharded over B.

    B is ``batch_size`` rounded up to a multiple of the device count; the last batch is
    padded with copies of the first image, which the mask excludes.
    """
    b = device_multiple(batch_size)
    nb = -(-len(labels) // b)
    x, y, mask = pad_batch(images, labels, nb * b)
    x, y, mask = x.reshape(nb, b, *images.shape[1:]), y.reshape(nb, b), mask.reshape(nb, b)
    sharding = NamedSharding(mesh, P(None, "data"))
    put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return put(x), put(y), put(mask)


def make_device_evaluate(mesh, *, flip: bool = False, translate: int = 0):
    """Compiles a whole-split evaluation: ``fn(state, xs, ys, masks, mean, std) -> {"predictions", "loss_sum"}``.

    Inputs from ``put_eval_set``; one dispatch runs every batch (``lax.map``) and returns
    (nb, B) predicted classes (padding included, drop it on the host) and the summed loss.
    """
    repl, data = replicated(mesh), NamedSharding(mesh, P(None, "data"))

    def run(state, xs, ys, masks, mean, std):
        out = jax.lax.map(lambda b: eval_step(state, b[0], b[1], b[2], mean, std, flip=flip, translate=translate),
                           (xs, ys, masks))
        return {"predictions": jnp.argmax(out["logits"], -1), "loss_sum": out["loss"].sum()}

    return jax.jit(run, in_shardings=(repl, data, data, data, repl, repl), out_shardings=repl)


def make_eval_step(mesh, *, flip: bool = False, translate: int = 0):
    """Compiles eval_step for ``mesh``; outputs are gathered (replicated) so every host can read them."""
    repl, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        functools.partial(eval_step, flip=flip, translate=translate),
        in_shardings=(repl, data, data, data, repl, repl),
        out_shardings=repl,
    )


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def local_rows(global_rows: int) -> slice:
    """This process's share of a global batch of ``global_rows`` rows (all of it on one host)."""
    procs, pid = jax.process_count(), jax.process_index()
    return slice(pid * global_rows // procs, (pid + 1) * global_rows // procs)


def evaluate(eval_step, state, images, labels, mesh, batch_size: int, mean, std) -> dict:
    """Test loss, accuracy and (M,) predictions over a whole split, padding the last batch.

    Args:
      eval_step: from ``make_eval_step(mesh, flip=..., translate=...)``.
      images: (M, H, W, 3) uint8 and labels (M,) int32, the same full arrays on every process.
      batch_size: rounded up to a multiple of the device count.

    Returns:
      {"loss": mean cross-entropy, "accuracy": float, "predictions": (M,) int}.
    """
    batch = device_multiple(batch_size)
    m = len(labels)
    predictions, loss_sum = [], 0.0
    for start in range(0, m, batch):
        valid = len(labels[start : start + batch])
        x, y, mask = pad_batch(images[start : start + batch], labels[start : start + batch], batch)  # the mask zeroes padding's loss
        rows = local_rows(batch)
        gx, gy = global_batch(mesh, x[rows], y[rows], batch)
        gmask = jax.make_array_from_process_local_data(batch_sharded(mesh), mask[rows], (batch,))
        out = jax.device_get(eval_step(state, gx, gy, gmask, mean, std))
        predictions.append(np.argmax(out["logits"][:valid], -1))
        loss_sum += float(np.sum(out["loss"][:valid], dtype=np.float64))
    predictions = np.concatenate(predictions)
    return {"loss": loss_sum / m, "accuracy": float(np.mean(predictions == labels)), "predictions": predictions}


def global_batch(mesh, local_images: np.ndarray, local_labels: np.ndarray, global_rows: int, leading=()):
    """Builds global arrays from this process's rows of the batch (its 1/process_count share)."""
    spec = P(*([None] * len(leading)), "data")
    sharding = NamedSharding(mesh, spec)
    images = jax.make_array_from_process_local_data(sharding, local_images, (*leading, global_rows, *local_images.shape[len(leading) + 1 :]))
    labels = jax.make_array_from_process_local_data(sharding, local_labels, (*leading, global_rows))
    return images, labels
