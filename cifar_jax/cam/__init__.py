"""Class activation maps and attributions for any Flax model, done functionally.

    from cifar_jax.cam import make_cam_fn, list_layers
    cam_fn = make_cam_fn(model, variables, layer="layer4", method="gradcam")
    cams = cam_fn(images)   # CAMs(raw (N, h, w), maps (N, H, W) in [0, 1], targets (N,), logits (N, C))

The gradient with respect to any submodule's output is taken through
``flax.linen.intercept_methods`` (see ``cifar_jax.cam.intercept``), so the model
needs no change. Modules:

* ``intercept``   interception, module paths, ``list_layers``
* ``ops``         LayerContext, CAMs, scaling, chunking, PCA, targets, ``vit_reshape_transform``
* ``methods``     one weighting function per CAM method; ``REGISTRY``: every method's name, label and kind
* ``base``        ``make_cam_fn``, ``compute_cams``, ``activations_and_grads``
* ``attribution`` gradients, input x gradient, Integrated Gradients, SmoothGrad, occlusion, FullGrad
* ``guided``      guided backpropagation, Guided Grad-CAM
* ``dispatch``    ``saliency_maps(method, ...)``: any method by name -> (N, H, W) maps
"""

from cifar_jax.cam.attribution import (
    full_grad, gradients, input_x_gradient, integrated_gradients, occlusion, smooth_grad, smooth_gradients,
)
from cifar_jax.cam.base import activations_and_grads, compute_cams, layer_gradients, make_cam_fn, split_model
from cifar_jax.cam.dispatch import pixel_map, saliency_maps
from cifar_jax.cam.guided import deprocess_gradients, guided_backprop, guided_grad_cam, guided_relu
from cifar_jax.cam.intercept import format_layers, list_layers, module_path, run_with_layer
from cifar_jax.cam.methods import (
    ALL_METHODS, ALWAYS_EIGEN, ATTRIBUTION_METHODS, CAM_METHODS, LABELS, METHODS, REGISTRY, Method, ablation_cam,
    canonical_method, eigen_cam,
    eigen_grad_cam, grad_cam, grad_cam_elementwise, grad_cam_plus_plus, hires_cam, layer_cam, score_cam, xgrad_cam,
)
from cifar_jax.cam.ops import (
    CAMs, EPS, LayerContext, chunked_map, classifier_output, first_principal_component, minmax_scale, over_flat_batch,
    softmax_output, upsample_and_scale, vit_reshape_transform,
)

__all__ = [
    "ALL_METHODS", "ALWAYS_EIGEN", "ATTRIBUTION_METHODS", "CAM_METHODS", "CAMs", "EPS", "LABELS",
    "LayerContext", "METHODS", "Method", "REGISTRY",
    "ablation_cam", "activations_and_grads", "canonical_method", "chunked_map", "classifier_output", "compute_cams",
    "deprocess_gradients", "eigen_cam", "eigen_grad_cam", "first_principal_component", "format_layers", "full_grad",
    "grad_cam", "grad_cam_elementwise", "grad_cam_plus_plus", "gradients", "guided_backprop", "guided_grad_cam",
    "guided_relu", "hires_cam", "input_x_gradient", "integrated_gradients", "layer_cam", "layer_gradients", "list_layers",
    "make_cam_fn", "minmax_scale", "module_path", "occlusion", "over_flat_batch", "pixel_map", "run_with_layer", "saliency_maps", "score_cam",
    "smooth_grad", "smooth_gradients", "softmax_output", "split_model", "upsample_and_scale", "vit_reshape_transform", "xgrad_cam",
]
