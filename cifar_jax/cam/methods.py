"""CAM weightings: one small function per method from a ``LayerContext`` to weighted activations (N, h, w, K).

The shared base sums the result over K (or takes its first principal component),
applies ReLU, upsamples and scales. References are in ``docs/cam.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import jax
import jax.numpy as jnp

from cifar_jax.cam.attribution import gradients, input_x_gradient, integrated_gradients, occlusion, smooth_gradients
from cifar_jax.cam.ops import EPS, LayerContext, chunked_map, class_probability, minmax_scale


def grad_cam(ctx: LayerContext):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the gradients."""
    weights = ctx.grads.mean(axis=(1, 2), keepdims=True)
    return weights * ctx.activations


def grad_cam_plus_plus(ctx: LayerContext):
    """Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the closed-form alphas."""
    g, a = ctx.grads, ctx.activations
    g2, g3 = g**2, g**3
    sum_a = a.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
    alpha = jnp.where(g != 0, alpha, 0.0)
    weights = jnp.sum(jax.nn.relu(g) * alpha, axis=(1, 2), keepdims=True)
    return weights * a


def xgrad_cam(ctx: LayerContext):
    """XGrad-CAM (Fu et al. 2020): weights = sum(G * A) / sum(A) per channel."""
    a = ctx.activations
    weights = jnp.sum(ctx.grads * a, axis=(1, 2), keepdims=True) / (a.sum(axis=(1, 2), keepdims=True) + EPS)
    return weights * a


def hires_cam(ctx: LayerContext):
    """HiResCAM (Draelos & Carin 2020): element-wise G * A, faithful to the model's own computation."""
    return ctx.grads * ctx.activations


def grad_cam_elementwise(ctx: LayerContext):
    """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise): ReLU(G * A) before the channel sum."""
    return jax.nn.relu(ctx.grads * ctx.activations)


def layer_cam(ctx: LayerContext):
    """LayerCAM (Jiang et al. 2021): element-wise ReLU(G) * A."""
    return jax.nn.relu(ctx.grads) * ctx.activations


def eigen_cam(ctx: LayerContext):
    """EigenCAM (Muhammad & Yeasin 2020): the activations themselves; the base takes their first principal component."""
    return ctx.activations


def eigen_grad_cam(ctx: LayerContext):
    """EigenGrad-CAM (pytorch-grad-cam): G * A; the base takes its first principal component."""
    return ctx.grads * ctx.activations


def score_cam(ctx: LayerContext):
    """Score-CAM (Wang et al. 2020): channel weight = target probability of the image masked by that channel.

    Each channel map is upsampled to the input, scaled to [0, 1] and multiplied
    into the image; the K masked copies of every image run through the model in
    chunks of ``batch_size``, no gradients needed.
    """
    a = ctx.activations
    n, h, w, k = a.shape
    size = ctx.images.shape[1:3]
    masks = minmax_scale(jax.image.resize(a, (n, *size, k), "linear"), axes=(1, 2))  # (N, H, W, K)
    masks = jnp.moveaxis(masks, -1, 1)  # (N, K, H, W)
    masked = (ctx.images[:, None] * masks[..., None]).reshape(n * k, *ctx.images.shape[1:])  # (N K, H, W, C)
    score = ctx.score or class_probability
    rows = (masked, jnp.repeat(ctx.targets, k))
    weights = chunked_map(lambda b: score(ctx.head(b[0]), b[1]), rows, ctx.batch_size).reshape(n, k)
    return weights[:, None, None, :] * a


def ablation_cam(ctx: LayerContext):
    """Ablation-CAM (Desai & Ramaswamy 2020): weight_k = (score - score with channel k ablated) / score.

    As pytorch-grad-cam's AblationLayer: the channel is set to 0, or to min - 1e7
    where the image's activations go below 0; the min is taken per image.
    """

    def ablate(raw, k):  # raw (N, ..., K); channel k replaced in every position
        lo = raw.min(axis=tuple(range(1, raw.ndim)), keepdims=True)
        value = jnp.where(lo == 0, 0.0, lo - 1e7).astype(raw.dtype)
        return jnp.where(jnp.arange(raw.shape[-1]) == k, value, raw)

    ablated = ctx.channel_scores(ablate)  # (N, K)
    original = ctx.scores[:, None]
    weights = (original - ablated) / original
    return weights[:, None, None, :] * ctx.activations


@dataclasses.dataclass(frozen=True)
class Method:
    """One explanation method: the one place that knows its name, label and how it is computed.

    kind: "cam" weighs one layer's activations with ``weigh`` (``LayerContext`` -> (N, h, w, K)); "fullgrad" uses
    every bias; "guided" is guided backpropagation, times the CAM of ``weigh`` when it is set; "pixel" is an input
    attribution ``attribute(model, variables, images, targets, **kwargs)`` -> (N, H, W, C).
    """

    name: str  # canonical spelling, as the CLIs take it
    label: str  # for titles, tables and captions
    kind: str
    weigh: Callable[[LayerContext], jax.Array] | None = None
    attribute: Callable | None = None
    default: bool = False  # among the default CAMs (faithfulness tables, explain's gallery)
    principal_component: bool = False  # the map is the first principal component whatever eigen_smooth says
    random: bool = False  # draws noise: takes a PRNG ``key``


# Every method, in display order. Adding one: its function above (or in attribution.py) and one line here.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("gradcam", "Grad-CAM", "cam", grad_cam, default=True),
    Method("gradcam++", "Grad-CAM++", "cam", grad_cam_plus_plus, default=True),
    Method("xgradcam", "XGrad-CAM", "cam", xgrad_cam, default=True),
    Method("hirescam", "HiResCAM", "cam", hires_cam, default=True),
    Method("layercam", "LayerCAM", "cam", layer_cam, default=True),
    Method("scorecam", "Score-CAM", "cam", score_cam, default=True),
    Method("eigencam", "EigenCAM", "cam", eigen_cam, default=True, principal_component=True),
    Method("ablationcam", "Ablation-CAM", "cam", ablation_cam),
    Method("eigengradcam", "EigenGrad-CAM", "cam", eigen_grad_cam, principal_component=True),
    Method("gradcam-elementwise", "Grad-CAM element-wise", "cam", grad_cam_elementwise),
    Method("fullgrad", "FullGrad", "fullgrad"),
    Method("gradients", "Gradients", "pixel", attribute=gradients),
    Method("input-x-gradient", "Input x gradient", "pixel", attribute=input_x_gradient),
    Method("integrated-gradients", "Integrated Gradients", "pixel", attribute=integrated_gradients),
    Method("smoothgrad", "SmoothGrad", "pixel", attribute=smooth_gradients, random=True),
    Method("occlusion", "Occlusion", "pixel", attribute=occlusion),
    Method("guided-backprop", "Guided backprop", "guided"),
    Method("guided-gradcam", "Guided Grad-CAM", "guided", grad_cam),
)}
# Views of the registry by kind.
METHODS = {n: m.weigh for n, m in REGISTRY.items() if m.default}  # the default CAMs
CAM_METHODS = {n: m.weigh for n, m in REGISTRY.items() if m.kind == "cam"}  # every layer CAM
ALWAYS_EIGEN = tuple(n for n, m in REGISTRY.items() if m.principal_component)
ATTRIBUTION_METHODS = tuple(n for n, m in REGISTRY.items() if m.kind != "cam")  # FullGrad, pixel and guided methods
ALL_METHODS = tuple(REGISTRY)
LABELS = {n: m.label for n, m in REGISTRY.items()}


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


_ALIASES = {_squash(m): m for m in ALL_METHODS} | {"gradcamplusplus": "gradcam++", "inputxgradient": "input-x-gradient",
                                                   "ig": "integrated-gradients", "vanillagradients": "gradients",
                                                   "saliency": "gradients", "gradcamelementwise": "gradcam-elementwise"}


def canonical_method(name: str, allowed=ALL_METHODS) -> str:
    """The registered spelling of a method name: 'Grad-CAM++' -> 'gradcam++', 'guided_grad_cam' -> 'guided-gradcam'.

    Raises ValueError ("unknown CAM method ...") naming close matches among ``allowed``.
    """
    found = _ALIASES.get(_squash(str(name)))
    if found is None or found not in allowed:
        close = difflib.get_close_matches(str(name), list(allowed), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown CAM method {name!r}{hint}; choose one of {', '.join(allowed)}")
    return found
