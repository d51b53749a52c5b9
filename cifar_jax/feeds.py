"""How batches reach the devices during training, and how the test set is evaluated.

``HostFeed`` (the CPU default) gathers each dispatch's batches on the host and sends them;
``DeviceFeed`` (GPU/TPU default) uploads the uint8 training set once and gathers, augments and
trains K steps per dispatch on the device. Both run exactly the batches of
``train_lib.epoch_order(seed, epoch)`` in order, so the data order and resume do not depend
on the loop. ``host_evaluator`` / ``device_evaluator`` return ``state -> {"loss", "accuracy",
"predictions"}`` on the test set.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cifar_jax import train_lib


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


class HostFeed:
    """Gathers each dispatch's batches on the host and sends them (the CPU default: no upload, no scan)."""

    def __init__(self, mesh, dataset, batch_size: int, steps: int, aug: dict, label_smoothing: float):
        self.mesh, self.dataset, self.batch, self.k = mesh, dataset, batch_size, steps
        self.rows = train_lib.local_rows(batch_size)
        self.steps = {steps: train_lib.make_train_step(mesh, aug=aug, label_smoothing=label_smoothing, steps_per_dispatch=steps)}
        if steps != 1:  # The tail of an epoch that K does not divide runs one step at a time.
            self.steps[1] = train_lib.make_train_step(mesh, aug=aug, label_smoothing=label_smoothing)

    def compile(self, state, mean, std) -> None:
        """Compiles every step program now (ahead of time), so epoch times hold only training."""
        image_shape = self.dataset.train_images.shape[1:]
        for k, fn in self.steps.items():
            lead = () if k == 1 else (k,)
            sharding = train_lib.batch_sharded(self.mesh) if k == 1 else NamedSharding(self.mesh, P(None, "data"))
            images = _abstract((*lead, self.batch, *image_shape), np.uint8, sharding)
            labels = _abstract((*lead, self.batch), np.int32, sharding)
            self.steps[k] = fn.lower(state, images, labels, mean, std).compile()

    def steps_for(self, remaining: int) -> int:
        """Batches the next dispatch runs when ``remaining`` are left in the epoch: K, or 1 at a time for the tail."""
        return self.k if remaining >= self.k else 1

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = order

    def dispatch(self, state, first: int, steps: int, mean, std):
        """Runs batches first..first+steps-1 of the epoch; returns (state, summed metrics on the device)."""
        idx = self.order[first * self.batch : (first + steps) * self.batch].reshape(steps, self.batch)[:, self.rows]
        images, labels = self.dataset.train_images[idx], self.dataset.train_labels[idx]
        if steps == 1:
            images, labels = train_lib.global_batch(self.mesh, images[0], labels[0], self.batch)
        else:
            images, labels = train_lib.global_batch(self.mesh, images, labels, self.batch, leading=(steps,))
        return self.steps[steps](state, images, labels, mean, std)


class DeviceFeed:
    """Keeps the uint8 training set on the devices; each dispatch gathers, augments and trains up to K steps there."""

    def __init__(self, mesh, dataset, batch_size: int, steps: int, aug: dict, label_smoothing: float):
        self.mesh, self.k = mesh, steps
        self.images = train_lib.replicate(mesh, dataset.train_images)  # Uploaded once for the whole run.
        self.labels = train_lib.replicate(mesh, dataset.train_labels)
        # One program for every chunk length: the step count is an argument (train_lib.make_device_train_chunk).
        self.chunk = train_lib.make_device_train_chunk(mesh, aug=aug, label_smoothing=label_smoothing, batch_size=batch_size)

    def compile(self, state, mean, std) -> None:
        """Compiles the chunk program now (ahead of time), so epoch times hold only training."""
        order = _abstract(self.labels.shape, np.int32, train_lib.replicated(self.mesh))
        self.chunk = self.chunk.lower(state, self.images, self.labels, order, np.int32(0), np.int32(0), mean, std).compile()

    def steps_for(self, remaining: int) -> int:
        """Batches the next dispatch runs when ``remaining`` are left in the epoch: K, or the whole tail."""
        return min(self.k, remaining)

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = train_lib.replicate(self.mesh, order.astype(np.int32))  # 4 bytes an image, once an epoch.

    def dispatch(self, state, first: int, steps: int, mean, std):
        return self.chunk(state, self.images, self.labels, self.order, np.int32(first), np.int32(steps), mean, std)


class HostEvaluator:
    """Test-set evaluation batch by batch from the host (the CPU default): ``evaluator(state) -> {"loss", "accuracy",
    "predictions"}``."""

    def __init__(self, mesh, dataset, config, mean, std, *, flip: bool, translate: int):
        self.mesh, self.dataset, self.config, self.mean, self.std = mesh, dataset, config, mean, std
        self.batch = train_lib.device_multiple(config.eval_batch_size)
        self.step = train_lib.make_eval_step(mesh, flip=flip, translate=translate)

    def with_views(self, flip: bool, translate: int) -> "HostEvaluator":
        """The same evaluation with other test-time views."""
        return HostEvaluator(self.mesh, self.dataset, self.config, self.mean, self.std, flip=flip, translate=translate)

    def compile(self, state) -> None:
        """Compiles the evaluation step now (ahead of time)."""
        sharding = train_lib.batch_sharded(self.mesh)
        images = _abstract((self.batch, *self.dataset.test_images.shape[1:]), np.uint8, sharding)
        self.step = self.step.lower(state, images, _abstract((self.batch,), np.int32, sharding),
                                    _abstract((self.batch,), np.bool_, sharding), self.mean, self.std).compile()

    def __call__(self, state) -> dict:
        return train_lib.evaluate(self.step, state, self.dataset.test_images, self.dataset.test_labels, self.mesh,
                                  self.batch, self.mean, self.std)


class DeviceEvaluator:
    """Test-set evaluation in one dispatch, the test set uploaded once (the accelerator default)."""

    def __init__(self, mesh, dataset, config, mean, std, *, flip: bool, translate: int):
        self.mesh, self.mean, self.std, self.labels = mesh, mean, std, dataset.test_labels
        self.xs, self.ys, self.masks = train_lib.put_eval_set(mesh, dataset.test_images, dataset.test_labels,
                                                              config.eval_batch_size)
        self.run = train_lib.make_device_evaluate(mesh, flip=flip, translate=translate)

    def with_views(self, flip: bool, translate: int) -> "DeviceEvaluator":
        """The same evaluation with other test-time views, sharing the uploaded test set."""
        other = copy.copy(self)
        other.run = train_lib.make_device_evaluate(self.mesh, flip=flip, translate=translate)
        return other

    def compile(self, state) -> None:
        """Compiles the evaluation program now (ahead of time)."""
        self.run = self.run.lower(state, self.xs, self.ys, self.masks, self.mean, self.std).compile()

    def __call__(self, state) -> dict:
        out = jax.device_get(self.run(state, self.xs, self.ys, self.masks, self.mean, self.std))
        predictions = out["predictions"].reshape(-1)[: len(self.labels)]
        return {"loss": float(out["loss_sum"]) / len(self.labels), "accuracy": float(np.mean(predictions == self.labels)),
                "predictions": predictions}


def host_evaluator(mesh, dataset, config, mean, std) -> HostEvaluator:
    """The run's test-set evaluator on the host loop, with its test-time views (``eval_flip``, ``eval_translate``)."""
    return HostEvaluator(mesh, dataset, config, mean, std, flip=config.eval_flip, translate=config.eval_translate)


def device_evaluator(mesh, dataset, config, mean, std) -> DeviceEvaluator:
    """The run's test-set evaluator on the device loop, with its test-time views (``eval_flip``, ``eval_translate``)."""
    return DeviceEvaluator(mesh, dataset, config, mean, std, flip=config.eval_flip, translate=config.eval_translate)
