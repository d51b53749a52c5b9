"""Model registry and the one eval-mode predictor every consumer uses.

``FAMILIES`` lists the model families (constructors by name, how a config's ``model`` block becomes their
arguments, their CAM layers and parameter groups); ``get_model(name, **kwargs)`` returns a Flax module;
``build_model(config, num_classes)`` the module a config's ``model`` block describes; ``eval_logits`` applies it in eval mode,
optionally averaging over test-time views: the mirrored images (``config.eval_flip``) and images
shifted by a few pixels (``config.eval_translate``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.resnet import CAM_LAYERS, INITS, NORMS, PARAM_GROUPS, STAGES, BasicBlock, Bottleneck, ResNet, ResNet10, ResNet18, ResNet34, ResNet50

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its constructors by name, how a config's ``model`` block becomes their keyword arguments,
    and the module names the explanations use (CAM split points; parameter groups from output to input)."""

    constructors: dict[str, Callable[..., nn.Module]]
    config_kwargs: Callable[..., dict]  # (model config block, num_classes, conv_general_dilated or None) -> kwargs
    cam_layers: tuple[str, ...]
    param_groups: tuple[str, ...]


def resnet_kwargs(m, num_classes: int, conv_general_dilated=None) -> dict:
    """ResNet keyword arguments from a config's ``model`` block (width, dtype, norm_dtype, norm_backward,
    zero_init_residual, init); fields missing from configs saved before they existed take the value those runs used."""
    norm_dtype = m.get("norm_dtype", "same")
    return dict(width=m.width, num_classes=num_classes, dtype=DTYPES[m.dtype],
                norm_dtype=None if norm_dtype == "same" else DTYPES[norm_dtype],
                norm_backward=m.get("norm_backward", "autodiff"), zero_init_residual=m.zero_init_residual,
                weight_init=m.get("init", "he"), conv_general_dilated=conv_general_dilated)


# Every model family; a new one is its module, a kwargs function and one entry here (docs/training.md).
FAMILIES = (
    Family({"resnet10": ResNet10, "resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50}, resnet_kwargs,
           CAM_LAYERS, PARAM_GROUPS),
)
MODELS = {name: ctor for family in FAMILIES for name, ctor in family.constructors.items()}


def family_of(name: str) -> Family:
    """The registered family of model ``name`` (case-insensitive); ValueError for an unknown name."""
    key = name.lower()
    for family in FAMILIES:
        if key in family.constructors:
            return family
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a registered model by (case-insensitive) name, e.g. ``get_model("resnet18", width=16)``."""
    return family_of(name).constructors[name.lower()](**kwargs)


def build_model(config, num_classes: int, conv: str | None = None) -> nn.Module:
    """The module a run config's ``model`` block describes: its family's ``config_kwargs`` plus the convolution
    kernels ``model.conv`` picks.

    ``conv`` overrides ``config.model.conv`` ("auto", "xla", "onednn"); trained-model inference passes
    "xla", since CAM methods vmap the model, which the oneDNN kernels only run one element at a time.
    Raises ``ConfigError`` when "onednn" is asked for and cannot run here.
    """
    m = config.model
    choice = conv or m.get("conv", "auto")  # Configs saved before model.conv existed: auto.
    kernel = None
    if choice != "xla":
        from cifar_jax import onednn

        kernel = onednn.conv_for(choice, m.dtype)
    family = family_of(m.name)
    return family.constructors[m.name.lower()](**family.config_kwargs(m, num_classes, kernel))


def eval_logits(apply_fn, variables, images, flip: bool = False, translate: int = 0):
    """Eval-mode logits: (N, H, W, 3) normalised images -> (N, classes) float32.

    ``apply_fn`` is a module's ``apply``. Test-time augmentation: with ``flip`` the logits of the
    image and its left-right mirror are averaged; with ``translate`` = t > 0, airbench's
    "mirror + translate": half those logits plus a quarter each of the same for the image shifted
    t pixels up-left and down-right (reflect padding). Training's evaluation, the trained-model
    predictor, reports, explanations and faithfulness metrics all call this.
    """

    def views(x):
        logits = apply_fn(variables, x, train=False).astype(jnp.float32)
        if flip:
            logits = 0.5 * (logits + apply_fn(variables, x[:, :, ::-1], train=False).astype(jnp.float32))
        return logits

    logits = views(images)
    if translate:
        t, (h, w) = translate, images.shape[1:3]
        padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")
        shifted = 0.5 * (views(padded[:, :h, :w]) + views(padded[:, 2 * t:, 2 * t:]))
        logits = 0.5 * (logits + shifted)
    return logits


@dataclasses.dataclass(frozen=True)
class EvalLogits:
    """``eval_logits`` as a hashable callable ``(variables, images) -> logits``.

    Equal for equal modules, so a ``jax.tree_util.Partial(EvalLogits(model.apply), variables)``
    passed to jitted functions reuses their compiled code.
    """

    apply_fn: Callable
    flip: bool = False
    translate: int = 0

    def __call__(self, variables, images):
        return eval_logits(self.apply_fn, variables, images, self.flip, self.translate)


__all__ = [
    "CAM_LAYERS", "DTYPES", "FAMILIES", "INITS", "MODELS", "NORMS", "PARAM_GROUPS", "STAGES", "Family", "BasicBlock", "Bottleneck", "ResNet", "ResNet10", "ResNet18", "ResNet34",
    "ResNet50", "EvalLogits", "build_model", "eval_logits", "family_of", "get_model", "resnet_kwargs",
]
