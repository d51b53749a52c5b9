"""A trained model and what is computed from its predictions: ONE predictor for every consumer.

Training's evaluation, the report, the explain CLI and the faithfulness metrics all go
through ``models.eval_logits`` (with the run's test-time views: ``eval_flip``, ``eval_translate``), so a
report's confusion matrix, its misclassified images and their heat maps describe the
same predictor::

    trained = load_trained("runs/resnet18_cpu")          # best checkpoint
    preds = predict(trained, images_uint8, labels)       # Predictions: logits, losses, ...
    worst = misclassified_by_loss(preds)[:20]            # highest loss first
    expl = explain(trained, images_uint8[worst], preds.predicted[worst])   # Explanation
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from cifar_jax import cam
from cifar_jax import checkpoints as ckpt
from cifar_jax.augment import normalize
from cifar_jax.errors import UserError
from cifar_jax.models import EvalLogits, build_model, eval_logits

METHOD_LABELS = cam.LABELS  # Display names of every method (cam.REGISTRY), keyed by canonical name.


class ExplainError(UserError):
    """An explanation that cannot be computed as asked (unknown method, class or layer)."""

    exit_code = 2


def canonical_method(name: str) -> str:
    """Any spelling of a method (``guided_grad_cam``, ``Grad-CAM++``, ``grad_cam``) -> its name in ``cam.ALL_METHODS``.

    Raises ExplainError (one line, with close matches) for an unknown name.
    """
    try:
        return cam.canonical_method(name)
    except ValueError as e:
        raise ExplainError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained model ready to apply, with what it was trained on."""

    model: Any
    variables: dict  # {"params", "batch_stats"}
    config: ml_collections.ConfigDict
    class_names: tuple[str, ...]
    mean: np.ndarray  # (3,) per-channel mean of the training images in [0, 1]
    std: np.ndarray  # (3,)
    step: int
    history: list
    predictor: Any = None  # The module ``logits`` applies: built with the convolution kernels training evaluated with.

    @property
    def network(self):
        """The module every consumer applies (predictions, maps, metrics): built with the kernels training evaluated with."""
        return self.predictor or self.model

    @property
    def cam_layer(self) -> str:
        """The layer explained when none is named: the last CAM layer of the model's family (layer4 for ResNets)."""
        from cifar_jax.models import family_of

        return family_of(self.config.model.name).cam_layers[-1]

    @property
    def eval_flip(self) -> bool:
        """Whether predictions average the image and its mirror (the run's ``eval_flip``)."""
        return bool(self.config.get("eval_flip", False))

    @property
    def eval_translate(self) -> int:
        """Pixels of the shifted test-time views predictions also average (the run's ``eval_translate``; 0 = none)."""
        return int(self.config.get("eval_translate", 0))

    def describe_views(self) -> str:
        """The test-time views predictions average, in words: "" (the image alone), "image + mirror", ..."""
        views = ["image"] + ["mirror"] * self.eval_flip + [f"{self.eval_translate}-px shifts"] * bool(self.eval_translate)
        return " + ".join(views) if len(views) > 1 else ""

    @functools.cached_property
    def logits_fn(self) -> Partial:
        """THE predictor on (N, H, W, 3) *normalised* images -> (N, C) logits, as a pytree (variables are its leaves).

        The kernels and test-time views of ``logits``; the same object every call, so jitted metrics that take it
        compile once.
        """
        return Partial(EvalLogits(self.network.apply, self.eval_flip, self.eval_translate), self.variables)

    @functools.cached_property
    def _logits_of_uint8(self):
        apply = self.network.apply
        flip, translate, mean, std = self.eval_flip, self.eval_translate, self.mean, self.std
        return jax.jit(lambda variables, x: eval_logits(apply, variables, normalize(x, mean, std), flip, translate))

    def logits(self, images):
        """(N, H, W, 3) uint8 images -> (N, C) float32 logits: THE predictor (with the run's test-time views)."""
        return self._logits_of_uint8(self.variables, images)


def load_trained(workdir, step: int | str = "best") -> TrainedModel:
    """Loads a run's model, variables, config and class names.

    Args:
      workdir: a training workdir.
      step: "best" (highest test accuracy among the intact checkpoints), "latest" (newest intact), or an int step.

    The params and batch_stats are checked against their saved sha256; a damaged checkpoint is passed
    over with a one-line warning (see ``checkpoints.load_intact``). Raises ``CheckpointError`` (one
    line) if there is nothing intact to load.
    """
    if not Path(workdir).is_dir():
        raise ckpt.CheckpointError(f"workdir {str(workdir)!r} does not exist")
    if not ckpt.checkpoint_dir(workdir).is_dir():
        raise ckpt.CheckpointError(f"workdir {str(workdir)!r} has no checkpoints/ (train a model there first)")
    models, predictors = {}, {}

    def restore(s: int, meta: dict) -> dict:
        try:
            config = ml_collections.ConfigDict(meta["config"])
            model = models[s] = build_model(config, len(meta["class_names"]), conv="xla")
            # The predictor uses the kernels training evaluated with (their rounding can flip a close call); a run
            # trained on another backend (a GPU) has none here to match, so it gets this machine's fast ones.
            fast = meta.get("conv") == "onednn" or meta.get("backend", jax.default_backend()) != jax.default_backend()
            predictors[s] = build_model(config, len(meta["class_names"]), conv="auto") if fast else model
            image = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
            abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
        except Exception as e:  # A config this version cannot build a model from (e.g. written by another version).
            why = f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]
            raise ckpt.DamagedCheckpoint(s, f"meta/metadata: its config builds no model here ({why})") from None
        return ckpt.restore_variables(manager, s, abstract)

    manager = ckpt.make_manager(workdir, read_only=True)
    try:
        loaded = ckpt.load_intact(manager, workdir, step, restore, warn=jax.process_index() == 0)
    finally:
        manager.close()
    meta = loaded.meta
    return TrainedModel(
        model=models[loaded.step],
        # Uncommitted (placed on the default device, not pinned to it, like arrays made from numpy): a compiled
        # program keys on its inputs' placement, so re-initialised or computed inputs would compile it again.
        variables=jax.tree.map(lambda a: jax.device_put(np.asarray(a)), loaded.tree),
        config=ml_collections.ConfigDict(meta["config"]),
        class_names=tuple(meta["class_names"]),
        mean=np.asarray(meta["mean"], np.float32),
        std=np.asarray(meta["std"], np.float32),
        step=loaded.step,
        history=meta.get("history", []),
        predictor=predictors[loaded.step],
    )


class Predictions(NamedTuple):
    """The predictor's output on a labelled set."""

    logits: np.ndarray  # (M, C) float32
    labels: np.ndarray  # (M,) int true classes

    @property
    def predicted(self) -> np.ndarray:
        """(M,) predicted classes."""
        return self.logits.argmax(-1)

    @property
    def probabilities(self) -> np.ndarray:
        """(M, C) softmax probabilities."""
        return np.asarray(jax.nn.softmax(self.logits, -1))

    @property
    def losses(self) -> np.ndarray:
        """(M,) cross-entropy of the true class."""
        log_p = np.asarray(jax.nn.log_softmax(self.logits, -1))
        return -log_p[np.arange(len(self.labels)), self.labels]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predicted == self.labels))


def predict(trained: TrainedModel, images, labels, batch_size: int = 1000, progress: bool = False) -> Predictions:
    """Runs THE predictor over (M, H, W, 3) uint8 images in batches; ``labels`` (M,) are kept alongside."""
    from tqdm.auto import tqdm

    starts = range(0, len(images), batch_size)
    logits = [np.asarray(trained.logits(images[s : s + batch_size])) for s in tqdm(starts, desc="predict", disable=None if progress else True, leave=False)]
    return Predictions(np.concatenate(logits), np.asarray(labels))


def misclassified_by_loss(predictions: Predictions) -> np.ndarray:
    """Indices of the misclassified images, highest loss first (ties: lower index first)."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    return wrong[np.argsort(-predictions.losses[wrong], kind="stable")]


class Explanation(NamedTuple):
    """What ``explain`` returns for N images."""

    maps: np.ndarray  # (N, H, W) in [0, 1]: the CAM (Grad-CAM for the guided methods)
    targets: np.ndarray  # (N,) the classes explained
    guided: np.ndarray | None  # (N, H, W, 3) input gradients for the guided methods, else None
    method: str  # canonical name, a key of METHOD_LABELS
    layer: str


def explain(trained: TrainedModel, images, targets=None, *, method="gradcam", layer="layer4",
            aug_smooth=False, eigen_smooth=False, key=None) -> Explanation:
    """Explains (N, H, W, 3) uint8 images at the model's size with any method of ``cam.ALL_METHODS``.

    ``targets``: None (each image's class under THE predictor), an int or an (N,) array.
    ``layer``: any module path (``list_layers``); ``key``: PRNG key of SmoothGrad's noise.
    """
    method = canonical_method(method)
    if targets is None:
        targets = np.asarray(trained.logits(images)).argmax(-1)
    targets = np.broadcast_to(np.asarray(targets, np.int32), (len(images),))
    x = normalize(images, trained.mean, trained.std)
    kind = cam.REGISTRY[method].kind
    if kind == "pixel":  # gradients, Integrated Gradients, occlusion...
        maps = cam.saliency_maps(method, trained.network, trained.variables, x, jnp.asarray(targets), layer=layer, key=key)
        return Explanation(np.asarray(maps), targets, None, method, layer)
    cams = cam.compute_cams(trained.network, trained.variables, x, targets, method="gradcam" if kind == "guided" else method,
                            layer=layer, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    guided = None
    if kind == "guided":
        guided = cam.guided_backprop(trained.network, trained.variables, x, targets)
        if cam.REGISTRY[method].weigh is not None:  # Guided Grad-CAM: guided backprop times the CAM
            guided = guided * cams.maps[..., None]
        guided = np.asarray(guided)
    return Explanation(np.asarray(cams.maps), targets, guided, method, layer)


def list_layers(trained: TrainedModel) -> list[tuple[str, Any]]:
    """[(module path, output shape)] of every module a CAM can explain, for one image (nothing is computed)."""
    size = trained.config.data.image_size
    return cam.list_layers(trained.network, trained.variables, jnp.zeros((1, size, size, 3), jnp.float32))


def check_layer(trained: TrainedModel, layer: str) -> None:
    """Raises ExplainError (one line, with close matches) unless ``layer`` is a module path of the model."""
    from cifar_jax.cam.intercept import unknown_layer_message

    paths = [p for p, _ in list_layers(trained)]
    if layer not in paths:
        raise ExplainError(unknown_layer_message(layer, paths))


def class_index(target: str | int | None, class_names) -> int | None:
    """A class index from a name or a number (as text or int); None stays None. Raises ExplainError."""
    if target is None:
        return None
    text = str(target)
    if text in class_names:
        return list(class_names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise ExplainError(f"unknown class {text!r}; choose a name ({', '.join(class_names)}) or 0..{len(class_names) - 1}")


def load_run_data(trained: TrainedModel, data_path: str | None = None):
    """The ``data.Dataset`` the run was trained on (``data_path`` replaces the recorded path, e.g. on another machine)."""
    from cifar_jax.data import load_dataset

    data_config = ml_collections.ConfigDict(trained.config.data.to_dict())
    if data_path:
        data_config.path = data_path
    return load_dataset(data_config)


def load_test_images(trained: TrainedModel, n: int, data_path: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` class-balanced test images of the run's data (``data.subsample``): (n, H, W, 3) float32,
    normalised as the run normalised them, and their (n,) int32 labels."""
    from cifar_jax.data import subsample

    ds = subsample(load_run_data(trained, data_path), 0, n)
    return jnp.asarray(normalize(ds.test_images, trained.mean, trained.std), jnp.float32), jnp.asarray(ds.test_labels, jnp.int32)
