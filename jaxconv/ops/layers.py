r"""ReLU, the fully connected layer and flattening, each with its hand-derived backward.

* ``relu`` (docs/layers.md, ReLU): ``y_k = max(0, x_k)``; ``dz/dx_k = dz/dy_k * [x_k > 0]``.
  The gradient at ``x_k == 0`` is 0, as ``jax.nn.relu``'s.  The only residual is
  the boolean mask ``x > 0`` (one byte an element, the smallest that works: the
  output would do too, at the element size of ``x``).
* ``linear`` (docs/layers.md, Fully connected layer): ``y = x W + b`` with ``x``
  ``(N, D_in)``, ``W`` ``(D_in, D_out)``, ``b`` ``(D_out,)``.  For ``g = dz/dy``:
  ``dz/dx = g Wᵀ``, ``dz/dW = xᵀ g``, ``dz/db = sum_n g_n``.  (With one example as a
  column, ``y = W x``, these read ``W^T dz/dy`` and ``dz/dy x^T``;
  with examples as rows the same formulas transpose to these.)
* ``flatten`` (docs/layers.md, Flatten and vectorisation): ``(N, d_1, ..., d_r) -> (N, d_1 ... d_r)``,
  row-major; ``dz/dx = reshape(dz/dy)``.  The order is JAX's row-major (for NHWC,
  channel fastest), not :func:`jaxconv.matrix.vec` (channel planes stacked): the two
  differ by a fixed permutation of the next layer's weight rows.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from .._core import args as _args

__all__ = ["flatten", "linear", "relu"]

# --- relu ----------------------------------------------------------------------


@_args.reverse_mode_rule
def relu(x: ArrayLike) -> Array:
    """Rectified linear unit ``max(0, x)``, elementwise (docs/layers.md, ReLU).

    Args:
      x: any shape, floating dtype.

    Returns:
      ``max(0, x)``, same shape and dtype.  NaN: a NaN element stays NaN, eager
      and under ``jit`` (and every other element is unaffected).

    Backward: ``dx = g * (x > 0)`` (0 at ``x == 0`` and at NaN, as ``jax.nn.relu``).
    """
    x = _args.check_float_array(x, "x")
    return _relu(x)


def _relu_forward(x):
    # A select, not jnp.maximum(x, 0): XLA's CPU backend fuses a max into a
    # following reduction with a max that drops NaN (relu(x).sum() under jit
    # was finite for a NaN x).  `x <= 0` is False at NaN, so NaN passes through.
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


@jax.custom_vjp
def _relu(x):
    return _relu_forward(x)


def _relu_fwd(x):
    # The plain forward, not _relu itself: a custom_vjp call inside the rule
    # would make forward-over-reverse (jax.jvp of jax.grad, jax.hessian) fail.
    return _relu_forward(x), x > 0


def _relu_bwd(positive, g):
    return (jnp.where(positive, g, jnp.zeros((), g.dtype)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


# --- linear --------------------------------------------------------------------


@_args.reverse_mode_rule
def linear(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, *, precision: lax.PrecisionLike = None) -> Array:
    """Fully connected layer ``y = x @ w + b`` (docs/layers.md, Fully connected layer).

    Args:
      x: inputs, shape ``(N, D_in)``, floating dtype.
      w: weights, shape ``(D_in, D_out)``, same dtype.
      b: optional bias, shape ``(D_out,)``, same dtype.
      precision: the precision of the forward product and both backward
        products, what ``lax.dot_general`` accepts (``None``, a
        ``lax.Precision``, a name such as ``"highest"``, a pair of them, a
        ``lax.DotAlgorithmPreset``); ``None`` is lax's default
        (``jax_default_matmul_precision``).

    Returns:
      ``(N, D_out)``, at most ``2**31 - 1`` elements (``ValueError`` past it).
      NaN: a NaN in row ``n`` of ``x`` makes row ``n`` of ``y`` NaN, a NaN in
      ``w[i, j]`` or ``b[j]`` column ``j`` (``0 * NaN`` is NaN), eager and under
      ``jit``.

    Backward, for ``g = dL/dy`` of shape ``(N, D_out)``:
    ``dL/dx = g @ w.T``, ``dL/dw = x.T @ g``, ``dL/db = g.sum(0)``.
    """
    x = _args.check_float_array(x, "x", 2)
    w = _args.check_float_array(w, "w", 2)
    if b is not None:
        b = _args.check_float_array(b, "b", 1)
    _args.check_same_dtype(x=x, w=w, b=b)
    precision = _args.precision(precision)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"`x.shape[1]` (={x.shape[1]}) must equal `w.shape[0]` (={w.shape[0]}), the input width D_in.")
    if b is not None and b.shape[0] != w.shape[1]:
        raise ValueError(f"`b` must have length {w.shape[1]} (= `w.shape[1]`, D_out), got shape {tuple(b.shape)}.")
    _args.check_elements((x.shape[0], w.shape[1]), "`x.shape[0]` and `w.shape[1]`", "the output")
    return _linear(precision, x, w, b)


def _linear_forward(precision, x, w, b):
    y = jnp.matmul(x, w, precision=precision)
    return y if b is None else y + b


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(precision, x, w, b):
    return _linear_forward(precision, x, w, b)


def _linear_fwd(precision, x, w, b):
    # The backward needs only whether b exists (D_out numbers, or None).
    return _linear_forward(precision, x, w, b), (x, w, b)


def _linear_bwd(precision, residuals, g):
    x, w, b = residuals
    dx = jnp.matmul(g, w.T, precision=precision)
    dw = jnp.matmul(x.T, g, precision=precision)
    db = None if b is None else g.sum(axis=0)
    return dx, dw, db


_linear.defvjp(_linear_fwd, _linear_bwd)


# --- flatten -------------------------------------------------------------------


@_args.reverse_mode_rule
def flatten(x: ArrayLike) -> Array:
    """``(N, d_1, ..., d_r) -> (N, d_1 * ... * d_r)``, row-major (docs/layers.md, Flatten and vectorisation).

    Args:
      x: rank ``>= 2``, floating dtype (for NHWC images ``(N, H, W, C)``, each
        row of the result is ``x[n].ravel()``: channel fastest).

    Returns:
      ``(N, prod(d))``; a NaN stays NaN, moved to its row-major place.

    Backward: ``dL/dx = dL/dy.reshape(x.shape)``: a rearrangement, nothing else.
    """
    x = _args.check_float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"`x` must have rank >= 2 (a batch axis and features), got shape {tuple(x.shape)}.")
    return _flatten(tuple(x.shape), x)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flatten(shape, x):
    return x.reshape(shape[0], math.prod(shape[1:]))


def _flatten_fwd(shape, x):
    # No residual: the input shape is static configuration.  The reshape itself,
    # not _flatten (see _relu_fwd: forward-over-reverse needs plain code here).
    return x.reshape(shape[0], math.prod(shape[1:])), None


def _flatten_bwd(shape, _, g):
    return (g.reshape(shape),)


_flatten.defvjp(_flatten_fwd, _flatten_bwd)
