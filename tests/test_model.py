import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax.models import CAM_LAYERS, MODELS, PARAM_GROUPS, STAGES, build_model, family_of, get_model
from cifar_jax.models.resnet import PAD_3x3


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_resnet18_width64_has_the_original_parameter_count():
    model = get_model("resnet18")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert count(shapes["params"]) == 11_173_962


def test_architecture_is_the_cifar_variant():
    model = get_model("resnet18", width=8, num_classes=7)
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert v["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 8)  # 3x3 stem, no 7x7
    shapes = {s: jax.eval_shape(lambda v: model.apply(v, x, end=s), v).shape for s in STAGES}
    assert shapes == {
        "stem": (2, 32, 32, 8),  # stride 1, no max-pool
        "layer1": (2, 32, 32, 8),
        "layer2": (2, 16, 16, 16),
        "layer3": (2, 8, 8, 32),
        "layer4": (2, 4, 4, 64),
        "pool": (2, 64),
    }
    assert jax.eval_shape(lambda v: model.apply(v, x), v).shape == (2, 7)


@pytest.mark.parametrize("name,blocks", [("resnet34", 16), ("resnet50", 16)])
def test_deeper_models_build(name, blocks):
    model = get_model(name, width=4)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    n_blocks = sum(len(v["params"][f"layer{k}"]) for k in range(1, 5))
    assert n_blocks == blocks
    expansion = 4 if name == "resnet50" else 1
    assert v["params"]["head"]["kernel"].shape == (32 * expansion, 10)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        get_model("resnet19")


@pytest.fixture(scope="module")
def tiny():
    model = get_model("resnet18", width=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # Non-trivial running statistics, so eval mode really uses them.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda s: s + 0.1 * jnp.arange(s.size).reshape(s.shape) / s.size, variables["batch_stats"]),
    }
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    return model, variables, x


@pytest.mark.parametrize("stage", STAGES)
def test_split_at_any_stage_composes_to_the_full_model(tiny, stage):
    model, variables, x = tiny
    full = model.apply(variables, x)
    acts = model.apply(variables, x, end=stage)
    composed = model.apply(variables, acts, start=stage)
    np.testing.assert_array_equal(np.asarray(composed), np.asarray(full))


def test_start_after_end_is_rejected(tiny):
    model, variables, x = tiny
    with pytest.raises(ValueError, match="comes after"):
        model.apply(variables, x, start="layer3", end="layer2")


def conv2d_pytorch(x, w, stride, pad):
    """Reference NCHW-free conv with PyTorch semantics: zero-pad ``pad`` on every side, then stride."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw, _, cout = w.shape
    oh = (x.shape[0] - kh) // stride + 1
    ow = (x.shape[1] - kw) // stride + 1
    out = np.zeros((oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[i, j] = np.tensordot(patch, w, axes=3)
    return out


def test_strided_conv_pads_like_pytorch():
    import flax.linen as nn

    conv = nn.Conv(5, (3, 3), 2, padding=PAD_3x3, use_bias=False)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    v = conv.init(jax.random.key(0), x)
    ours = np.asarray(conv.apply(v, x))[0]
    ref = conv2d_pytorch(x[0], np.asarray(v["params"]["kernel"]), stride=2, pad=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    same = nn.Conv(5, (3, 3), 2, padding="SAME", use_bias=False).apply(v, x)
    assert not np.allclose(np.asarray(same)[0], ref, atol=1e-3)  # XLA's SAME would be a different function


def test_batchnorm_matches_pytorch_conventions(tiny):
    model, variables, x = tiny
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stem = model.apply(variables, x, end="stem")  # just to check eval mode runs
    assert stem.shape == (3, 32, 32, 4)
    # Running mean moves 10% of the way to the batch mean (PyTorch momentum 0.1).
    pre_bn = jax.lax.conv_general_dilated(
        x, variables["params"]["stem_conv"]["kernel"], (1, 1), PAD_3x3, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = 0.9 * variables["batch_stats"]["stem_bn"]["mean"] + 0.1 * pre_bn.mean((0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"], expected, rtol=1e-5, atol=1e-6)
    # Eval mode normalises with running stats and PyTorch's epsilon 1e-5.
    stats = variables["batch_stats"]["stem_bn"]
    p = variables["params"]["stem_bn"]
    manual = jax.nn.relu((pre_bn - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * p["scale"] + p["bias"])
    np.testing.assert_allclose(stem, manual, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = get_model("resnet18", width=4, dtype=jnp.bfloat16)
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
    assert model.apply(v, jnp.ones((2, 32, 32, 3))).dtype == jnp.float32
    assert model.apply(v, jnp.ones((2, 32, 32, 3)), end="layer4").dtype == jnp.bfloat16


def test_float32_batchnorm_around_bfloat16_convs():
    """norm_dtype=float32: same parameters, BatchNorm outputs float32, logits within bfloat16 rounding of "same"."""
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    same = get_model("resnet18", width=4, dtype=jnp.bfloat16)
    wide = get_model("resnet18", width=4, dtype=jnp.bfloat16, norm_dtype=jnp.float32)
    v = same.init(jax.random.key(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(wide.init(jax.random.key(0), x))
    assert same.apply(v, x, end="layer2").dtype == jnp.bfloat16
    assert wide.apply(v, x, end="layer2").dtype == jnp.float32
    a, b = same.apply(v, x), wide.apply(v, x)
    full = get_model("resnet18", width=4).apply(v, x)
    assert not np.array_equal(a, b)  # BatchNorm really ran in another precision
    np.testing.assert_allclose(b, full, atol=0.05 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_closed_form_batchnorm_equals_flax(dtype, tol):
    """batchnorm.BatchNorm: nn.BatchNorm's variables, forward and statistics exactly; its gradients within rounding."""
    import flax.linen as nn

    from cifar_jax.models.batchnorm import BatchNorm

    x = (3.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) + 2.0).astype(dtype)
    w = jax.random.normal(jax.random.key(1), x.shape)
    params = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1.0, 1.0, 6)}

    def run(module):
        stats = module.init(jax.random.key(0), x, use_running_average=True)["batch_stats"]

        def loss(params, x):
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, use_running_average=False,
                                      mutable=["batch_stats"])
            return (jnp.sin(y.astype(jnp.float32)) * w).sum(), (y, updates["batch_stats"])

        (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        evaluated = module.apply({"params": params, "batch_stats": new_stats}, x, use_running_average=True)
        return y, new_stats, evaluated, grads

    ref = run(nn.BatchNorm(momentum=0.9, dtype=dtype))
    new = run(BatchNorm(momentum=0.9, dtype=dtype))
    for a, b in zip(jax.tree.leaves(ref[:3]), jax.tree.leaves(new[:3])):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for a, b in zip(jax.tree.leaves(ref[3]), jax.tree.leaves(new[3])):  # d/dscale, d/dbias, d/dx
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a).max() > 0.1  # A gradient that could be wrong.
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * np.abs(a).max())


def test_closed_form_batchnorm_in_a_resnet_train_step():
    """model.norm_backward=closed_form: the same variables, loss and batch statistics; gradients within 1e-4."""
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    auto = get_model("resnet18", width=4)
    closed = get_model("resnet18", width=4, norm_backward="closed_form")
    v = auto.init(jax.random.key(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(closed.init(jax.random.key(0), x))

    def step(model):
        def loss(params):
            logits, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), upd
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

    (la, sa), ga = step(auto)
    (lc, sc), gc = step(closed)
    np.testing.assert_allclose(lc, la, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sc)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    flat_a, flat_c = jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gc)
    for (path, a), b in zip(flat_a, flat_c):
        scale = float(jnp.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * max(scale, 1e-3), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_from_a_config_and_its_family_names_its_modules(name):
    """build_model reads the config through the family's kwargs; the family's CAM layers and parameter groups
    (the randomisation's order) are the model's own top-level modules."""
    from cifar_jax.config import base_config

    config = base_config()
    config.model.name, config.model.width = name, 4
    model = build_model(config, 7, conv="xla")
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert params["head"]["kernel"].shape[-1] == 7
    family = family_of(name.upper())
    tops = {key.split("_")[0] for key in params}  # stem_conv, stem_bn -> stem
    assert set(family.param_groups) == tops and family.param_groups[0] == "head"
    assert set(family.cam_layers) < tops
    assert (CAM_LAYERS, PARAM_GROUPS) == (family.cam_layers, family.param_groups)  # The ResNets' own.


def _weights(init: str, width: int = 32) -> dict:
    from flax.traverse_util import flatten_dict

    model = get_model("resnet18", width=width, weight_init=init)
    params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    return {"/".join(path): np.asarray(v) for path, v in flatten_dict(params).items()}


def test_init_schemes_draw_pytorch_s_default_or_torchvision_s_he():
    """"pytorch": U(+-1/sqrt(fan_in)) for every conv and the head, its bias too; "he": He-normal fan_out convs (2.45x
    PyTorch's std for a 3x3 conv of equal widths), zero head bias. (tests/test_torch_parity.py: against torch itself.)"""
    pt, he = _weights("pytorch"), _weights("he")
    for name, w in pt.items():
        if name.endswith("kernel"):
            fan_in = int(np.prod(w.shape[:-1]))
            assert 0.9 / np.sqrt(fan_in) < np.abs(w).max() <= (1 + 1e-6) / np.sqrt(fan_in), name
            if w.size >= 4096:
                assert w.std() == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.05), name
    assert 0 < np.abs(pt["head/bias"]).max() <= 1 / np.sqrt(256)
    w = he["layer2/block1/conv1/kernel"]  # (3, 3, 64, 64)
    assert w.std() == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.03)
    assert w.std() / pt["layer2/block1/conv1/kernel"].std() == pytest.approx(np.sqrt(6), rel=0.05)
    assert np.all(he["head/bias"] == 0)
    with pytest.raises(ValueError, match="unknown weight_init 'xavier'"):
        get_model("resnet10", width=4, weight_init="xavier").init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
