r"""Batch normalisation (training mode) with a hand-derived backward pass.

Per channel ``c`` (the last axis), over the ``m`` entries of every other axis
(``N*H*W`` for NHWC activations, ``N`` for ``(N, D)``), docs/layers.md
(Batch normalisation):

.. math::

    \mu = \frac1m \sum x, \quad
    \sigma^2 = \frac1m \sum (x - \mu)^2, \quad
    \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
    y = \gamma \hat x + \beta,

the biased batch variance, as PyTorch's and Flax's training mode use.

Backward, for ``g = dL/dy``: ``dL/dbeta = sum g``, ``dL/dgamma = sum g * xhat``, and,
since ``mu`` and ``sigma`` depend on every entry of the channel,

.. math::

    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Big(g - \overline{g} - \hat x\, \overline{g \hat x}\Big),

with bars the channel means.  The rule saves ``xhat`` and ``1/sqrt(sigma^2 +
eps)`` (one number per channel), not ``x``: ``xhat`` is all the backward reads.
It is written with plain ``jnp`` reductions, so it can be differentiated again
(grad-of-grad, Hessian-vector products).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from .._core import args as _args

__all__ = ["batch_norm"]


def _eps(value) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"`eps` (={value!r}) must be a positive real number.")
    try:
        eps = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"`eps` (={value!r}) must be a concrete positive real number (a static hyperparameter)."
        ) from None
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"`eps` (={value!r}) must be a finite number > 0.")
    return eps


@_args.reverse_mode_rule
def batch_norm(x: ArrayLike, scale: ArrayLike, offset: ArrayLike, *, eps: float = 1e-5) -> Array:
    """Training-mode batch normalisation over every axis but the last, with a hand-derived VJP.

    Args:
      x: ``(N, ..., C)`` (NHWC activations, ``(N, D)`` for a dense layer's,
        any rank >= 2), floating dtype.
      scale: ``gamma``, shape ``(C,)``, same dtype.
      offset: ``beta``, shape ``(C,)``, same dtype.
      eps: added to the variance, a Python number > 0 (static).

    Returns:
      ``scale * (x - mean) / sqrt(var + eps) + offset`` with ``mean`` and the
      biased ``var`` of each channel over all other axes (the batch
      statistics: what PyTorch's ``BatchNorm`` computes in training mode).
      For a running estimate for inference, use the batch's ``mean`` and
      ``var * m / (m - 1)`` (PyTorch's unbiased running variance).

    Backward: ``dx = scale / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat))``
    per channel, ``dscale = sum(g * xhat)``, ``doffset = sum(g)`` (module
    docstring; docs/layers.md).

    Examples:
      >>> y = batch_norm(jnp.arange(8.0).reshape(4, 2), jnp.ones(2), jnp.zeros(2))
      >>> [round(float(v), 4) for v in y[:, 0]]
      [-1.3416, -0.4472, 0.4472, 1.3416]
    """
    x = _args.check_float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"`x` must have rank >= 2 (N, ..., C), got shape {tuple(x.shape)}.")
    c = x.shape[-1]
    scale = _args.check_float_array(scale, "scale", 1)
    offset = _args.check_float_array(offset, "offset", 1)
    _args.check_same_dtype(x=x, scale=scale, offset=offset)
    for name, a in (("scale", scale), ("offset", offset)):
        if a.shape[0] != c:
            raise ValueError(f"`{name}` must have length {c} (the channels, x.shape[-1]), got shape {tuple(a.shape)}.")
    if math.prod(x.shape[:-1]) == 0:
        raise ValueError(f"`x` (shape {tuple(x.shape)}) has no entries per channel to take statistics over.")
    return _batch_norm(_eps(eps), x, scale, offset)


def _statistics(eps: float, x):
    """``xhat`` and ``1/sqrt(var + eps)`` per channel (biased batch variance)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean
    inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=axes) + jnp.asarray(eps, x.dtype))
    return centred * inv, inv


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm(eps: float, x, scale, offset):
    xhat, _ = _statistics(eps, x)
    return scale * xhat + offset


def _batch_norm_fwd(eps: float, x, scale, offset):
    xhat, inv = _statistics(eps, x)
    return scale * xhat + offset, (xhat, inv, scale)


def _batch_norm_bwd(eps: float, residuals, g):
    xhat, inv, scale = residuals
    axes = tuple(range(g.ndim - 1))
    d_offset = jnp.sum(g, axis=axes)
    d_scale = jnp.sum(g * xhat, axis=axes)
    dx = (scale * inv) * (g - jnp.mean(g, axis=axes) - xhat * jnp.mean(g * xhat, axis=axes))
    return dx, d_scale, d_offset


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
