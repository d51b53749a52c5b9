"""Grad-CAM and attributions for any Flax model (interception), checked against hand-written splits."""

import functools
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import cam
from cifar_jax.models import CAM_LAYERS, get_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet():
    model = get_model("resnet10", width=4)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    return model, variables, images


def gradcam_from(acts, grads):
    """Grad-CAM written out: ReLU(sum_k mean(G_k) A_k) -> (N, h, w)."""
    return jax.nn.relu(jnp.sum(grads.mean(axis=(1, 2), keepdims=True) * acts, -1))


# --------------------------------------------------------------------------- our ResNet: interception == stage split


@pytest.mark.parametrize("layer", CAM_LAYERS)
def test_interception_matches_the_stage_split(resnet, layer):
    model, variables, images = resnet
    targets = jnp.array([3, 7])
    acts, grads, logits = cam.activations_and_grads(model, variables, images, targets, layer)
    features, head = cam.split_model(model, variables, layer)
    ref_acts = features(images)
    ref_grads = jax.grad(lambda a: jnp.take_along_axis(head(a), targets[:, None], 1).sum())(ref_acts)
    np.testing.assert_allclose(acts, ref_acts, atol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-6)
    np.testing.assert_allclose(logits, model.apply(variables, images), atol=1e-6)
    assert float(jnp.abs(ref_grads).max()) > 0


def test_old_methods_equal_the_split_implementation(resnet):
    """Every method of today's METHODS, computed from a start/end split as before, equals compute_cams."""
    model, variables, images = resnet
    layer = "layer3"
    targets = jnp.array([1, 5])
    features, head = cam.split_model(model, variables, layer)
    acts = features(images)
    grads = jax.grad(lambda a: jnp.take_along_axis(head(a), targets[:, None], 1).sum())(acts)
    full = lambda x: model.apply(variables, x)
    for method, weigh in cam.METHODS.items():
        ctx = cam.LayerContext(acts, grads, targets, full if method == "scorecam" else head, images, 16)
        weighted = weigh(ctx)
        ref = jax.nn.relu(cam.first_principal_component(weighted) if method == "eigencam" else weighted.sum(-1))
        got = cam.compute_cams(model, variables, images, targets, method=method, layer=layer, batch_size=16)
        np.testing.assert_allclose(got.raw, ref, rtol=1e-5, atol=1e-5 * float(ref.max()), err_msg=method)


def test_layers_inside_blocks_are_reachable(resnet):
    model, variables, images = resnet
    # ResNet10 has one block per stage, so layer3/block0 is layer3.
    whole = cam.compute_cams(model, variables, images, 2, layer="layer3")
    block = cam.compute_cams(model, variables, images, 2, layer="layer3/block0")
    np.testing.assert_allclose(block.raw, whole.raw, rtol=1e-5, atol=1e-7)
    # layer3/block0/conv2: its output (as flax's capture_intermediates records it) and a finite-difference gradient.
    conv2 = "layer3/block0/conv2"
    acts, grads, _ = cam.activations_and_grads(model, variables, images, jnp.array([2, 2]), conv2)
    _, inter = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    np.testing.assert_allclose(acts, inter["intermediates"]["layer3"]["block0"]["conv2"]["__call__"][0], atol=1e-6)
    apply_fn = functools.partial(model.apply, train=False)
    score = lambda d: model_score(apply_fn, variables, images, conv2, d)
    rng = np.random.default_rng(0)
    for _ in range(3):
        idx = tuple(int(rng.integers(s)) for s in acts.shape)
        bump = jnp.zeros_like(acts).at[idx].set(1e-2)
        np.testing.assert_allclose((score(bump) - score(-bump)) / 2e-2, grads[idx], rtol=0.05, atol=2e-4)
    assert cam.compute_cams(model, variables, images, layer=conv2, method="layercam").raw.shape == (2, 8, 8)


def model_score(apply_fn, variables, images, layer, delta):
    out, _ = cam.run_with_layer(apply_fn, variables, images, layer, delta=delta)
    return out[:, 2].sum()


def test_list_layers(resnet):
    model, variables, images = resnet
    rows = dict(cam.list_layers(model, variables, images))
    assert rows["layer3/block0/conv2"] == (2, 8, 8, 16)
    assert rows["layer4"] == (2, 4, 4, 32) and rows["head"] == (2, 10)
    assert "layer3/block0/conv2" in cam.format_layers(cam.list_layers(model, variables, images))


def test_unknown_layer_is_a_one_line_error_with_close_matches(resnet):
    model, variables, images = resnet
    with pytest.raises(ValueError, match="unknown layer") as err:
        cam.compute_cams(model, variables, images, layer="layer3/block0/conv3")
    assert "\n" not in str(err.value) and "layer3/block0/conv2" in str(err.value)
    fn = cam.make_cam_fn(model, variables, layer="layer5")
    with pytest.raises(ValueError, match="close matches: .*layer4"):
        fn(images)
    with pytest.raises(ValueError, match="no module matches"):
        cam.compute_cams(model, variables, images, layer=lambda mdl: False)


def test_layer_predicate_and_method_spellings(resnet):
    model, variables, images = resnet
    by_path = cam.compute_cams(model, variables, images, 1, layer="layer2")
    by_pred = cam.compute_cams(model, variables, images, 1, layer=lambda mdl: cam.module_path(mdl) == "layer2")
    np.testing.assert_array_equal(by_path.raw, by_pred.raw)
    assert cam.canonical_method("guided_grad_cam") == cam.canonical_method("guided-gradcam") == "guided-gradcam"
    assert cam.canonical_method("Grad-CAM++") == "gradcam++" and cam.canonical_method("gradcam_elementwise") == "gradcam-elementwise"
    with pytest.raises(ValueError, match="unknown CAM method 'gradcm'.*gradcam"):
        cam.canonical_method("gradcm")


# --------------------------------------------------------------------------- other models


class SmallCNN(nn.Module):
    """What a user writes: compact, no start/end arguments."""

    classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        x = nn.Conv(8, (3, 3), strides=2, name="conv2")(x)
        return nn.Dense(self.classes, name="head")(nn.relu(x).mean(axis=(1, 2)))


def test_user_cnn_matches_a_hand_written_split():
    model = SmallCNN()
    images = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    variables = model.init(jax.random.key(0), images)
    p = variables["params"]
    a = nn.Conv(8, (3, 3), strides=2).apply({"params": p["conv2"]}, nn.relu(nn.Conv(6, (3, 3)).apply({"params": p["conv1"]}, images)))
    head = lambda a: nn.Dense(5).apply({"params": p["head"]}, nn.relu(a).mean(axis=(1, 2)))
    grads = jax.grad(lambda a: head(a)[:, 4].sum())(a)
    cams = cam.make_cam_fn(model, variables, layer="conv2", target=4)(images)
    np.testing.assert_allclose(cams.raw, gradcam_from(a, grads), rtol=1e-5, atol=1e-6)
    assert cams.maps.shape == (3, 16, 16) and float(cams.raw.max()) > 0


# flax's examples/imagenet/models.py ResNet, as written there (a list-valued field: the module is unhashable).
ModuleDef = Any


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class FlaxExampleResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


# As the example defines ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], ...); one block per stage here, for speed.
ExampleResNet10 = functools.partial(FlaxExampleResNet, stage_sizes=[1, 1, 1, 1], block_cls=ResNetBlock)


def test_flax_example_partial_resnet():
    model = ExampleResNet10(num_classes=6, num_filters=4)
    with pytest.raises(TypeError):
        hash(model)  # why an lru_cache keyed on the module could not take it
    images = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    # GAP + dense head: Grad-CAM at the last block is the class activation map ReLU(A . W[:, c]) / (h w).
    _, inter = model.apply(variables, images, train=False, capture_intermediates=True, mutable=["intermediates"])
    acts = inter["intermediates"]["ResNetBlock_3"]["__call__"][0]
    zhou = jax.nn.relu(jnp.einsum("nhwk,k->nhw", acts, variables["params"]["Dense_0"]["kernel"][:, 3])) / 4
    for _ in range(2):  # the second call reuses the compiled function (identity-keyed cache)
        cams = cam.compute_cams(model, variables, images, 3, layer="ResNetBlock_3")
        np.testing.assert_allclose(cams.raw, zhou, rtol=1e-5, atol=1e-7)
    fn = cam.make_cam_fn(functools.partial(model.apply, train=False), variables, layer="ResNetBlock_3", target=3)
    np.testing.assert_allclose(fn(images).raw, zhou, rtol=1e-5, atol=1e-7)
    assert cam.guided_backprop(model, variables, images, 3).shape == images.shape


class Block(nn.Module):
    dim: int

    def setup(self):
        self.ln1 = nn.LayerNorm()
        self.attn = nn.MultiHeadDotProductAttention(num_heads=2)
        self.ln2 = nn.LayerNorm()
        self.mlp1 = nn.Dense(2 * self.dim)
        self.mlp2 = nn.Dense(self.dim)

    def __call__(self, t):
        return self.rest(t, self.ln1(t))

    def rest(self, t, a):
        t = t + self.attn(a)
        return t + self.mlp2(nn.gelu(self.mlp1(self.ln2(t))))


class TinyViT(nn.Module):
    dim: int = 8
    classes: int = 5

    def setup(self):
        self.embed = nn.Conv(self.dim, (4, 4), strides=4, padding="VALID")
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        self.pos = self.param("pos", nn.initializers.normal(0.02), (1, 17, self.dim))
        self.blocks = [Block(self.dim) for _ in range(2)]
        self.norm = nn.LayerNorm()
        self.head = nn.Dense(self.classes)

    def tokens(self, x):
        t = self.embed(x).reshape(x.shape[0], -1, self.dim)
        return jnp.concatenate([jnp.broadcast_to(self.cls, (x.shape[0], 1, self.dim)), t], axis=1) + self.pos

    def classify(self, t):
        return self.head(self.norm(t[:, 0]))

    def __call__(self, x):
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.classify(t)


def test_tiny_vit_with_reshape_transform_matches_a_hand_written_split():
    model = TinyViT()
    images = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    split = jax.jit(nn.apply(lambda m, x: (lambda t: (t, m.blocks[1].ln1(t)))(m.blocks[0](m.tokens(x))), model))
    t, a = split(variables, images)
    head = lambda a: nn.apply(lambda m, t, a: m.classify(m.blocks[1].rest(t, a)), model)(variables, t, a)
    grads = jax.jit(jax.grad(lambda a: head(a)[:, 1].sum()))(a)
    to_grid = cam.vit_reshape_transform(4, 4)
    fn = cam.make_cam_fn(model, variables, layer="blocks_1/ln1", target=1, reshape_transform=to_grid)
    cams = fn(images)
    np.testing.assert_allclose(cams.raw, gradcam_from(to_grid(a), to_grid(grads)), rtol=1e-5, atol=1e-6)
    assert cams.maps.shape == (2, 16, 16) and float(cams.raw.max()) > 0
    with pytest.raises(ValueError, match="reshape_transform"):
        cam.make_cam_fn(model, variables, layer="blocks_1/ln1")(images)


# --------------------------------------------------------------------------- targets, attributions, batching


def test_callable_targets(resnet):
    model, variables, images = resnet
    features, head = cam.split_model(model, variables, "layer4")
    acts = features(images)
    grads = jax.grad(lambda a: jax.nn.softmax(head(a))[:, 6].sum())(acts)
    soft = cam.make_cam_fn(model, variables, layer="layer4", target=cam.softmax_output(6))(images)
    np.testing.assert_allclose(soft.raw, gradcam_from(acts, grads), rtol=1e-5, atol=1e-8)
    assert soft.targets.tolist() == [-1, -1]
    by_index = cam.compute_cams(model, variables, images, jnp.array([6, 2]))
    by_callable = cam.compute_cams(model, variables, images, cam.classifier_output(jnp.array([6, 2])))
    np.testing.assert_allclose(by_callable.raw, by_index.raw, rtol=1e-6)
    regression = cam.make_cam_fn(model, variables, layer="layer4", target=lambda out: out.sum(-1))(images)
    assert regression.raw.shape == (2, 4, 4)


def test_integrated_gradients_completeness(resnet):
    model, variables, images = resnet
    ig = cam.integrated_gradients(model, variables, images, jnp.array([0, 9]), steps=128, batch_size=64)
    f = model.apply(variables, images)[jnp.arange(2), jnp.array([0, 9])]
    f0 = model.apply(variables, jnp.zeros_like(images))[jnp.arange(2), jnp.array([0, 9])]
    np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), f - f0, rtol=0.01, atol=1e-3 * float(jnp.abs(f - f0).max()))


def test_smoothgrad_and_occlusion(resnet):
    model, variables, images = resnet
    grads_fn = lambda x: cam.gradients(model, variables, x, 4)
    np.testing.assert_allclose(cam.smooth_grad(grads_fn, images, jax.random.key(0), samples=2, noise=0.0), grads_fn(images), rtol=1e-5, atol=1e-8)
    sg = cam.smooth_grad(grads_fn, images, jax.random.key(0), samples=3)
    assert sg.shape == images.shape and not np.allclose(sg, grads_fn(images))
    occ = cam.occlusion(model, variables, images, 4, window=8, stride=8)
    # Windows tile the image: each pixel's value is the score drop of the one window covering it.
    x = images.at[:, :8, 8:16].set(0.0)
    drop = model.apply(variables, images)[:, 4] - model.apply(variables, x)[:, 4]
    np.testing.assert_allclose(occ[:, 3, 10], drop, rtol=1e-4, atol=1e-6)


BATCHED = [*cam.CAM_METHODS, "fullgrad", "gradients", "input-x-gradient", "integrated-gradients", "occlusion", "guided-backprop"]


@pytest.mark.parametrize("method", BATCHED)
def test_every_method_is_batched_and_jittable(resnet, method):
    model, variables, images = resnet
    targets = jnp.array([3, 8])
    kwargs = {"integrated-gradients": dict(steps=4), "occlusion": dict(window=16, stride=16)}.get(method, {})
    run = lambda x, t: cam.saliency_maps(method, model, variables, x, t, layer="layer3", **kwargs)
    batch = jax.jit(run)(images, targets)
    for i in range(2):
        np.testing.assert_allclose(run(images[i : i + 1], targets[i : i + 1])[0], batch[i], rtol=1e-5, atol=1e-5, err_msg=method)


def test_fullgrad_written_out():
    """FullGrad of SmallCNN (two convs with biases): scaled |x dx| per channel + scaled |b dconv| of each conv, summed."""
    model = SmallCNN()
    images = jax.random.normal(jax.random.key(6), (2, 16, 16, 3))
    variables = model.init(jax.random.key(0), images)
    targets = jnp.array([0, 3])
    total = cam.minmax_scale(jnp.abs(images * cam.gradients(model, variables, images, targets)), axes=(1, 2)).sum(-1)
    for conv in ("conv1", "conv2"):
        _, g, _ = cam.activations_and_grads(model, variables, images, targets, conv)
        term = cam.minmax_scale(jnp.abs(variables["params"][conv]["bias"] * g), axes=(1, 2)).sum(-1)
        total = total + jax.image.resize(term, (2, 16, 16), "linear")
    cams = cam.compute_cams(model, variables, images, targets, method="fullgrad")
    np.testing.assert_allclose(cams.raw, total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cam.full_grad(model, variables, images, targets), cam.minmax_scale(total), atol=1e-5)


# --------------------------------------------------------------------------- pytorch-grad-cam parity


def test_parity_with_pytorch_grad_cam():
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cam_throughput import import_pytorch_grad_cam

    gc = import_pytorch_grad_cam()
    if gc is None:
        pytest.skip("pytorch_grad_cam not importable")
    import torch
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from _torch_resnet import ResNet18, load_flax_variables

    model = get_model("resnet18", width=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # Non-trivial BatchNorm statistics and biases, so FullGrad's bias terms matter.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda v: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), v.dtype), variables)
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
    # A 100x head: gradients of order 0.1, where Grad-CAM++'s eps (theirs 1e-6, ours 1e-7) no longer matters.
    variables["params"]["head"]["kernel"] = 100 * variables["params"]["head"]["kernel"]
    images = np.asarray(jax.random.normal(jax.random.key(5), (2, 32, 32, 3)))
    twin = ResNet18(4, 10).eval()
    load_flax_variables(twin, variables)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    targets = [3, 7]
    theirs_of = {"gradcam": gc.GradCAM, "gradcam++": gc.GradCAMPlusPlus, "xgradcam": gc.XGradCAM, "hirescam": gc.HiResCAM,
                 "layercam": gc.LayerCAM, "gradcam-elementwise": gc.GradCAMElementWise, "ablationcam": gc.AblationCAM}
    for method, cls in theirs_of.items():
        theirs = cls(model=twin, target_layers=[twin.layer4.block1])(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        ours = cam.compute_cams(model, variables, images, jnp.array(targets), method=method, layer="layer4/block1")
        same_post = scale_cam_image(scale_cam_image(np.asarray(ours.raw), (32, 32)))  # theirs: scale, resize, scale
        np.testing.assert_allclose(same_post, theirs, atol=2e-4, err_msg=method)
    theirs = gc.FullGrad(model=twin, target_layers=[])(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    ours = cam.compute_cams(model, variables, images, jnp.array(targets), method="fullgrad")
    np.testing.assert_allclose(ours.maps, theirs, atol=2e-4)


# --------------------------------------------------------------------------- docs/cam.md


def test_docs_snippets_run():
    text = (ROOT / "docs" / "cam.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:  # one namespace, in order, as a reader would paste them
        exec(compile(block, "docs/cam.md", "exec"), namespace)


def test_over_flat_batch_is_a_vmap(resnet):
    model, variables, images = resnet
    apply = lambda x: model.apply(variables, x)
    versions = jnp.stack([images, -images, 0.5 * images])  # (3, N, H, W, C)
    np.testing.assert_allclose(cam.over_flat_batch(apply, versions), jax.vmap(apply)(versions), rtol=1e-5, atol=1e-5)


def test_integrated_gradients_do_not_depend_on_the_pass_size(resnet):
    """Path points go through the network in passes of batch_size // N (the last one padded with zero weights)."""
    model, variables, images = resnet
    targets = jnp.array([3, 7])
    whole = cam.integrated_gradients(model, variables, images, targets, steps=8, batch_size=18)  # 9 points, one pass
    for batch_size in (2, 8):  # 1 and 4 points a pass: 9 passes, 3 passes with 3 padded points
        np.testing.assert_allclose(cam.integrated_gradients(model, variables, images, targets, steps=8, batch_size=batch_size),
                                   whole, rtol=1e-4, atol=1e-6 * float(jnp.abs(whole).max()))
