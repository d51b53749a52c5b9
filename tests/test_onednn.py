"""oneDNN convolutions (cifar_jax.onednn): equal to XLA's convolution and its gradients, used where they can run,
and a clear one-line error where model.conv=onednn cannot."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cifar_jax import onednn
from tests.conftest import ROOT

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")
needs_native_bf16 = pytest.mark.skipif(not onednn.native_bfloat16(), reason="oneDNN finds no native bfloat16 (AVX512-BF16/AMX) here")

# (batch, size, in, out, kernel, stride, padding): every conv of the CIFAR ResNets, plus odd paddings.
GEOMETRIES = [
    (4, 32, 3, 8, 3, 1, ((1, 1), (1, 1))),  # stem: 3 input channels
    (4, 16, 8, 8, 3, 1, ((1, 1), (1, 1))),  # stride 1 (the forward runs as a backward-data call)
    (4, 16, 8, 16, 3, 2, ((1, 1), (1, 1))),  # downsampling 3x3
    (4, 16, 8, 16, 1, 2, ((0, 0), (0, 0))),  # 1x1 projection shortcut
    (2, 9, 4, 4, 3, 1, ((0, 1), (2, 0))),  # asymmetric padding
    (2, 7, 4, 4, 3, 2, ((0, 1), (0, 1))),  # XLA's "SAME" for stride 2
]


def xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (dtype, tolerance as a fraction of the largest reference value): float32 to float rounding; bfloat16 (in and
# out, float32 accumulation inside oneDNN) to a few bfloat16 roundings (one is 2**-8 relative).
DTYPES = [
    pytest.param(jnp.float32, 2e-6, id="float32"),
    pytest.param(jnp.bfloat16, 8e-3, id="bfloat16", marks=needs_native_bf16),
]


@needs_onednn
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "n{}_s{}_{}to{}_k{}_st{}_p{}".format(*g[:6], g[6]))
def test_forward_and_both_gradients_equal_float32_xla(geometry, dtype, tolerance):
    n, size, c, o, k, s, padding = geometry
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, size, size, c)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, c, o)), dtype)
    y, vjp = jax.vjp(lambda a, b: onednn.conv2d(a, b, (s, s), padding), x, w)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731  The reference: XLA in float32 on the same values.
    y_ref, vjp_ref = jax.vjp(lambda a, b: xla_conv(a, b, (s, s), padding), f32(x), f32(w))
    assert y.shape == y_ref.shape
    dy = jnp.asarray(rng.normal(size=y.shape), dtype)
    got_all, want_all = (y, *vjp(dy)), (y_ref, *vjp_ref(f32(dy)))
    assert [g.dtype for g in got_all] == [dtype] * 3
    for got, want in zip(got_all, want_all):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(f32(got), np.asarray(want), rtol=0, atol=tolerance * scale)


@needs_onednn
def test_ffi_call_refuses_mixed_or_unsupported_element_types():
    x, w = jnp.ones((1, 4, 4, 2), jnp.float32), jnp.ones((3, 3, 2, 2), jnp.float32)
    pads = ((1, 1), (1, 1))
    with pytest.raises(Exception, match="operands and result must have one element type"):
        jax.block_until_ready(onednn._call("forward", (1, 4, 4, 2), x, w.astype(jnp.bfloat16), strides=(1, 1), padding=pads))
    with pytest.raises(Exception, match="element type must be float32 or bfloat16"):
        jax.block_until_ready(onednn._call("forward", (1, 4, 4, 2), x.astype(jnp.float16), w.astype(jnp.float16),
                                           strides=(1, 1), padding=pads))


@needs_onednn
def test_native_bfloat16_agrees_with_the_cpu_flags():
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), None)
    if flags is None:
        pytest.skip("no x86 CPU flags in /proc/cpuinfo")
    assert onednn.native_bfloat16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@needs_onednn
def test_drop_in_falls_back_to_xla_for_what_it_does_not_run():
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    w = jnp.ones((3, 3, 4, 4), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    assert onednn.supports(x, w, dimension_numbers=dn)
    assert not onednn.supports(x, w, rhs_dilation=(2, 2), dimension_numbers=dn)
    assert onednn.supports(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dimension_numbers=dn) == onednn.native_bfloat16()
    assert not onednn.supports(x.astype(jnp.bfloat16), w, dimension_numbers=dn)  # mixed types: XLA promotes
    assert not onednn.supports(x.astype(jnp.float16), w.astype(jnp.float16), dimension_numbers=dn)
    grouped = jnp.ones((3, 3, 2, 4), jnp.float32)
    assert not onednn.supports(x, grouped, dimension_numbers=dn, feature_group_count=2)
    # Unsupported cases give XLA's result exactly; "SAME" strings are resolved to pads.
    got = onednn.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn))
    same = onednn.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(same, lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn), atol=1e-5)
    # Under jit the oneDNN call is in the compiled program (not silently XLA's).
    hlo = jax.jit(lambda a, b: onednn.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)).lower(x, w).as_text()
    assert "cifar_jax_onednn_" in hlo


@needs_onednn
def test_resnet_train_step_matches_xla_kernels():
    """One SGD step of a width-4 ResNet18 (BatchNorm, shortcuts, stride 2): same loss, gradients, new batch stats."""
    from cifar_jax.models import get_model

    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8))
    results = []
    for kernel in (None, onednn.conv_general_dilated):
        model = get_model("resnet18", width=4, conv_general_dilated=kernel)
        variables = model.init(jax.random.key(0), images[:1])

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                          train=True, mutable=["batch_stats"])
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
            return loss, updates

        (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
        results.append((loss, grads, updates))
    (loss_x, grads_x, upd_x), (loss_o, grads_o, upd_o) = results
    assert abs(float(loss_x) - float(loss_o)) < 1e-5
    for a, b in zip(jax.tree.leaves((grads_x, upd_x)), jax.tree.leaves((grads_o, upd_o))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)


@needs_native_bf16
def test_resnet_bfloat16_step_on_onednn_tracks_float32_as_closely_as_xla_bfloat16(xla_optimized):
    """A width-8 ResNet18 in bfloat16 on oneDNN: loss and gradients as close to the float32 step as XLA's bfloat16.

    bfloat16 alone moves small gradients a lot (BatchNorm biases: cosine 0.84-0.89 to float32 with XLA's
    kernels), so the reference for "close" is XLA's own bfloat16 step, leaf by leaf.
    """
    from cifar_jax.models import get_model

    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    results = []
    for dtype, kernel in ((jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, onednn.conv_general_dilated)):
        # He's init: the thresholds below were set with it. PyTorch's smaller weights move one leaf more under
        # oneDNN's bfloat16 than under XLA's (layer1.block0.bn2.scale: cosine 0.82 against 0.97).
        model = get_model("resnet18", width=8, dtype=dtype, conv_general_dilated=kernel, weight_init="he")
        variables = model.init(jax.random.key(0), images[:1])

        def loss_fn(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                    train=True, mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

        step = jax.jit(jax.value_and_grad(loss_fn))
        assert ("cifar_jax_onednn_" in step.lower(variables["params"]).as_text()) == (kernel is not None)
        results.append(step(variables["params"]))
    (loss32, grads32), (_, grads_xla16), (loss16, grads16) = results
    assert abs(float(loss16) - float(loss32)) < 0.01 * abs(float(loss32))

    def cosine(a, b):
        a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    ours, xla = [], []
    for (path, g32), g_xla, g16 in zip(jax.tree_util.tree_leaves_with_path(grads32), jax.tree.leaves(grads_xla16),
                                       jax.tree.leaves(grads16)):
        assert g16.dtype == jnp.float32  # parameters stay float32, so do their gradients
        ours.append(cosine(g16, g32))
        xla.append(cosine(g_xla, g32))
        assert ours[-1] > xla[-1] - 0.05, (jax.tree_util.keystr(path), ours[-1], xla[-1])
    assert np.mean(ours) > np.mean(xla) - 0.01 and min(ours) > 0.8


def test_fast_dtype_is_bfloat16_exactly_where_onednn_runs_it_natively(monkeypatch):
    assert onednn.fast_dtype("auto")[0] == ("bfloat16" if onednn.native_bfloat16() else "float32")
    assert onednn.fast_dtype("xla")[0] == "float32"  # XLA's CPU kernels: float32 is the fast one
    monkeypatch.setattr(onednn, "native_bfloat16", lambda: True)
    assert onednn.fast_dtype("auto") == ("bfloat16", "this CPU has AVX512-BF16 or AMX for oneDNN's bfloat16 kernels")
    monkeypatch.setattr(onednn, "native_bfloat16", lambda: False)
    dtype, why = onednn.fast_dtype("auto")
    assert dtype == "float32" and why.startswith("no native bfloat16 for oneDNN here: ")


def test_conv_for_picks_xla_where_onednn_cannot_run_and_says_why_when_asked(monkeypatch):
    from cifar_jax.config import ConfigError

    assert onednn.conv_for("auto", "float16") is None  # auto: quietly XLA
    with pytest.raises(ConfigError, match=r"^model\.conv=onednn: it is float32 or bfloat16 only \(model\.dtype is float16\); use model\.conv=auto or xla$"):
        onednn.conv_for("onednn", "float16")
    expected = onednn.conv_general_dilated if onednn.available() else None
    assert onednn.conv_for("auto", "float32") is expected
    assert onednn.conv_for("auto", "bfloat16") is (expected if onednn.native_bfloat16() else None)
    if onednn.available():  # A CPU without native bfloat16: auto keeps XLA, onednn says why.
        monkeypatch.setattr(onednn, "native_bfloat16", lambda: False)
        assert onednn.conv_for("auto", "bfloat16") is None
        with pytest.raises(ConfigError, match=r"^model\.conv=onednn: bfloat16 needs a CPU with AVX512-BF16 or AMX"):
            onednn.conv_for("onednn", "bfloat16")


def test_missing_onednn_or_failed_compile_is_a_one_line_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_prefixes", lambda: [tmp_path])
    with pytest.raises(RuntimeError, match=r'^oneDNN is not installed \(pip install -e "\.\[onednn\]"'):
        onednn._find_onednn()
    monkeypatch.undo()
    if not onednn.available():
        pytest.skip("oneDNN not installed: the compile step cannot be reached")
    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # A "compiler" that fails at once.
    with pytest.raises(RuntimeError, match=r"^compiling the oneDNN extension failed"):
        onednn._library_path()
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # nothing half-built left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match=r"^cannot compile the oneDNN extension with .*no-such-compiler"):
        onednn._library_path()


def test_train_cli_refuses_onednn_where_it_cannot_run(cifar_archive, tmp_path, capsys):
    from cifar_jax import train

    workdir = tmp_path / "w"
    rc = train.main(["--config", str(ROOT / "experiments" / "smoke.py"), "--workdir", str(workdir),
                     f"--config.data.path={cifar_archive}", "--config.model.conv=onednn", "--config.model.dtype=float16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert re.match(r"^error: model\.conv=onednn: it is float32 or bfloat16 only", err[0])
    assert not workdir.exists()


def test_keep_freed_memory_sets_glibc_options_and_can_be_turned_off(monkeypatch):
    from cifar_jax import runtime

    monkeypatch.setenv("CIFAR_JAX_MALLOC", "default")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv("CIFAR_JAX_MALLOC")
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert runtime.keep_freed_memory() is True


def test_a_damaged_cached_build_is_rebuilt(monkeypatch, tmp_path, capsys):
    if not onednn.available():
        pytest.skip("oneDNN not installed")
    monkeypatch.setenv("CIFAR_JAX_CACHE", str(tmp_path / "cache"))
    path = onednn._library_path()  # A fresh build in the empty cache.
    size = path.stat().st_size
    assert capsys.readouterr().err == ""
    path.write_bytes(path.read_bytes()[:1000])  # Truncated, as by a full disk or a killed copy (dlopen would crash on it).
    onednn._load.cache_clear()
    try:
        assert onednn._load() is None  # Checked against its digest, rebuilt, loaded: not a crash, not unavailable.
        assert path.stat().st_size == size
        assert capsys.readouterr().err.strip().splitlines() == [f"warning: the oneDNN extension {str(path)!r} is damaged; building it again"]
        onednn._load.cache_clear()
        assert onednn._load() is None and capsys.readouterr().err == ""  # Once.
    finally:
        onednn._load.cache_clear()
        monkeypatch.delenv("CIFAR_JAX_CACHE")
        assert onednn.available()
