import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import cam
from cifar_jax.models import get_model


@pytest.fixture(scope="module")
def tiny():
    model = get_model("resnet10", width=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    return model, variables, images


def test_gradcam_at_layer4_is_the_class_activation_map(tiny):
    """GAP + dense head: d logit_c / dA_k = W[k, c] / (h w), so Grad-CAM = ReLU(W[:, c] . A) / (h w) exactly."""
    model, variables, images = tiny
    cams = cam.compute_cams(model, variables, images, targets=3)
    acts = model.apply(variables, images, end="layer4")
    w = variables["params"]["head"]["kernel"][:, 3]
    zhou = jax.nn.relu(jnp.einsum("nhwk,k->nhw", acts, w)) / (acts.shape[1] * acts.shape[2])
    np.testing.assert_allclose(cams.raw, zhou, rtol=1e-5, atol=1e-7)
    assert float(zhou.max()) > 0  # not a vacuous all-zero comparison


def test_activation_gradient_matches_finite_differences(tiny):
    model, variables, images = tiny
    targets = jnp.array([0, 1, 2, 3])
    acts, grads, _ = cam.activations_and_grads(model, variables, images, targets, layer="layer3")
    _, head = cam.split_model(model, variables, "layer3")
    eps = 1e-2
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, i, j, k = (int(rng.integers(s)) for s in acts.shape)
        bump = jnp.zeros_like(acts).at[n, i, j, k].set(eps)
        up, down = head(acts + bump)[n, targets[n]], head(acts - bump)[n, targets[n]]
        np.testing.assert_allclose((up - down) / (2 * eps), grads[n, i, j, k], rtol=0.05, atol=2e-4)


@pytest.mark.parametrize("method", list(cam.METHODS))
def test_every_method_shapes_and_ranges(tiny, method):
    model, variables, images = tiny
    cams = cam.compute_cams(model, variables, images, method=method, batch_size=64)
    assert cams.raw.shape == (4, 4, 4) and cams.maps.shape == (4, 32, 32)
    assert float(cams.raw.min()) >= 0
    assert float(cams.maps.min()) == pytest.approx(0.0, abs=1e-6)
    # Each map's maximum is 1 up to the scaling's EPS (as pytorch-grad-cam's): range / (range + EPS).
    spans = np.ptp(np.asarray(jax.image.resize(cams.raw, (4, 32, 32), "linear")), axis=(1, 2))
    np.testing.assert_allclose(np.asarray(cams.maps).max(axis=(1, 2)), spans / (spans + cam.ops.EPS), rtol=1e-5)


@pytest.mark.parametrize("layer,size", [("layer1", 32), ("layer2", 16), ("layer3", 8)])
def test_any_stage_can_be_explained(tiny, layer, size):
    model, variables, images = tiny
    cams = cam.compute_cams(model, variables, images, layer=layer)
    assert cams.raw.shape == (4, size, size) and cams.maps.shape == (4, 32, 32)


def test_batch_equals_one_image_at_a_time(tiny):
    model, variables, images = tiny
    batch = cam.compute_cams(model, variables, images, method="gradcam++")
    for i in range(4):
        single = cam.compute_cams(model, variables, images[i : i + 1], method="gradcam++")
        np.testing.assert_allclose(single.maps[0], batch.maps[i], rtol=1e-4, atol=1e-5)
        assert int(single.targets[0]) == int(batch.targets[i])


def test_target_selection(tiny):
    model, variables, images = tiny
    logits = model.apply(variables, images)
    default = cam.compute_cams(model, variables, images)
    np.testing.assert_array_equal(default.targets, jnp.argmax(logits, -1))
    every = cam.compute_cams(model, variables, images, targets="all")
    assert every.maps.shape == (4, 10, 32, 32) and every.targets.shape == (4, 10)
    for c in (0, 7):
        one = cam.compute_cams(model, variables, images, targets=c)
        np.testing.assert_allclose(every.maps[:, c], one.maps, rtol=1e-4, atol=1e-5)
    assert not np.allclose(every.raw[:, 0], every.raw[:, 7])
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam.compute_cams(model, variables, images, method="magic")
    with pytest.raises(ValueError, match="unknown layer"):
        cam.compute_cams(model, variables, images, layer="pool")


def toy_context(images=None):
    """Channel 0 fires top-left and raises the target; channel 1 fires bottom-right and lowers it."""
    a = np.zeros((1, 4, 4, 2), np.float32)
    a[0, :2, :2, 0] = 2.0
    a[0, 2:, 2:, 1] = 1.0
    g = np.zeros_like(a)
    g[..., 0], g[..., 1] = 0.5, -0.5
    x = jnp.ones((1, 8, 8, 3)) if images is None else images
    top_left = jnp.zeros((8, 8)).at[:4, :4].set(1.0)

    def head(imgs):  # Score-CAM passes images: class 0 sees the top-left quadrant, class 1 the rest.
        s = jnp.sum(imgs.mean(-1) * top_left, axis=(1, 2))
        return jnp.stack([s, -s], axis=-1)

    return cam.LayerContext(jnp.asarray(a), jnp.asarray(g), jnp.array([0]), head, x, 16)


@pytest.mark.parametrize("method", list(cam.METHODS))
def test_each_method_finds_the_evidence_in_a_toy_case(method):
    weighted = cam.METHODS[method](toy_context())
    raw = cam.first_principal_component(weighted) if method == "eigencam" else weighted.sum(-1)
    raw = np.asarray(jax.nn.relu(raw))[0]
    assert raw[:2, :2].min() > 0, method
    assert raw[:2, :2].min() > raw[2:, 2:].max(), method


def test_upsampling_is_half_pixel_bilinear_then_scaled():
    raw = jnp.array([[[0.0, 1.0], [2.0, 3.0]]])
    maps = cam.upsample_and_scale(raw, (4, 4))
    np.testing.assert_allclose(maps[0, 0], np.array([0.0, 0.25, 0.75, 1.0]) / 3, atol=1e-6)
    assert float(maps.max()) == pytest.approx(1.0)


def test_guided_relu_passes_only_positive_gradients_through_positive_inputs():
    x = jnp.array([-1.0, 2.0, 3.0])
    grad = jax.grad(lambda v: jnp.sum(cam.guided_relu(v) * jnp.array([1.0, -1.0, 2.0])))(x)
    np.testing.assert_array_equal(grad, [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(cam.guided_relu(x), jax.nn.relu(x))


def test_guided_grad_cam(tiny):
    model, variables, images = tiny
    guided = cam.guided_backprop(model, variables, images, 2)
    plain = jax.grad(lambda x: model.apply(variables, x)[:, 2].sum())(images)
    assert guided.shape == images.shape and not np.allclose(guided, plain)
    ggc = cam.guided_grad_cam(model, variables, images, 2)
    maps = cam.compute_cams(model, variables, images, 2).maps
    np.testing.assert_allclose(ggc, guided * maps[..., None], rtol=1e-5, atol=1e-7)
    shown = cam.deprocess_gradients(guided)
    assert float(shown.min()) >= 0 and float(shown.max()) <= 1


def test_aug_smooth_averages_with_the_mirrored_map(tiny):
    model, variables, images = tiny
    targets = jnp.array([1, 2, 3, 4])
    plain = cam.compute_cams(model, variables, images, targets)
    mirrored = cam.compute_cams(model, variables, images[:, :, ::-1], targets)
    smooth = cam.compute_cams(model, variables, images, targets, aug_smooth=True)
    np.testing.assert_allclose(smooth.raw, 0.5 * (plain.raw + mirrored.raw[..., ::-1]), rtol=1e-5, atol=1e-7)
    assert float(smooth.maps.max()) == pytest.approx(1.0, abs=1e-5)


def test_eigen_smooth_changes_the_map_but_not_its_range(tiny):
    model, variables, images = tiny
    plain = cam.compute_cams(model, variables, images)
    smooth = cam.compute_cams(model, variables, images, eigen_smooth=True)
    assert smooth.maps.shape == plain.maps.shape and not np.allclose(smooth.maps, plain.maps)
    assert float(smooth.maps.min()) >= 0 and float(smooth.maps.max()) <= 1 + 1e-6


def test_the_registry_is_the_one_list_of_methods():
    """Every method is one REGISTRY entry; the views, labels and the explain CLI's --help all come from it."""
    from tests.conftest import run_module

    assert list(cam.REGISTRY) == list(cam.ALL_METHODS) and set(cam.LABELS) == set(cam.REGISTRY)
    for name, m in cam.REGISTRY.items():
        assert m.name == name and m.label and m.kind in ("cam", "fullgrad", "guided", "pixel")
        assert (m.weigh is not None) == (m.kind == "cam" or name == "guided-gradcam")
        assert (m.attribute is not None) == (m.kind == "pixel")
        assert cam.canonical_method(m.label) == name  # the label is a valid spelling too
    assert set(cam.METHODS) <= set(cam.CAM_METHODS) and "scorecam" in cam.METHODS
    help_text = " ".join(run_module("cifar_jax.explain", "--help").stdout.split())
    assert all(name in help_text for name in cam.ALL_METHODS)
