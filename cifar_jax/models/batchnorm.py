"""Training-mode BatchNorm with a closed-form backward pass, as a drop-in ``nn.BatchNorm``.

``BatchNorm`` has ``nn.BatchNorm``'s attributes, variables (``params``: scale, bias; ``batch_stats``: mean,
var) and forward pass, and differs only in how the training-mode gradient is computed: ``batch_norm``'s
``custom_vjp`` writes it out (two per-channel sums, then one elementwise pass) where autodiff of the
statistics leaves XLA:CPU several passes over each activation. Feature axis last, no masks or cross-device
axis names (the ResNet's use); evaluation mode is ``nn.BatchNorm``'s own code.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x, scale, bias, epsilon: float):
    """Normalises (..., C) ``x`` by its own per-channel statistics over every other axis.

    Returns ``(y, mean, var)``: y = (x - mean) / sqrt(var + epsilon) * scale + bias in x's dtype, and the
    (C,) float32 batch mean and (biased) variance, as ``nn.BatchNorm`` computes them (E[x^2] - E[x]^2).
    """
    y, mean, var, _ = _forward(x, scale, bias, epsilon)
    return y, mean, var


def _axes(x):
    return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon):
    xf = x.astype(jnp.float32)
    mean = xf.mean(_axes(x))
    var = jnp.maximum(0.0, (xf * xf).mean(_axes(x)) - mean * mean)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (inv * scale) + bias
    return y.astype(x.dtype), mean, var, inv


def _fwd(x, scale, bias, epsilon):
    y, mean, var, inv = _forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, inv)


def _bwd(epsilon, residuals, cotangents):
    x, scale, mean, inv = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
    xhat = (xf - mean) * inv
    dbias = dyf.sum(_axes(x))  # XLA can fuse both sums into one pass over dy and x.
    dscale = (dyf * xhat).sum(_axes(x))
    # d/dx of y through x, its mean and its variance; then of the mean and variance outputs themselves.
    dx = (scale * inv) * (dyf - (dbias + xhat * dscale) / n) + (dmean + 2.0 * dvar * (xf - mean)) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm.defvjp(_fwd, _bwd)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` (axis -1) whose training mode runs ``batch_norm``; same variables and results."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        at_call = use_running_average  # nn.BatchNorm wants the call-time value only, as given.
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        general = (mask is not None or self.axis_name is not None or self.axis not in (-1, x.ndim - 1)
                   or not (self.use_scale and self.use_bias and self.use_fast_variance))
        if use_running_average or general:  # nn.BatchNorm's own code for what batch_norm does not cover.
            return super().__call__(x, at_call, mask=mask)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale)
        y, mean, var = batch_norm(x.astype(dtype), scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
