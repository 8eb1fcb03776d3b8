"""Every op again in plain ``lax``/``jnp``, differentiated by ``jax.grad``: the oracle.

Nothing here has a custom rule, and nothing here shares code with the ops:
each function takes the same arguments as its public counterpart, so a test can
call ``jax.vjp(reference.op, ...)`` next to ``jax.vjp(jaxconv.op, ...)``, but
reads them on its own.  ``"SAME"`` and ``"VALID"`` go straight to
``lax.conv_general_dilated`` / ``lax.reduce_window``, which resolve them with
``lax.padtype_to_pads``; explicit amounts become ``(lo, hi)`` pairs in
:func:`_pads`.  A mistake in the ops' window geometry (``jaxconv._core.window``)
therefore shows up as a disagreement with this module instead of being copied
into it.  Arguments are checked only where lax would otherwise overflow (amounts
past int32) or the op is undefined (pooling windows of padding alone); the
public ops give the full error messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# lax's sizes are int32: an amount past this would overflow (or make XLA allocate
# an input padded by terabytes) instead of failing.
_INT32_MAX = 2**31 - 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _tuple(value, ndim: int) -> tuple[int, ...]:
    """An int, or one int per spatial dimension, as an ``ndim``-tuple."""
    return (int(value),) * ndim if _is_int(value) else tuple(int(v) for v in value)


def _pads(padding, ndim: int):
    """``padding`` as lax takes it: ``"SAME"``/``"VALID"`` unchanged (any case), an int for every
    side, one int per dimension for both its sides, or one ``(lo, hi)`` pair per dimension."""
    if isinstance(padding, str):
        return padding.upper()
    if _is_int(padding):
        pads = ((int(padding), int(padding)),) * ndim
    elif isinstance(padding, Sequence) and all(_is_int(p) for p in padding):
        pads = tuple((int(p), int(p)) for p in padding)
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != ndim:
        raise ValueError(f"`padding` (={padding!r}) must give {ndim} spatial dimension(s).")
    if max(max(abs(lo), abs(hi)) for lo, hi in pads) > _INT32_MAX:
        raise ValueError(f"`padding` (={padding!r}) must be <= {_INT32_MAX} (2**31 - 1, lax's int32 sizes).")
    return pads


# --- convolution (conv1d/2d/3d, conv_transpose1d/2d/3d) ------------------------


def _spatial_letters(ndim):
    return "DHW"[3 - ndim :]


def conv_nd(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1, precision=None):
    """Plain ``lax.conv_general_dilated`` over ``x.ndim - 2`` spatial dims; its gradient is XLA's autodiff."""
    ndim = x.ndim - 2
    sp = _spatial_letters(ndim)
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=_tuple(stride, ndim),
        padding=_pads(padding, ndim),
        rhs_dilation=_tuple(dilation, ndim),
        dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"),
        feature_group_count=groups,
        precision=precision,
    )
    return y if b is None else y + b


def conv1d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1, precision=None):
    """:func:`conv_nd` on NWC / WIO."""
    return conv_nd(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, precision=precision)


def conv2d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1, precision=None):
    """:func:`conv_nd` on NHWC / HWIO."""
    return conv_nd(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, precision=precision)


def conv3d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1, precision=None):
    """:func:`conv_nd` on NDHWC / DHWIO."""
    return conv_nd(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, precision=precision)


def conv_transpose_nd(
    y, w, b=None, *, stride=1, padding="VALID", output_padding=0, dilation=1, groups=1, precision=None
):
    """The adjoint of ``conv_nd(., w, same arguments)`` with respect to its input, by ``jax.vjp``.

    The convolution's input has ``(n-1)*s - lo - hi + d*(k-1) + 1 + output_padding``
    entries per dimension (``"VALID"`` is 0 padding); with ``"SAME"`` it has
    ``(n-1)*s + 1 + output_padding``, the smallest size a ``"SAME"`` convolution
    maps to ``n`` plus ``output_padding``, and lax pads that convolution itself.
    ``jax.vjp`` of :func:`conv_nd` at that shape, pulled back along ``y``, is the
    transposed convolution, and it is differentiable (in ``y`` and ``w``) by
    autodiff like any other lax program.
    """
    ndim = y.ndim - 2
    kernel = tuple(w.shape[:-2])
    stride, dilation = _tuple(stride, ndim), _tuple(dilation, ndim)
    output_padding = _tuple(output_padding, ndim)
    pads = _pads(padding, ndim)
    if pads == "VALID":
        pads = ((0, 0),) * ndim
    if pads == "SAME":
        in_size = tuple((n - 1) * s + 1 + op for n, s, op in zip(y.shape[1:-1], stride, output_padding))
    elif isinstance(pads, str):
        raise ValueError(f"`padding` (={padding!r}) is not defined for a transposed convolution.")
    else:
        in_size = tuple(
            (n - 1) * s - lo - hi + d * (k - 1) + 1 + op
            for n, (lo, hi), k, s, d, op in zip(y.shape[1:-1], pads, kernel, stride, dilation, output_padding)
        )
    x_shape = (y.shape[0], *in_size, w.shape[-2] * groups)

    def conv(x):
        return conv_nd(x, w, stride=stride, padding=pads, dilation=dilation, groups=groups, precision=precision)

    _, pullback = jax.vjp(conv, jnp.zeros(x_shape, y.dtype))
    (x,) = pullback(y)
    return x if b is None else x + b


conv_transpose1d = conv_transpose2d = conv_transpose3d = conv_transpose_nd


# --- pooling (avg_pool1d/2d/3d, max_pool1d/2d/3d) -----------------------------


def _pool_window(x, window, stride, padding):
    """``reduce_window``'s dimensions, strides and padding over ``(N, *spatial, C)``."""
    ndim = x.ndim - 2
    kernel = _tuple(window, ndim)
    stride = kernel if stride is None else _tuple(stride, ndim)
    pads = _pads(padding, ndim)
    if not isinstance(pads, str):  # a string covers the batch and channel axes too (window 1: no padding)
        # The ops' domain (PyTorch's rule): at most half the window on a side, so every window holds an
        # input entry; past it a max would be -inf and an exclusive average 0 / 0.
        for i, ((lo, hi), k) in enumerate(zip(pads, kernel)):
            for side, amount in (("low", lo), ("high", hi)):
                if amount > k // 2:
                    raise ValueError(
                        f"`padding` (={padding!r}) puts {amount} on the {side} side of spatial "
                        f"dimension {i}, more than half the window ({k} // 2 = {k // 2})."
                    )
        pads = ((0, 0), *pads, (0, 0))
    return (1, *kernel, 1), (1, *stride, 1), pads


def avg_pool_nd(x, window, *, stride=None, padding="VALID", count_include_pad=True):
    """``reduce_window(add)`` divided by the window volume, or by ``reduce_window(add)`` of ones (the real count)."""
    dims, strides, pads = _pool_window(x, window, stride, padding)
    # NumPy scalars as init values: lax recognises the monoid and so can differentiate it.
    zero = np.zeros((), x.dtype)
    sums = lax.reduce_window(x, zero, lax.add, dims, strides, pads)
    if count_include_pad:
        return sums / int(np.prod(dims))
    counts = lax.reduce_window(jnp.ones(x.shape, x.dtype), zero, lax.add, dims, strides, pads)
    return sums / lax.stop_gradient(counts)


def max_pool_nd(x, window, *, stride=None, padding="VALID"):
    """``lax.reduce_window(x, -inf, lax.max)``: jax.grad runs XLA's select_and_scatter.

    XLA's CPU max reductions drop NaN, so NaN is put back in every window that
    holds one by adding a constant (``stop_gradient``): NaN there, ``-0.0``
    elsewhere (``y + -0.0`` is ``y`` bit for bit, signed zeros included).
    Autodiff's gradient is the reduction's, unchanged."""
    dims, strides, pads = _pool_window(x, window, stride, padding)
    y = lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, dims, strides, pads)
    has_nan = lax.reduce_window(jnp.isnan(x).astype(x.dtype), np.zeros((), x.dtype), lax.max, dims, strides, pads)
    return y + lax.stop_gradient(jnp.where(has_nan > 0, np.array(np.nan, x.dtype), np.array(-0.0, x.dtype)))


avg_pool1d = avg_pool2d = avg_pool3d = avg_pool_nd
max_pool1d = max_pool2d = max_pool3d = max_pool_nd


def _flax_pool(inputs, init, reduce_fn, window_shape, strides, padding):
    """``flax.linen.pooling.pool``: ``lax.reduce_window`` over the window dims, any number of leading batch dims."""
    window = tuple(window_shape)
    batch = inputs.ndim - (len(window) + 1)
    strides = tuple(strides or (1,) * len(window))
    if not isinstance(padding, str):
        padding = ((0, 0),) * batch + tuple(tuple(p) for p in padding) + ((0, 0),)
    return lax.reduce_window(
        inputs, init, reduce_fn, (1,) * batch + window + (1,), (1,) * batch + strides + (1,), padding
    )


def flax_max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """``flax.linen.max_pool``'s definition in plain ``lax`` (Flax is not a dependency), the oracle of
    ``jaxconv.lax.max_pool``; tests/test_lax.py checks it against Flax itself."""
    return _flax_pool(inputs, np.array(-np.inf, inputs.dtype), lax.max, window_shape, strides, padding)


def flax_avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True):
    """``flax.linen.avg_pool``'s definition in plain ``lax``, the oracle of ``jaxconv.lax.avg_pool``."""
    zero = np.zeros((), inputs.dtype)
    sums = _flax_pool(inputs, zero, lax.add, window_shape, strides, padding)
    if count_include_pad:
        return sums / int(np.prod(window_shape))
    ones = jnp.ones(inputs.shape[inputs.ndim - len(window_shape) - 1 :], inputs.dtype)
    return sums / lax.stop_gradient(_flax_pool(ones, zero, lax.add, window_shape, strides, padding))


# --- local response normalisation --------------------------------------------


def lrn(x, *, size=5, kappa=2.0, alpha=1e-4, beta=0.75):
    """``x * (kappa + alpha * sum_{t in G(k)} x_t^2) ** -beta``, the window sum as a 0/1 matrix product.

    ``G(k) = [k - floor((size-1)/2), k + ceil((size-1)/2)]`` clipped: column ``k``
    of the ``(C, C)`` band matrix ``m`` marks ``G(k)``, so ``(x**2) @ m`` is the
    window sum, independent of the hand rule's ``reduce_window``.
    """
    c = x.shape[-1]
    t = np.arange(c)[:, None]
    k = np.arange(c)[None, :]
    # Extents past c reach no further channel (and a size of 2**70 would overflow int64).
    below, above = min((size - 1) // 2, c), min(size // 2, c)
    band = jnp.asarray((t >= k - below) & (t <= k + above), x.dtype)
    sums = jnp.matmul(x * x, band, precision=lax.Precision.HIGHEST)
    return x * (kappa + alpha * sums) ** (-beta)


# --- batch normalisation ------------------------------------------------------


def batch_norm(x, scale, offset, *, eps=1e-5):
    """``(x - mean) / sqrt(var + eps) * scale + offset``, ``jnp.mean``/``jnp.var`` over every axis
    but the last (biased variance); autodiff differentiates through the statistics."""
    axes = tuple(range(x.ndim - 1))
    return (x - jnp.mean(x, axis=axes)) / jnp.sqrt(jnp.var(x, axis=axes) + eps) * scale + offset


# --- layers (relu, linear, flatten) ------------------------------------------


def relu(x):
    """``x`` where ``x > 0``, a NaN where ``x`` is NaN, else 0: autodiff gives ``g * (x > 0)``,
    0 at ``x == 0`` and at NaN (the NaN passes through ``stop_gradient``), as ``jax.nn.relu``."""
    return jnp.where(x > 0, x, lax.stop_gradient(jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype))))


def linear(x, w, b=None, *, precision=None):
    """``x @ w + b`` (``precision``: lax's, passed through)."""
    y = jnp.matmul(x, w, precision=precision)
    return y if b is None else y + b


def flatten(x):
    """``x.reshape(N, -1)``, row-major."""
    return x.reshape(x.shape[0], -1)


# --- losses (softmax, log_loss, softmax_cross_entropy, l2_penalty) -----------


def softmax(s):
    """``exp(s - max) / sum``: the max is a constant shift (stop_gradient), so autodiff sees softmax."""
    e = jnp.exp(s - lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def _picked(values, labels):
    return jnp.take_along_axis(values, labels[:, None], axis=1)[:, 0]


def log_loss(p, labels):
    """``-mean(log p[n, labels[n]])``."""
    return -jnp.mean(jnp.log(_picked(p, labels)))


def softmax_cross_entropy(logits, labels):
    """``mean(logsumexp(s) - s[label])`` with the row max shifted out (stable)."""
    m = lax.stop_gradient(logits.max(axis=1, keepdims=True))
    lse = m[:, 0] + jnp.log(jnp.exp(logits - m).sum(axis=1))
    return jnp.mean(lse - _picked(logits, labels))


def l2_penalty(params, lam):
    """``lam * sum of squares`` over the pytree's leaves."""
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(params)]
    dtype = jnp.result_type(*leaves)
    return jnp.asarray(lam, dtype) * sum(jnp.sum(leaf.astype(dtype) ** 2) for leaf in leaves)
