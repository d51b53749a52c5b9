"""oneDNN convolutions for XLA:CPU: a drop-in ``conv_general_dilated`` with oneDNN forward and gradients.

XLA:CPU (jaxlib 0.10) runs the ResNet's convolutions, and above all their weight gradients, far below this
CPU's peak; oneDNN, which PyTorch uses on CPU, JIT-compiles kernels for the instruction set it finds. This
module compiles ``native/onednn_conv.cc`` (three XLA FFI handlers) once per machine into the cache directory,
registers them with ``jax.ffi``, and exposes::

    conv_general_dilated(lhs, rhs, window_strides, padding, ..., dimension_numbers=...)  # nn.Conv's signature

which runs 2-D, NHWC/HWIO, undilated, ungrouped convolutions (every conv of the ResNets here) in float32, or in
bfloat16 where the CPU has native bfloat16 dot products (``native_bfloat16()``: AVX512-BF16 or AMX), as a
``jax.custom_vjp`` over oneDNN's forward, backward-data and backward-weights primitives, and anything else
through ``lax.conv_general_dilated``. Gradients agree with XLA's to float tolerance (tests/test_onednn.py).

Needs the optional extra ``pip install -e ".[onednn]"`` (oneDNN 3.2 with GNU OpenMP and its headers, from
PyPI) and a C++17 compiler; ``available()`` says whether it can be used and ``unavailable_reason()`` why not.
Limits: CPU backend only; forward- and reverse-mode first derivatives (``jax.grad``, ``jax.vjp``), not
``jax.jvp`` or second derivatives; under ``jax.vmap`` it runs one call per batch element.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.files import atomic_path, write_text_atomic

SOURCE = Path(__file__).parent / "native" / "onednn_conv.cc"
TARGETS = {
    "forward": "OnednnConvForward",
    "backward_data": "OnednnConvBackwardData",
    "backward_weights": "OnednnConvBackwardWeights",
}
_NHWC = ("NHWC", "HWIO", "NHWC")
# Stride-1 forward convolutions with <= 32 input channels as oneDNN backward-data calls of the flipped kernel
# (read when a function is traced; benchmarks/train_throughput.py --convs onednn,onednn-direct compares).
FORWARD_AS_BACKWARD_DATA = True


def _prefixes() -> list[Path]:
    """Where pip puts a wheel's ``data/include`` and ``data/lib`` (the onednn wheels ship only those)."""
    out = []
    for p in (sys.prefix, sysconfig.get_config_var("userbase") or "", sys.base_prefix):
        if p and Path(p) not in out:
            out.append(Path(p))
    return out


def _find_onednn() -> tuple[Path, Path]:
    """(include dir, lib dir) of an installed oneDNN; raises RuntimeError naming what is missing."""
    for prefix in _prefixes():
        header, lib = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"
        if header.is_file() and lib.exists():
            return header.parent.parent.parent, lib.parent
    raise RuntimeError('oneDNN is not installed (pip install -e ".[onednn]" adds onednn-cpu-gomp and its headers)')


def _library_path() -> Path:
    """Builds (once per source, jaxlib and oneDNN version) and returns the FFI library; RuntimeError on failure."""
    import jaxlib

    from cifar_jax.runtime import default_cache_dir

    include, libdir = _find_onednn()
    version = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_bytes()
    key = hashlib.sha256(SOURCE.read_bytes() + version + jaxlib.__version__.encode() + str(libdir).encode()).hexdigest()
    out = default_cache_dir() / "native" / f"onednn_conv-{key[:16]}.so"
    digest = out.with_suffix(".sha256")  # Written after a complete build; a damaged .so would crash dlopen.
    if out.is_file() and digest.is_file() and digest.read_text() == hashlib.sha256(out.read_bytes()).hexdigest():
        return out
    if out.is_file():  # Built before, but damaged since (or its digest is): once, and rebuilt below.
        print(f"warning: the oneDNN extension {str(out)!r} is damaged; building it again", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX", "g++")
    with atomic_path(out, suffix=".so") as tmp:  # Built beside, renamed when complete: never half a library.
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{include}",
                   str(SOURCE), "-o", str(tmp), f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"cannot compile the oneDNN extension with {compiler}: {e}") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
            raise RuntimeError(f"compiling the oneDNN extension failed: {first or f'{compiler} exited with {done.returncode}'}")
    write_text_atomic(digest, hashlib.sha256(out.read_bytes()).hexdigest())
    return out


_registered: set[str] = set()
_library: list[ctypes.CDLL] = []  # The loaded extension, once _load() has succeeded.


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the FFI targets; None when ready, else the reason it cannot be used."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(_library_path()))
        lib.CifarJaxOnednnNativeBfloat16.restype = ctypes.c_int
        for name, symbol in TARGETS.items():
            handler = jax.ffi.pycapsule(getattr(lib, symbol))
            if name not in _registered:  # Once per process, even if a rebuilt library is loaded later.
                jax.ffi.register_ffi_target(f"cifar_jax_onednn_{name}", handler, platform="cpu")
                _registered.add(name)
    except (RuntimeError, OSError, AttributeError) as e:
        return str(e)
    _library.append(lib)
    return None


@functools.cache
def native_bfloat16() -> bool:
    """True when ``available()`` and oneDNN finds native bfloat16 instructions (AVX512-BF16 or AMX) on this CPU.

    Without them oneDNN emulates bfloat16 (plain AVX-512) or has no bfloat16 convolution (AVX2): slower than
    float32, so bfloat16 convolutions then stay on XLA.
    """
    return available() and bool(_library[0].CifarJaxOnednnNativeBfloat16())


def _dtype_ok(dtype) -> bool:
    """Whether oneDNN runs convolutions of this element type here: float32, or bfloat16 with native support."""
    return np.dtype(dtype) == np.float32 or (np.dtype(dtype) == jnp.bfloat16 and native_bfloat16())


def available() -> bool:
    """True when the oneDNN convolutions are built and registered (builds them on first call, ~5-30 s)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, in one line; None when it is True."""
    return _load()


def fast_dtype(conv: str = "auto") -> tuple[str, str]:
    """(compute dtype that is fast here, why) for ``model.dtype="auto"`` under ``model.conv`` = ``conv``.

    bfloat16 off the CPU and where oneDNN runs it natively (``native_bfloat16()``: AVX512-BF16 or AMX, one CPU
    device); float32 elsewhere, where bfloat16 convolutions would fall to XLA's slower kernels.
    """
    backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16", f"the {backend} backend"
    if conv == "xla":
        return "float32", "model.conv=xla: XLA's bfloat16 convolutions are slower than its float32 ones on a CPU"
    if jax.device_count() != 1:
        return "float32", f"oneDNN needs one CPU device and this run has {jax.device_count()}"
    if native_bfloat16():
        return "bfloat16", "this CPU has AVX512-BF16 or AMX for oneDNN's bfloat16 kernels"
    return "float32", f"no native bfloat16 for oneDNN here: {unavailable_reason() or 'this CPU has neither AVX512-BF16 nor AMX'}"


def conv_for(choice: str, dtype: str):
    """The ``conv_general_dilated`` a model should use for ``model.conv`` = ``choice``: this module's, or None (XLA's).

    "auto": oneDNN when the backend is a single CPU device, ``available()``, and ``dtype`` is "float32" or
    "bfloat16" on a CPU with ``native_bfloat16()``; else None. "onednn": the same conditions, each failure a
    ``ConfigError`` naming it. (On several devices the step
    is sharded by XLA, which cannot split a custom call, so it would run whole on every device.)
    """
    from cifar_jax.errors import ConfigError

    backend, devices = jax.default_backend(), jax.device_count()
    problem = None
    if backend != "cpu":
        problem = f"it runs on the CPU backend only (this run's is {backend})"
    elif devices != 1:
        problem = f"it needs exactly one CPU device (this run has {devices}: cpu_devices or several processes)"
    elif dtype not in ("float32", "bfloat16"):
        problem = f"it is float32 or bfloat16 only (model.dtype is {dtype})"
    elif not available():
        problem = unavailable_reason()
    elif dtype == "bfloat16" and not native_bfloat16():
        problem = "bfloat16 needs a CPU with AVX512-BF16 or AMX (oneDNN would emulate it, slower than XLA)"
    if problem is None:
        return conv_general_dilated
    if choice == "onednn":
        raise ConfigError(f"model.conv=onednn: {problem}; use model.conv=auto or xla")
    return None


def _attrs(strides, padding) -> dict:
    (pt, pb), (pl, pr) = padding
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(pt),
                pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(target: str, out_shape, *args, strides, padding):
    result = jax.ShapeDtypeStruct(out_shape, args[0].dtype)
    # "sequential": under vmap, one call per element (correct for any batching; nothing here vmaps in training).
    return jax.ffi.ffi_call(f"cifar_jax_onednn_{target}", result, vmap_method="sequential")(
        *args, **_attrs(strides, padding)
    )


def _output_shape(x_shape, w_shape, strides, padding) -> tuple[int, ...]:
    return tuple(int(d) for d in jax.lax.conv_general_shape_tuple(x_shape, w_shape, strides, padding, _NHWC))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
    """oneDNN convolution: x (N, H, W, C), w (KH, KW, C, O) -> (N, OH, OW, O), all float32 or all bfloat16.

    ``strides`` (sh, sw) and ``padding`` ((top, bottom), (left, right)) as Python ints. Equal, to float
    tolerance, to ``lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))``.
    """
    if not available():
        raise RuntimeError(f"oneDNN convolutions are unavailable: {unavailable_reason()}")
    out_shape = _output_shape(x.shape, w.shape, strides, padding)
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    few_channels = x.shape[-1] <= 32  # Where it measured faster (benchmarks/conv_kernels.py); slower from 64 up.
    if FORWARD_AS_BACKWARD_DATA and few_channels and strides == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw:
        # A stride-1 conv is the input gradient of the conv with the flipped, transposed kernel: with 32 or fewer
        # input channels oneDNN 3.2's backward-data primitive runs it faster than its forward primitive.
        flipped = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
        transposed = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
        return _call("backward_data", out_shape, x, flipped, strides=strides, padding=transposed)
    return _call("forward", out_shape, x, w, strides=strides, padding=padding)


def _conv2d_fwd(x, w, strides, padding):
    return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, w = residuals
    dx = _call("backward_data", x.shape, dy, w, strides=strides, padding=padding)
    dw = _call("backward_weights", w.shape, x, dy, strides=strides, padding=padding)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def supports(lhs, rhs, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
             batch_group_count=1) -> bool:
    """Whether ``conv_general_dilated`` with these arguments runs on oneDNN (else it falls back to XLA)."""
    from jax import lax

    if lhs.ndim != 4 or lhs.dtype != rhs.dtype or not _dtype_ok(lhs.dtype):
        return False
    if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
        return False
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == wanted


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``lax.conv_general_dilated``'s signature (what ``nn.Conv(conv_general_dilated=...)`` calls).

    Runs on oneDNN when ``supports(...)`` and the extension is ``available()``, else on XLA, with
    identical results to float tolerance.
    """
    from jax import lax

    if available() and preferred_element_type in (None, lhs.dtype) and supports(
        lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count
    ):
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
