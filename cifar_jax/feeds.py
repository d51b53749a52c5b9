"""How batches reach the devices during training, and how the test set is evaluated.

``HostFeed`` (the CPU default) gathers each dispatch's batches on the host and sends them;
``DeviceFeed`` (GPU/TPU default) uploads the uint8 training set once and gathers, augments and
trains K steps per dispatch on the device. Both run exactly the batches of
``train_lib.epoch_order(seed, epoch)`` in order, so the data order and resume do not depend
on the loop. ``host_evaluator`` / ``device_evaluator`` return ``state -> {"loss", "accuracy",
"predictions"}`` on the test set.
"""

from __future__ import annotations

import jax
import numpy as np

from cifar_jax import train_lib


class HostFeed:
    """Gathers each dispatch's batches on the host and sends them (the CPU default: no upload, no scan)."""

    def __init__(self, mesh, dataset, batch_size: int, steps: int, aug: dict, label_smoothing: float):
        self.mesh, self.dataset, self.batch = mesh, dataset, batch_size
        self.rows = train_lib.local_rows(batch_size)
        self.steps = {steps: train_lib.make_train_step(mesh, aug=aug, label_smoothing=label_smoothing, steps_per_dispatch=steps)}
        if steps != 1:  # The tail of an epoch that K does not divide runs one step at a time.
            self.steps[1] = train_lib.make_train_step(mesh, aug=aug, label_smoothing=label_smoothing)

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
    """Keeps the uint8 training set on the devices; each dispatch gathers, augments and trains K steps there."""

    def __init__(self, mesh, dataset, batch_size: int, steps: int, aug: dict, label_smoothing: float):
        self.mesh = mesh
        self.images = train_lib.replicate(mesh, dataset.train_images)  # Uploaded once for the whole run.
        self.labels = train_lib.replicate(mesh, dataset.train_labels)
        make = lambda k: train_lib.make_device_train_chunk(mesh, aug=aug, label_smoothing=label_smoothing, steps=k,
                                                           batch_size=batch_size)
        self.steps = {k: make(k) for k in {steps, 1}}

    def start_epoch(self, order: np.ndarray) -> None:
        self.order = train_lib.replicate(self.mesh, order.astype(np.int32))  # 4 bytes an image, once an epoch.

    def dispatch(self, state, first: int, steps: int, mean, std):
        return self.steps[steps](state, self.images, self.labels, self.order, np.int32(first), mean, std)


def host_evaluator(mesh, dataset, config, mean, std):
    """Test-set evaluation batch by batch from the host (the CPU default)."""

    step = train_lib.make_eval_step(mesh, flip=config.eval_flip, translate=config.eval_translate)
    return lambda state: train_lib.evaluate(step, state, dataset.test_images, dataset.test_labels, mesh,
                                            config.eval_batch_size, mean, std)


def device_evaluator(mesh, dataset, config, mean, std):
    """Test-set evaluation in one dispatch, the test set uploaded once."""

    xs, ys, masks = train_lib.put_eval_set(mesh, dataset.test_images, dataset.test_labels, config.eval_batch_size)
    run = train_lib.make_device_evaluate(mesh, flip=config.eval_flip, translate=config.eval_translate)
    labels = dataset.test_labels

    def evaluate(state):
        out = jax.device_get(run(state, xs, ys, masks, mean, std))
        predictions = out["predictions"].reshape(-1)[: len(labels)]
        return {"loss": float(out["loss_sum"]) / len(labels), "accuracy": float(np.mean(predictions == labels)),
                "predictions": predictions}

    return evaluate
