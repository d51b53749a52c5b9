"""Read and perturb any submodule's output with ``flax.linen.intercept_methods``, no change to the model.

A layer is named by its module path (``"layer4"``, ``"layer3/block0/conv2"``,
the names in the variables tree joined by ``/``) or chosen by a predicate on
the module. The interceptor wraps every module method call made inside
``apply``; for the first ``__call__`` of the chosen module it records the
output and returns ``output + delta`` (or a replacement). ``jax.grad`` with
respect to a zero ``delta`` is then the gradient with respect to that output,
and the recorded output comes back as auxiliary data. All state lives in
dicts local to one trace, so nothing leaks between calls or traces.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Layer = str | Callable[[nn.Module], bool]


def module_path(module: nn.Module) -> str:
    """``"layer3/block0/conv2"`` for a bound module (``""`` for the root)."""
    return "/".join(str(p) for p in module.path)


def eval_kwargs(model: nn.Module) -> dict:
    """Evaluation-mode keywords the module's ``__call__`` accepts: train=False, training=False, deterministic=True."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    defaults = {"train": False, "training": False, "deterministic": True}
    return {k: v for k, v in defaults.items() if k in params}


def as_apply_fn(model, apply_kwargs: dict | None = None) -> Callable:
    """A module -> ``(variables, x) -> outputs`` in evaluation mode (``eval_kwargs`` updated by ``apply_kwargs``).

    Any other callable (e.g. ``functools.partial(model.apply, train=False)``) is
    returned as is, with ``apply_kwargs`` bound if given.
    """
    if isinstance(model, nn.Module):
        return functools.partial(model.apply, **{**eval_kwargs(model), **(apply_kwargs or {})})
    return functools.partial(model, **apply_kwargs) if apply_kwargs else model


def layer_matcher(layer: Layer) -> Callable[[nn.Module], bool]:
    """A str path or a predicate -> predicate on (non-root) modules."""
    if callable(layer):
        return layer
    path = str(layer).strip("/")
    return lambda mdl: module_path(mdl) == path


def _describe(layer: Layer) -> str:
    return repr(layer) if isinstance(layer, str) else getattr(layer, "__name__", "predicate")


def run_with_layer(apply_fn, variables, x, layer: Layer, *, delta=None, replace=None, record=None):
    """Runs ``apply_fn(variables, x)`` and returns (outputs, the layer's output).

    ``delta`` is added to, or ``replace`` substituted for, the output of the first
    ``__call__`` of the module matched by ``layer``. ``record`` (a list) collects
    (path, output) of every module call, for error messages and ``list_layers``.
    Raises ValueError naming close matches when no module matches.
    """
    match = layer_matcher(layer)
    state = {}  # local to this call (and trace): the matched output

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not context.module.path:
            return out
        if record is not None:
            record.append((module_path(context.module), out))
        if "acts" in state or not match(context.module):
            return out
        state["acts"] = out
        if replace is not None:
            out = replace
        if delta is not None:
            out = out + delta.astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        outputs = apply_fn(variables, x)
    if "acts" not in state:
        raise ValueError(unknown_layer_message(layer, [p for p, _ in record] if record is not None else _paths(apply_fn, variables, x)))
    return outputs, state["acts"]


def unknown_layer_message(layer: Layer, paths) -> str:
    """One line: the unknown layer and the module paths closest to it."""
    paths = list(dict.fromkeys(paths))
    close = difflib.get_close_matches(str(layer), paths, n=5, cutoff=0.5) if isinstance(layer, str) else []
    hint = f"close matches: {', '.join(close)}" if close else f"modules: {', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}"
    return f"unknown layer {_describe(layer)}: no module matches; {hint} (list_layers() lists them all)"


def _paths(apply_fn, variables, x) -> list[str]:
    return [p for p, _ in _record_calls(apply_fn, variables, x)]


def _record_calls(apply_fn, variables, x) -> list[tuple[str, Any]]:
    """(path, output ShapeDtypeStruct tree) of every submodule ``__call__``, in call order, first call only (abstract evaluation)."""
    record = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            record.append((module_path(context.module), jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out)))
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return apply_fn(variables, x)

    jax.eval_shape(run, variables, x)
    return _first_calls(record)


def _first_calls(record):
    seen, rows = set(), []
    for path, shape in record:
        if path not in seen:
            seen.add(path)
            rows.append((path, shape))
    return rows


def list_layers(model, variables, images, apply_kwargs: dict | None = None) -> list[tuple[str, Any]]:
    """Every submodule that ``layer=`` can name: [(path, output shape), ...] in call order.

    ``model`` is a Flax module (or an apply function); ``images`` only need the right
    shape (e.g. ``jnp.zeros((1, 32, 32, 3))``); nothing is computed (``jax.eval_shape``).
    Shapes are tuples, or trees of tuples for modules returning several arrays.
    """
    rows = _record_calls(as_apply_fn(model, apply_kwargs), variables, jnp.asarray(images))
    return [(p, jax.tree.map(lambda s: tuple(s.shape), s)) for p, s in rows]


def format_layers(rows) -> str:
    """``list_layers`` rows as aligned text lines ``path  shape`` (for a CLI)."""
    width = max((len(p) for p, _ in rows), default=0)
    return "\n".join(f"{p.ljust(width)}  {s}" for p, s in rows)


def layer_output_shape(apply_fn, variables, x, layer: Layer):
    """ShapeDtypeStruct of the matched layer's output (abstract evaluation; ValueError if none matches)."""
    record = []

    def run(variables, x):
        return run_with_layer(apply_fn, variables, x, layer, record=record)[1]

    out = jax.eval_shape(run, variables, x)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"layer {_describe(layer)} returns {jax.tree.structure(out)}, not one array; choose a module returning an array")
    return out
