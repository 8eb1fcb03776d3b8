"""Drop-ins with ``jax.lax``'s (and Flax's pooling) signatures, backed by jaxconv's hand rules.

A model written against ``lax.conv_general_dilated`` (Flax linen and NNX's
``Conv``, Equinox's ``Conv`` through a small wrapper, plain ``lax`` code) gets
jaxconv's verified backward passes by passing or calling these instead:

* :func:`conv_general_dilated`: ``jax.lax.conv_general_dilated``'s signature,
  every ``dimension_numbers`` lax accepts, 1-3 spatial dimensions, padding
  ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ``(lo, hi)`` pairs (negative
  amounts crop), ``lhs_dilation`` (a transposed convolution), ``rhs_dilation``,
  ``feature_group_count``, ``precision``, ``preferred_element_type`` and
  ``out_sharding``;
* :func:`conv_transpose`: ``jax.lax.conv_transpose``'s signature;
* :func:`max_pool`, :func:`avg_pool`: ``flax.linen.max_pool``'s and
  ``flax.linen.avg_pool``'s signatures (no batch axis, or several, allowed).

How each call maps onto jaxconv's ops (docs/interop.md):

* the layouts: ``lhs`` is transposed to channels-last ``(N, *spatial, C)``,
  ``rhs`` to ``(*spatial, I, O)``, the result back to ``dimension_numbers``'
  output layout (nothing to do for NHWC/HWIO, Flax's default; elsewhere real
  copies where the planner's form is not XLA's convolution, docs/interop.md);
* string padding is resolved with lax's own rule (``lax.padtype_to_pads``);
  negative amounts crop the input before the convolution runs;
* ``lhs_dilation = a > 1`` (``a - 1`` zeros between input entries) is the
  transposed convolution: lax's ``conv(dilate(x, a), w)`` with padding
  ``(lo, hi)``, kernel extent ``e = d (k - 1) + 1``, equals
  ``conv_transpose(x, rot180_swap(w), stride=a, padding=(e-1-lo, e-1-hi))``
  (``rot180_swap`` reverses every spatial axis and swaps input and output
  channels per group; it is its own inverse).  Padding beyond ``e - 1`` on a
  side only adds outputs that read zeros alone, appended as zeros; a
  ``window_strides`` above 1 then keeps every ``s``-th output;
* ``preferred_element_type`` wider than the inputs: the inputs are cast to it
  first (exact: every product of two bfloat16 or float16 numbers is a float32
  number) and the op accumulates in it; the result has lax's dtype;
* ``out_sharding``: the result goes through ``jax.sharding.reshard``, which
  accepts (and rejects) what lax's ``out_sharding`` does (explicit mesh axes).

Everything else is a ``ValueError`` naming the argument: ``batch_group_count
> 1`` (lax uses it inside its own convolution gradients, models do not),
integer inputs, more than 3 spatial dimensions, pooling padding past half the
window.  Output shape and dtype are checked against ``jax.lax``'s own
(``jax.eval_shape``), which also raises lax's own errors for what lax rejects.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax as _lax
from jax.typing import ArrayLike, DTypeLike

from ._core import args as _args
from .ops import conv as _conv
from .ops import pool as _pool_ops

__all__ = ["avg_pool", "conv_general_dilated", "conv_transpose", "max_pool"]

_CONVS = {1: _conv.conv1d, 2: _conv.conv2d, 3: _conv.conv3d}
_TRANSPOSES = {1: _conv.conv_transpose1d, 2: _conv.conv_transpose2d, 3: _conv.conv_transpose3d}
_MAX_POOLS = {1: _pool_ops.max_pool1d, 2: _pool_ops.max_pool2d, 3: _pool_ops.max_pool3d}
_AVG_POOLS = {1: _pool_ops.avg_pool1d, 2: _pool_ops.avg_pool2d, 3: _pool_ops.avg_pool3d}


def _precision_kwargs(precision) -> dict:
    """``precision`` for jaxconv's conv ops (``None``, lax's default, is their default too)."""
    return {} if precision is None else {"precision": precision}


def _ints(value, name: str, ndim: int, default: int = 1) -> tuple[int, ...]:
    """A sequence of ``ndim`` ints (``None``: ``default`` in each), as lax takes strides and dilations."""
    if value is None:
        return (default,) * ndim
    try:
        items = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"`{name}` (={value!r}) must be a sequence of {ndim} ints.") from None
    if len(items) != ndim or min(items, default=1) < 1:
        raise ValueError(f"`{name}` (={value!r}) must be a sequence of {ndim} ints >= 1.")
    return items


def _spatial_dims(lhs, name: str = "lhs") -> int:
    ndim = lhs.ndim - 2
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"`{name}` has shape {tuple(lhs.shape)}: jaxconv's convolutions take 1, 2 or 3 spatial "
            f"dimensions (rank 3, 4 or 5), got {ndim}."
        )
    return ndim


def _float_operands(lhs: ArrayLike, rhs: ArrayLike) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
    a = _args.as_array(lhs, "lhs")
    b = _args.as_array(rhs, "rhs")
    if a.dtype != b.dtype:  # lax's rule and lax's error type
        raise TypeError(f"`lhs` and `rhs` must have the same dtype, got {a.dtype} and {b.dtype}.")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(
            f"`lhs` and `rhs` must have a floating dtype for jaxconv's rules, got {a.dtype} "
            "(integer convolutions: use jax.lax.conv_general_dilated)."
        )
    return a, b


def _to_channels_last(lhs, rhs, dnums: _lax.ConvDimensionNumbers):
    """``lhs`` as ``(N, *spatial, C)`` and ``rhs`` as ``(*spatial, I, O)``, spatial axes in lax's matching order."""
    lhs_spec, rhs_spec, _ = dnums
    x = _transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = _transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    return x, w


def _from_channels_last(y, dnums: _lax.ConvDimensionNumbers):
    """``y`` ``(N, *spatial, O)`` in the output layout of ``dnums``."""
    out_spec = dnums.out_spec
    ndim = y.ndim - 2
    ours = (0, ndim + 1, *range(1, ndim + 1))  # where out_spec's batch, feature, spatial... live in y
    perm = [0] * y.ndim
    for j, axis in enumerate(out_spec):
        perm[axis] = ours[j]
    return _transpose(y, tuple(perm))


def _transpose(a, perm):
    return a if tuple(perm) == tuple(range(a.ndim)) else jnp.transpose(a, perm)


def _crop_negative(x, pads):
    """Crop ``x`` ``(N, *spatial, C)`` by the negative padding amounts; return it and the padding left (``>= 0``)."""
    start = [0] * x.ndim
    limit = list(x.shape)
    left = []
    for axis, (lo, hi) in enumerate(pads, start=1):
        # lax allows crops past the input (the padding on the other side then keeps outputs): clamp, and the
        # caller finds an empty input.
        start[axis] = min(max(-lo, 0), x.shape[axis])
        limit[axis] = max(x.shape[axis] - max(-hi, 0), start[axis])
        left.append((max(lo, 0), max(hi, 0)))
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        x = _lax.slice(x, start, limit)
    return x, tuple(left)


def _conv_channels_last(x, w, strides, pads, lhs_dilation, rhs_dilation, groups, precision, out_shape):
    """lax's general dilated convolution on ``(N, *spatial, C)`` and ``(*spatial, I, O)`` by jaxconv's ops.

    ``out_shape``: the result's shape (lax's, channels-last).  Where a crop leaves
    no input entry for any output to read, every output reads padding alone: zeros.
    """
    ndim = x.ndim - 2
    extra = _precision_kwargs(precision)
    if all(a == 1 for a in lhs_dilation):
        x, pads = _crop_negative(x, pads)
        if min(x.shape[1:-1]) < 1:
            return jnp.zeros(out_shape, x.dtype)
        return _CONVS[ndim](x, w, stride=strides, padding=pads, dilation=rhs_dilation, groups=groups, **extra)
    # lhs dilation: the transposed convolution with the kernel rotated and its channels swapped per group
    # (module docstring), stride 1; padding past e - 1 adds outputs of zeros, appended afterwards.
    kernel = w.shape[:-2]
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, rhs_dilation)]
    within = [(min(lo, e - 1), min(hi, e - 1)) for (lo, hi), e in zip(pads, extents)]
    sizes = [
        (n - 1) * a + 1 + lo + hi - e + 1 for n, a, (lo, hi), e in zip(x.shape[1:-1], lhs_dilation, within, extents)
    ]
    if min(sizes) < 1:  # every output past the crop reads padding alone
        return jnp.zeros(out_shape, x.dtype)
    y = _TRANSPOSES[ndim](
        x,
        _conv.rot180_swap(w, groups),
        stride=lhs_dilation,
        padding=tuple((e - 1 - lo, e - 1 - hi) for (lo, hi), e in zip(within, extents)),
        dilation=rhs_dilation,
        groups=groups,
        **extra,
    )
    beyond = [(lo - lo_in, hi - hi_in) for (lo, hi), (lo_in, hi_in) in zip(pads, within)]
    if any(lo or hi for lo, hi in beyond):
        y = jnp.pad(y, ((0, 0), *beyond, (0, 0)))
    if any(s > 1 for s in strides):
        every = (slice(None), *(slice(None, None, s) for s in strides), slice(None))
        y = y[every]
    return y


def _lax_result(fn, *args, **kwargs) -> jax.ShapeDtypeStruct:
    """What ``jax.lax`` returns for these arguments (shape, dtype), raising lax's own errors."""
    return jax.eval_shape(partial(fn, **kwargs), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))


def _finish(y, expected: jax.ShapeDtypeStruct, out_sharding):
    if tuple(y.shape) != tuple(expected.shape):  # a bug here, never a wrong answer passed on
        raise RuntimeError(
            f"jaxconv.lax computed shape {tuple(y.shape)} where jax.lax gives "
            f"{tuple(expected.shape)}; please report this."
        )
    y = y.astype(expected.dtype)
    if out_sharding is not None:  # lax's meaning (explicit sharding), and lax's errors for Auto mesh axes
        y = jax.sharding.reshard(y, out_sharding)
    return y


def conv_general_dilated(
    lhs: ArrayLike,
    rhs: ArrayLike,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: _lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated``, same signature and result, with jaxconv's hand-derived VJP.

    Args:
      lhs: input, rank 3-5 (1-3 spatial dimensions), floating dtype.
      rhs: kernel, same rank and dtype.
      window_strides: ``n`` ints.
      padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or ``n`` ``(lo, hi)``
        pairs; a negative amount crops (as in lax).
      lhs_dilation: ``n`` ints or ``None``; above 1 runs jaxconv's transposed
        convolution (module docstring).  String padding with it is lax's
        ``ValueError``.
      rhs_dilation: ``n`` ints or ``None``: the kernel (atrous) dilation.
      dimension_numbers: ``None`` (``NCHW``/``OIHW``/``NCHW`` and their 1-D and
        3-D forms), a ``(lhs, rhs, out)`` tuple of strings such as
        ``("NHWC", "HWIO", "NHWC")``, or a ``lax.ConvDimensionNumbers``.
      feature_group_count: groups (depthwise when equal to the channels).
      batch_group_count: must be 1 (``ValueError`` otherwise).
      precision: as lax's, passed to jaxconv's ops (every product, forward
        and backward).
      preferred_element_type: as lax's: the result's dtype; when wider than
        the inputs, they are cast to it first and the op accumulates in it.
      out_sharding: as lax's (a ``NamedSharding``, or a ``PartitionSpec`` under
        ``jax.set_mesh``, over explicit mesh axes); applied with ``jax.sharding.reshard``.

    Returns:
      What ``jax.lax.conv_general_dilated`` returns (shape and dtype checked
      against it at trace time); its gradient is jaxconv's rule
      (``custom_vjp_call`` in the jaxpr).

    Example:
      >>> x = jnp.ones((1, 2, 5, 5)); w = jnp.ones((4, 2, 3, 3))
      >>> conv_general_dilated(x, w, (1, 1), "SAME").shape
      (1, 4, 5, 5)
    """
    lhs, rhs = _float_operands(lhs, rhs)
    ndim = _spatial_dims(lhs)
    if not _args._is_int(batch_group_count) or int(batch_group_count) != 1:
        raise ValueError(
            f"`batch_group_count` (={batch_group_count!r}) must be 1: jaxconv has no rule for "
            "batch-grouped convolutions (use jax.lax.conv_general_dilated)."
        )
    expected = _lax_result(
        _lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    strides = _ints(window_strides, "window_strides", ndim)
    lhs_dil = _ints(lhs_dilation, "lhs_dilation", ndim)
    rhs_dil = _ints(rhs_dilation, "rhs_dilation", ndim)
    dnums = _lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    x, w = _to_channels_last(lhs, rhs, dnums)
    if isinstance(padding, str):
        kernel = [d * (k - 1) + 1 for k, d in zip(w.shape[:-2], rhs_dil)]
        padding = _lax.padtype_to_pads(x.shape[1:-1], kernel, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if math.prod(expected.shape) == 0:  # lax's empty result (a crop or stride past every output)
        return _finish(jnp.zeros(expected.shape, expected.dtype), expected, out_sharding)
    if expected.dtype != x.dtype:  # preferred_element_type wider than the inputs
        x, w = x.astype(expected.dtype), w.astype(expected.dtype)
    out_spec = dnums.out_spec
    out_shape = tuple(expected.shape[a] for a in (out_spec[0], *out_spec[2:], out_spec[1]))
    y = _conv_channels_last(x, w, strides, pads, lhs_dil, rhs_dil, int(feature_group_count), precision, out_shape)
    return _finish(_from_channels_last(y, dnums), expected, out_sharding)


def _conv_transpose_padding(k: int, s: int, padding):
    """lax's transposed-convolution padding for one dimension (``jax.lax.conv_transpose``'s rule)."""
    if padding == "SAME":
        pad_len = k + s - 2
        pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        pad_a = k - 1
    else:
        pads = tuple(k - p - 1 for p in padding)
        pad_a, pad_len = pads[0], sum(pads)
    return pad_a, pad_len - pad_a


_DEFAULT_TRANSPOSE_LAYOUTS = {3: ("NHC", "HIO", "NHC"), 4: ("NHWC", "HWIO", "NHWC"), 5: ("NHWDC", "HWDIO", "NHWDC")}


def conv_transpose(
    lhs: ArrayLike,
    rhs: ArrayLike,
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    transpose_kernel: bool = False,
    precision: _lax.PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
    use_consistent_padding: bool = False,
) -> jax.Array:
    """``jax.lax.conv_transpose``, same signature and result, with jaxconv's hand-derived VJP.

    As lax: the fractionally strided convolution, :func:`conv_general_dilated`
    with ``lhs_dilation=strides`` (jaxconv's transposed convolution), channels-last
    layouts by default, ``"SAME"``/``"VALID"`` read as the padding of the
    forward convolution, pairs as the transposed convolution's own padding
    unless ``use_consistent_padding``; ``transpose_kernel=True`` reverses the
    kernel's spatial axes and swaps its channel axes (Keras'
    ``Conv2DTranspose``).  Errors as :func:`conv_general_dilated`'s.

    Example:
      >>> conv_transpose(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 4, 2)), (2, 2), "SAME").shape
      (1, 6, 6, 2)
    """
    lhs, rhs = _float_operands(lhs, rhs)
    if lhs.ndim != rhs.ndim:
        raise ValueError(
            f"`lhs` (shape {tuple(lhs.shape)}) and `rhs` (shape {tuple(rhs.shape)}) must have the same rank."
        )
    ndim = _spatial_dims(lhs)
    expected = _lax_result(
        _lax.conv_transpose,
        lhs,
        rhs,
        strides=strides,
        padding=padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        transpose_kernel=transpose_kernel,
        precision=precision,
        preferred_element_type=preferred_element_type,
        use_consistent_padding=use_consistent_padding,
    )
    if dimension_numbers is None:
        dimension_numbers = _DEFAULT_TRANSPOSE_LAYOUTS[lhs.ndim]
    dnums = _lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    strides = _ints(strides, "strides", ndim)
    rhs_dil = _ints(rhs_dilation, "rhs_dilation", ndim)
    extents = [d * (int(rhs.shape[a]) - 1) + 1 for a, d in zip(dnums.rhs_spec[2:], rhs_dil)]
    pads: str | Sequence[tuple[int, int]]
    if use_consistent_padding or (isinstance(padding, str) and padding in {"SAME", "VALID"}):
        per_dim = [padding] * ndim if isinstance(padding, str) else [tuple(p) for p in padding]
        pads = tuple(_conv_transpose_padding(e, s, p) for e, s, p in zip(extents, strides, per_dim))
    else:
        pads = padding
    if transpose_kernel:
        spatial = tuple(dnums.rhs_spec[2:])
        rhs = jnp.flip(rhs, spatial).swapaxes(dnums.rhs_spec[0], dnums.rhs_spec[1])
    y = conv_general_dilated(
        lhs,
        rhs,
        (1,) * ndim,
        pads,
        strides,
        rhs_dil,
        dnums,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return _finish(y, expected, None)


# --- pooling with flax.linen's signatures ---------------------------------------------------


def _pool(ops, inputs, window_shape, strides, padding, **options):
    x = _args.check_float_array(inputs, "inputs")
    try:
        window = tuple(operator.index(k) for k in window_shape)
    except TypeError:
        raise ValueError(f"`window_shape` (={window_shape!r}) must be a sequence of ints.") from None
    ndim = len(window)
    if ndim not in ops:
        raise ValueError(f"`window_shape` (={window_shape!r}) must have 1, 2 or 3 entries for jaxconv's pools.")
    batch_dims = x.ndim - (ndim + 1)
    if batch_dims < 0:
        raise ValueError(
            f"`inputs` (shape {tuple(x.shape)}) must have at least {ndim + 1} dimensions "
            f"({ndim} spatial and the features) for a {ndim}-d `window_shape`."
        )
    stride = _ints(strides or None, "strides", ndim)  # flax: None (or empty) is 1 in every dimension
    batch_shape = x.shape[:batch_dims]
    x = x.reshape(math.prod(batch_shape), *x.shape[batch_dims:])
    if isinstance(padding, str):
        if padding not in ("SAME", "SAME_LOWER", "VALID"):
            raise ValueError(
                f"`padding` (={padding!r}) must be 'SAME', 'VALID', 'SAME_LOWER' or {ndim} (lo, hi) pairs."
            )
        pads = tuple(_lax.padtype_to_pads(x.shape[1:-1], window, stride, padding))
    else:
        try:
            pads = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
        except (TypeError, ValueError):
            raise ValueError(f"`padding` (={padding!r}) must be 'SAME', 'VALID' or {ndim} (lo, hi) pairs.") from None
        if len(pads) != ndim:
            raise ValueError(f"`padding` (={padding!r}) must give {ndim} (lo, hi) pairs, one per window dimension.")
    y = ops[ndim](x, window, stride=stride, padding=pads, **options)
    return y.reshape(*batch_shape, *y.shape[1:])


def max_pool(
    inputs: ArrayLike,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``flax.linen.max_pool``, same signature and result, with jaxconv's max-pool rule (docs/pooling.md §4).

    ``inputs``: ``(*batch, *window dims, features)`` with any number of batch
    axes (none included); ``strides`` default 1 (Flax's default, not the
    window); ``padding``: ``"SAME"``, ``"VALID"`` or ``(lo, hi)`` pairs, at most
    half the window per side (jaxconv's pooling rule: every window holds an
    input entry; more is a ``ValueError`` naming ``padding``).  Gradient ties
    go to the first maximum in row-major window order, as ``jax.grad`` of
    Flax's pool.

    Example:
      >>> max_pool(jnp.arange(16.0).reshape(4, 4, 1), (2, 2), (2, 2))[..., 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    return _pool(_MAX_POOLS, inputs, window_shape, strides, padding)


def avg_pool(
    inputs: ArrayLike,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    count_include_pad: bool = True,
) -> jax.Array:
    """``flax.linen.avg_pool``, same signature and result, with jaxconv's average-pool rule (docs/pooling.md §2).

    Arguments as :func:`max_pool`'s; ``count_include_pad`` as Flax's (divide
    by the window's size, or by the number of unpadded entries).

    Example:
      >>> avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), (2, 2), (2, 2))[0, ..., 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    return _pool(_AVG_POOLS, inputs, window_shape, strides, padding, count_include_pad=count_include_pad)


# Forward mode names the drop-in and the op to use instead; marks them as hand rules for the harness.
conv_general_dilated = _args.reverse_mode_rule(
    conv_general_dilated, name="lax.conv_general_dilated", instead="jax.lax.conv_general_dilated"
)
conv_transpose = _args.reverse_mode_rule(conv_transpose, name="lax.conv_transpose", instead="jax.lax.conv_transpose")
max_pool = _args.reverse_mode_rule(
    max_pool, name="lax.max_pool", instead="jaxconv.reference.flax_max_pool (Flax's max_pool in plain lax)"
)
avg_pool = _args.reverse_mode_rule(
    avg_pool, name="lax.avg_pool", instead="jaxconv.reference.flax_avg_pool (Flax's avg_pool in plain lax)"
)
