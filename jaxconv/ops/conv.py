r"""Convolution (cross-correlation, as in every deep-learning library) in 1, 2 and 3
spatial dimensions, and its adjoint, the transposed convolution, each with a
hand-derived backward pass.

One N-d implementation under every name: ``conv1d`` (NWC input, WIO kernel),
``conv2d`` (NHWC, HWIO), ``conv3d`` (NDHWC, DHWIO), and
``conv_transpose1d/2d/3d``; the window geometry (sizes, padding, phi and
phi*) is ``jaxconv._core.window``'s.  Written below for 2-D; every sum over
``(m, p)`` runs over all spatial dimensions alike.

Forward (docs/convolution.md §1),
for input ``x`` (N, H, W, C) in NHWC, kernel ``w`` (KH, KW, C/G, O) in HWIO,
padded input ``xp`` (``lo``/``hi`` zeros on each side), stride ``s``,
dilation ``d`` and ``G`` groups:

.. math::

    y_{n,i,j,o} = b_o + \sum_{m,p} \sum_{c \in \text{group}(o)}
        xp_{n,\, s i + d m,\, s j + d p,\, c}\; w_{m,p,c \bmod C/G,\, o}

Output size per spatial dimension:
``floor((H + lo + hi - d*(KH-1) - 1) / s) + 1``.

Backward, the hand-derived formulas (docs/convolution.md §5), for the output gradient ``g = dL/dy``:

* ``dL/dw``: the correlation of the padded input with the *inserted* gradient,
  ``g`` with ``s - 1`` zeros between its entries (docs/convolution.md §5.4;
  in matrix form ``phi(X)^T dY``, §5.2).  The padded rows
  that no window reaches (the stride remainder) are cut off first.
* ``dL/dx``: the *full* correlation of the zero-inserted, zero-padded gradient with
  the kernel rotated by 180 degrees, input and output channels swapped per group
  (docs/convolution.md §5.3), cropped back to the unpadded input.  Input
  rows no window covers receive exactly zero.
* ``dL/db``: the sum of ``g`` over batch and space.

Both gradients are themselves written with ``lax.conv_general_dilated`` (the
zero insertion is its ``lhs_dilation``, the Rot180 an explicit flip), so the
rule stays differentiable: grad-of-grad goes through it.

The same formulas also run as matrix products (docs/convolution.md §5.2) (``Y = phi(X) F``,
``dF = phi(X)^T dY``, ``dX = phi*(dY F^T)``) over cache-sized batch blocks;
the planner (:func:`jaxconv.plan.conv_plan`) picks, per platform and
shape, the form that runs fastest (on CPU the matrix
products, on GPU the convolutions).  Every form is tested against
``jax.grad``.

**Transposed convolution** (docs/convolution.md §6).  ``conv_transpose(y, w)``
is the adjoint of ``x -> conv(x, w)``: ``<conv_transpose(y, w), z> =
<y, conv(z, w)>`` for every ``z``.  Its forward is therefore the ``dL/dx``
formula above with ``y`` in the place of ``g`` (Inserted, zero-padded ``y``
correlated with Rot180(``w``), or ``phi*(Y F^T)``); its backward, for the
output gradient ``G``, is the convolution itself and the kernel gradient with
the roles exchanged: ``dL/dy = conv(G, w)``, ``dL/dw = phi(G)^T Y``, ``dL/db``
the sum of ``G``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from .._core import args as _args
from .._core import window as _window
from ..plan import im2row, winograd
from ..plan import planner as plan

PrecisionLike = lax.PrecisionLike
SizeLike = _window.SizeLike
PaddingLike = _window.PaddingLike

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]


class ConvConfig(NamedTuple):
    """Static, hashable configuration of one convolution (or transposed convolution) call.

    ``window`` is the *convolution's* geometry: for a transposed convolution its
    ``in_size`` is the transposed convolution's output size.
    """

    window: _window.Window
    groups: int
    forward: str  # a key of _FORWARD_FORMS
    backward: str  # a key of _BACKWARD_FORMS
    precision: _args.Precision = None  # every product's, forward and backward (_args.precision's form)


def _dimension_numbers(ndim: int, kind: str = "forward"):
    """``lax.conv_general_dilated``'s layouts: NWC/WIO, NHWC/HWIO, NDHWC/DHWIO for the forward;
    for the kernel gradient the channels play the batch and the batch is contracted."""
    sp = "DHW"[3 - ndim :]
    if kind == "forward":
        return (f"N{sp}C", f"{sp}IO", f"N{sp}C")
    return (f"C{sp}N", f"I{sp}O", f"{sp}NC")


def _check_arrays(ndim: int, first: str, a, w, b):
    a = _args.check_float_array(a, first, ndim + 2)
    w = _args.check_float_array(w, "w", ndim + 2)
    if b is not None:
        b = _args.check_float_array(b, "b", 1)
    _args.check_same_dtype(**{first: a, "w": w, "b": b})
    return a, w, b


def _plan(window: _window.Window, batch, in_channels, out_channels, groups, *arrays) -> plan.ConvPlan:
    return plan.conv_plan(
        batch=batch,
        out_spatial=window.out_size,
        kernel_spatial=window.kernel,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        stride=window.stride,
        platform=plan.platform_of(*arrays),
        dilation=window.dilation,
        dtype=arrays[0].dtype,
    )


# --- convolution -----------------------------------------------------------------------


def _conv(ndim: int, x, w, b, stride, padding, dilation, groups, precision):
    """Validate (``ValueError`` naming each argument), plan, and run the N-d convolution."""
    x, w, b = _check_arrays(ndim, "x", x, w, b)
    groups = _args.positive_int(groups, "groups")
    precision = _args.precision(precision)
    n, c = x.shape[0], x.shape[-1]
    ci, o = w.shape[-2], w.shape[-1]
    if c != groups * ci:
        raise ValueError(
            f"input channels `x.shape[{ndim + 1}]` (={c}) must equal `groups` (={groups}) times "
            f"the kernel's input channels `w.shape[{ndim}]` (={ci})."
        )
    if o % groups:
        raise ValueError(f"`groups` (={groups}) must divide the output channels `w.shape[{ndim + 1}]` (={o}).")
    if b is not None and b.shape[0] != o:
        raise ValueError(f"`b` must have length {o} (the output channels), got shape {tuple(b.shape)}.")
    window = _window.parse(
        x.shape[1:-1], tuple(w.shape[:-2]), stride, padding, dilation, kernel_name=f"w.shape[:{ndim}]"
    )
    _window.check_sizes(window, n, c, o, "`padding`, `stride`, `dilation` and the shapes of `x` and `w`")
    chosen = _plan(window, n, c, o, groups, x, w, b)
    return _conv_vjp(ConvConfig(window, groups, chosen.forward, chosen.backward, precision), x, w, b)


_CONV_ARGS = """
    Args:
      x: input, shape ``(N, {spatial}, C)``, floating dtype.
      w: kernel, shape ``({kspatial}, C // groups, O)``, same dtype as ``x``.
      b: optional bias, shape ``(O,)``.
      stride: int or {count} ints, ``>= 1``.
      padding: ``"VALID"``, ``"SAME"``, an int, {count} ints (each dimension
        alike on both sides) or {count} ``(lo, hi)`` pairs; amounts ``>= 0``.
        Any amount the sizes allow: outputs whose window reads padding only
        are the bias.
      dilation: kernel (atrous) dilation, int or {count} ints, ``>= 1``.
      groups: feature groups; must divide ``C`` and ``O``.  ``groups == C`` with
        ``w.shape[-2] == 1`` is a depthwise convolution.
      precision: as :func:`conv2d`'s.
"""


@_args.reverse_mode_rule
def conv1d(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    """1-D convolution, NWC input and WIO kernel, with a hand-derived VJP.

    :func:`conv2d` with one spatial dimension (same formulas, same checks,
    same forms); output ``(N, Wo, O)`` with
    ``Wo = floor((W + lo + hi - d*(K-1) - 1) / s) + 1``.

    Examples:
      >>> conv1d(jnp.ones((1, 9, 2)), jnp.ones((3, 2, 4)), stride=2).shape
      (1, 4, 4)
    """
    return _conv(1, x, w, b, stride, padding, dilation, groups, precision)


@_args.reverse_mode_rule
def conv2d(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    """2-D convolution, NHWC input and HWIO kernel, with a hand-derived VJP.

    Args:
      x: input, shape ``(N, H, W, C)``, floating dtype.
      w: kernel, shape ``(KH, KW, C // groups, O)``, same dtype as ``x``.
      b: optional bias, shape ``(O,)``.
      stride: int or pair, ``>= 1``.
      padding: ``"VALID"``, ``"SAME"``, int, pair ``(ph, pw)`` or
        ``((top, bottom), (left, right))``; amounts ``>= 0``.  Any amount the
        sizes allow (FCN's ``pad=100`` included): outputs whose window reads
        padding only are the bias.
      dilation: kernel (atrous) dilation, int or pair, ``>= 1``.
      groups: feature groups; must divide ``C`` and ``O``.  ``groups == C`` with
        ``w.shape[2] == 1`` is a depthwise convolution.
      precision: the precision of every product the op runs, forward and
        backward, in whichever form (XLA's convolution, the im2row matrix
        products, Winograd's channel products and kernel transform): what
        ``lax.conv_general_dilated`` accepts (``None``, a ``lax.Precision``,
        a name such as ``"highest"``, a pair of them, a
        ``lax.DotAlgorithmPreset``).  ``None`` is lax's default
        (``jax_default_matmul_precision``).  The ``"onednn"`` forms (float32
        and bfloat16 on CPU) compute in the arrays' type whatever it says.

    Sizes: stride, dilation, every padding amount, and the padded input's
    height and width at most ``2**31 - 1``; the padded input and the output
    at most ``2**31 - 1`` elements each (``jaxconv._core.args.MAX_DIM`` and
    ``MAX_ELEMENTS``).  Past them: ``ValueError`` at trace time, naming the
    argument and the size.

    Returns:
      ``(N, Ho, Wo, O)`` with ``Ho = floor((H + top + bottom - d*(KH-1) - 1) / s) + 1``
      and likewise ``Wo``.  NaN and ``inf``, in every form, eager and under
      ``jit``: a NaN in ``x`` makes every output whose window reads it NaN
      (in all ``O`` channels of its group; ``0 * NaN`` is NaN, so a zero
      weight does not hide it), and no other output; an ``inf`` gives
      ``inf`` or NaN (``inf - inf``, ``0 * inf``) exactly in the outputs
      whose window reads it, as the direct sum does.  A NaN in ``b[o]``
      makes every output of channel ``o`` NaN.  A NaN in ``w[t, c, o]``
      (kernel offset ``t``) makes NaN every output of channel ``o`` whose
      window reads an input entry at offset ``t``; where offset ``t`` falls
      on padding it depends on the form: XLA's convolution (``"conv"``, the
      Winograd forms' fallback) skips padding, the matrix-product forms
      multiply the padded zeros (``0 * NaN``).  The Winograd forms, whose
      tile transforms would turn one ``inf`` into NaN and spread a NaN over
      a whole tile, compute the direct form's result whenever an input is
      not finite (a run-time ``lax.cond``).

    Backward: see the module docstring and docs/convolution.md §5.

    Examples:
      >>> x = jnp.ones((1, 5, 5, 1)); w = jnp.ones((3, 3, 1, 2))
      >>> conv2d(x, w, stride=2, padding=1).shape
      (1, 3, 3, 2)
    """
    return _conv(2, x, w, b, stride, padding, dilation, groups, precision)


@_args.reverse_mode_rule
def conv3d(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    """3-D convolution, NDHWC input and DHWIO kernel, with a hand-derived VJP.

    :func:`conv2d` with three spatial dimensions (same formulas, same checks,
    same forms); output ``(N, Do, Ho, Wo, O)``, each size by conv2d's formula.

    Examples:
      >>> conv3d(jnp.ones((1, 4, 5, 6, 2)), jnp.ones((2, 3, 3, 2, 4)), padding="SAME").shape
      (1, 4, 5, 6, 4)
    """
    return _conv(3, x, w, b, stride, padding, dilation, groups, precision)


conv1d.__doc__ += _CONV_ARGS.format(spatial="W", kspatial="K", count="one")
conv3d.__doc__ += _CONV_ARGS.format(spatial="D, H, W", kspatial="KD, KH, KW", count="three")


def _conv_general_dilated(
    lhs,
    rhs,
    *,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
):
    """``lax.conv_general_dilated``, every convolution the rules emit, with each spatial dimension of XLA's
    mishandled operand-swap shape given zero taps first (``jaxconv._core.window.xla_extra_taps``: the CPU
    compiler aborts the process on that shape, here or in the transposes autodiff derives for higher
    derivatives).  The same values; other convolutions pass through unchanged."""
    ndim = len(window_strides)
    lhs_dilation = tuple(lhs_dilation or (1,) * ndim)
    rhs_dilation = tuple(rhs_dilation or (1,) * ndim)
    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_axes, rhs_axes = dnums.lhs_spec[2:], dnums.rhs_spec[2:]
    taps = [
        _window.xla_extra_taps(lhs.shape[a], rhs.shape[b], s, lo, hi, ld, rd)
        for a, b, s, (lo, hi), ld, rd in zip(lhs_axes, rhs_axes, window_strides, padding, lhs_dilation, rhs_dilation)
    ]
    if any(taps):
        config = [(0, 0, 0)] * rhs.ndim
        for axis, t in zip(rhs_axes, taps):
            config[axis] = (0, t, 0)
        rhs = lax.pad(rhs, jnp.zeros((), rhs.dtype), config)
        padding = [(lo, hi + t * rd) for (lo, hi), t, rd in zip(padding, taps, rhs_dilation)]
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
    )


def _forward_conv(config: ConvConfig, x, w):
    """XLA's convolution."""
    window = config.window
    return _conv_general_dilated(
        x,
        w,
        window_strides=window.stride,
        padding=window.padding,
        rhs_dilation=window.dilation,
        dimension_numbers=_dimension_numbers(window.ndim),
        feature_group_count=config.groups,
        precision=config.precision,
    )


def _forward_im2row_blocked(config: ConvConfig, x, w):
    """``Y_b = phi(X_b) F`` over cache-sized batch blocks (jaxconv.plan.im2row)."""
    return im2row.forward_blocked(config, x, w)


# Bytes one batch block of a Winograd form may hold in transformed tiles and
# their products (alpha^ndim * tiles * (C + O) per image): measured best at
# 8-16 MiB on the benchmarks' 3x3 layers (smaller blocks repeat the kernel's
# reads, larger ones leave the cache).
_WINOGRAD_BLOCK_BYTES = 16 * 2**20


def _winograd_block(in_size, kernel, m: int, batch: int, channels: int, itemsize: int) -> int:
    """Images per block of a Winograd form whose outputs cover ``in_size - kernel + 1`` per axis."""
    tiles = math.prod(-(-(s - k + 1) // m) for s, k in zip(in_size, kernel))
    per_image = math.prod(m + k - 1 for k in kernel) * tiles * channels * itemsize
    return im2row.batch_block(batch, per_image, _WINOGRAD_BLOCK_BYTES)


def _forward_winograd(config: ConvConfig, x, w, m: int):
    """``Y`` by Winograd ``F(m, k)`` per spatial axis (stride 1, dilation 1, one group; jaxconv.plan.winograd)."""
    window = config.window
    block = _winograd_block(window.padded, window.kernel, m, x.shape[0], x.shape[-1] + w.shape[-1], x.dtype.itemsize)
    return winograd.correlate(x, w, window.padding, m, block, precision=config.precision)


def _input_grad_winograd(config: ConvConfig, w, g, m: int):
    """dL/dx, the full correlation of ``g`` with Rot180(w) (docs/convolution.md §5.3), by Winograd ``F(m, k)``.

    At stride 1 the full correlation pads ``g`` by ``k - 1 - lo`` and
    ``k - 1 - hi`` (negative amounts crop: padding past ``k - 1`` only ever
    met zeros).
    """
    window = config.window
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(window.kernel, window.padding))
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(g.shape[1:-1], pads))
    block = _winograd_block(padded, window.kernel, m, g.shape[0], g.shape[-1] + w.shape[-2], g.dtype.itemsize)
    return winograd.correlate(g, rot180_swap(w, 1), pads, m, block, precision=config.precision)


def _kernel_grad_winograd(config: ConvConfig, x, g, m: int):
    """dL/dw = sum over images and positions of ``xp[i + k] g[i]``, by Winograd ``F(k, m)`` (jaxconv.plan.winograd)."""
    window = config.window
    block = _winograd_block(window.padded, window.kernel, m, x.shape[0], x.shape[-1] + g.shape[-1], x.dtype.itemsize)
    return winograd.kernel_grad(x, g, window.padding, window.kernel, m, block, precision=config.precision)


def _onednn_geometry(config: ConvConfig):
    window = config.window
    return dict(stride=window.stride, padding=window.padding, dilation=window.dilation, groups=config.groups)


# The "onednn" forms: each of the three formulas as a custom call into oneDNN's
# kernels (jaxconv.plan.onednn: a compiled XLA FFI handler; only when forced).  A
# custom call has no derivative of its own; each formula is bilinear, so its
# tangent is the same formula of the tangents, written here with the lax forms.
# First-order gradients run the custom calls (the conv rule calls them
# directly); second and higher orders differentiate through the lax tangents.


def _onednn_kernel(name: str, *args, **kwargs):
    """``jaxconv.plan.onednn.<name>(*args, **kwargs)``, the module imported on first use (the optional
    extra: it loads the compiled handler, only when an ``"onednn"`` form runs)."""
    from ..plan import onednn

    return getattr(onednn, name)(*args, **kwargs)


def _onednn_formula(kernel: str, shape, shape_name, lax_formula, doc: str):
    """One of the three formulas, ``(config, a, b) -> out``, as a oneDNN custom call with the lax tangent.

    ``kernel`` names the function of :mod:`jaxconv.plan.onednn`; ``shape(config,
    a, b)`` is the output's shape, passed to it as ``shape_name`` (the forward
    reads it off its inputs).  Bilinear: the tangent is ``lax_formula(da, b) +
    lax_formula(a, db)``.  ``precision`` has no effect on the custom call (oneDNN
    computes in the arrays' type); the lax tangents honour it.
    """

    @partial(jax.custom_jvp, nondiff_argnums=(0,))
    def formula(config: ConvConfig, a, b):
        extra = {shape_name: shape(config, a, b)} if shape_name else {}
        return _onednn_kernel(kernel, a, b, **extra, **_onednn_geometry(config))

    @formula.defjvp
    def formula_jvp(config, primals, tangents):
        (a, b), (da, db) = primals, tangents
        return formula(config, a, b), lax_formula(config, da, b) + lax_formula(config, a, db)

    formula.__doc__ = doc
    return formula


_forward_onednn = _onednn_formula(
    "forward",
    lambda config, x, w: (x.shape[0], *config.window.out_size, w.shape[-1]),
    None,
    _forward_conv,
    "``Y`` by oneDNN's forward convolution (docs/convolution.md §1).",
)
_input_grad_onednn = _onednn_formula(
    "input_grad",
    lambda config, w, g: (g.shape[0], *config.window.in_size, w.shape[-2] * config.groups),
    "x_shape",
    lambda *a: _input_grad_conv(*a),
    "dL/dx (docs/convolution.md §5.3) by oneDNN's backward-data convolution, from (w, g).",
)
_kernel_grad_onednn = _onednn_formula(
    "kernel_grad",
    lambda config, x, g: (*config.window.kernel, x.shape[-1] // config.groups, g.shape[-1]),
    "w_shape",
    lambda *a: _kernel_grad_conv(*a),
    "dL/dw (docs/convolution.md §5.4) by oneDNN's backward-weights convolution, from (x, g).",
)


def _kernel_grad_onednn_blocked(config: ConvConfig, x, g):
    """dL/dw by oneDNN's backward weights over batch blocks of at most ``plan.ONEDNN_DW_BLOCK`` images (one
    custom call: the handler runs the vmapped blocks on one primitive), the blocks' sums added in XLA.  The same
    sum over images and positions as :func:`_kernel_grad_onednn` (docs/convolution.md §5.4), accumulated in
    shorter runs: on some layers oneDNN's one long float32 sum errs over twice the direct form's."""
    n = x.shape[0]
    block = im2row.batch_block(n, 1, plan.ONEDNN_DW_BLOCK)  # the largest divisor of n up to the block size
    blocked = lambda a: a.reshape(n // block, block, *a.shape[1:])
    return jax.vmap(partial(_kernel_grad_onednn, config))(blocked(x), blocked(g)).sum(0)


def _forward(config: ConvConfig, x, w, b):
    y = _FORWARD_FORMS[config.forward](config, x, w)
    return y if b is None else y + b


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_vjp(config: ConvConfig, x, w, b):
    return _forward(config, x, w, b)


def _conv_fwd(config: ConvConfig, x, w, b):
    # Residuals are the inputs autodiff keeps, x and w, and no more: whether a
    # bias gradient is owed travels as an empty pytree, () or None, not as b.
    return _forward(config, x, w, b), (x, w, None if b is None else ())


def _conv_bwd(config: ConvConfig, residuals, g):
    x, w, has_bias = residuals
    dx, dw = _grads(config, config.backward, x, x.shape, w, g)
    db = None if has_bias is None else g.sum(axis=tuple(range(g.ndim - 1)))
    return dx, dw, db


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)


# --- the backward formulas -------------------------------------------------------------


def rot180_swap(w, groups: int):
    """Rot180 of each filter with input and output channels swapped per group.

    ``(*K, C/G, O)`` -> ``(*K, O/G, C)``: every spatial axis reversed, the
    kernel of dL/dx, where the output gradient's O channels are the input and
    x's C channels the output.
    """
    ndim = w.ndim - 2
    *kernel, ci, o = w.shape
    w = w[(slice(None, None, -1),) * ndim]
    w = w.reshape(*kernel, ci, groups, o // groups)
    w = w.transpose(*range(ndim), ndim + 2, ndim + 1, ndim)
    return w.reshape(*kernel, o // groups, groups * ci)


def _input_grad_conv(config: ConvConfig, w, g):
    """dL/dx = (Inserted, zero-padded g) * Rot180(w), cropped to x (docs/convolution.md §5.3)."""
    window = config.window
    # Full correlation pads the inserted gradient by extent - 1 on each side;
    # taking away the forward padding crops dx back to the unpadded input,
    # and the remainder restores rows past the last window (they get zero).
    pads = [(e - 1 - lo, e - 1 - hi + r) for e, (lo, hi), r in zip(window.extent, window.padding, window.remainder)]
    return _conv_general_dilated(
        g,
        rot180_swap(w, config.groups),
        window_strides=(1,) * window.ndim,
        padding=pads,
        lhs_dilation=window.stride,  # the zero insertion: s - 1 zeros between entries
        rhs_dilation=window.dilation,
        dimension_numbers=_dimension_numbers(window.ndim),
        feature_group_count=config.groups,
        precision=config.precision,
    )


def _kernel_grad_conv(config: ConvConfig, x, g):
    """dL/dw = padded x correlated with Inserted g (docs/convolution.md §5.4), batch summed.

    The batch axis is the contraction axis of this correlation, the channel
    axis of ``x`` plays the batch, and the inserted ``g`` is the filter.
    """
    window = config.window
    pads = [(lo, hi - r) for (lo, hi), r in zip(window.padding, window.remainder)]
    return _conv_general_dilated(
        x,
        g,
        window_strides=window.dilation,
        padding=pads,
        rhs_dilation=window.stride,  # Inserted Grad
        dimension_numbers=_dimension_numbers(window.ndim, "kernel"),
        batch_group_count=config.groups,
        precision=config.precision,
    )


def _grads_im2row_blocked(config: ConvConfig, x, x_shape, w, g, need_dx: bool, need_dw: bool):
    """``dF = sum_b phi(X_b)^T dY_b``, ``dX_b = phi*(dY_b F^T)`` over batch blocks (jaxconv.plan.im2row)."""
    return im2row.grads_blocked(config, x, x_shape, w, g, need_dx, need_dw)


def _grads(config: ConvConfig, form: str, x, x_shape, w, g, need_dx: bool = True, need_dw: bool = True):
    """(dL/dx, dL/dw) of ``conv(x, w)`` for the output gradient ``g`` by the backward ``form``.

    ``x`` may be None when only ``dL/dx`` is needed (``x_shape`` gives its shape).
    """
    dx_form, dw_form = _BACKWARD_FORMS[form]
    if dx_form in _FORMULA_PAIRS:  # Winograd and oneDNN: (dx from w and g, dw from x and g)
        input_grad, kernel_grad = _FORMULA_PAIRS[dx_form]
        return (input_grad(config, w, g) if need_dx else None, kernel_grad(config, x, g) if need_dw else None)
    if dx_form == dw_form != "conv":
        blocked = im2row.grads_blocked if dx_form == "im2row_blocked" else im2row.grads
        return blocked(config, x, x_shape, w, g, need_dx, need_dw)
    dx = dw = None
    if need_dx:
        dx = (
            _input_grad_conv(config, w, g)
            if dx_form == "conv"
            else _grads_im2row_blocked(config, None, x_shape, w, g, True, False)[0]
        )
    if need_dw:
        dw = (
            _kernel_grad_conv(config, x, g)
            if dw_form == "conv"
            else _grads_im2row_blocked(config, x, x_shape, w, g, False, True)[1]
        )
    return dx, dw


# --- transposed convolution --------------------------------------------------------------


def _conv_transpose(ndim: int, y, w, b, stride, padding, output_padding, dilation, groups, precision):
    """Validate, plan and run the N-d transposed convolution (the adjoint of :func:`_conv` in ``x``)."""
    y, w, b = _check_arrays(ndim, "y", y, w, b)
    groups = _args.positive_int(groups, "groups")
    precision = _args.precision(precision)
    n, o = y.shape[0], y.shape[-1]
    kernel, ci, wo = tuple(w.shape[:-2]), w.shape[-2], w.shape[-1]
    if o != wo:
        raise ValueError(
            f"`y`'s channels `y.shape[{ndim + 1}]` (={o}) must equal the kernel's output channels "
            f"`w.shape[{ndim + 1}]` (={wo}): y is the output of the convolution this transposes."
        )
    if o % groups:
        raise ValueError(f"`groups` (={groups}) must divide the kernel's output channels `w.shape[{ndim + 1}]` (={o}).")
    c = groups * ci
    if b is not None and b.shape[0] != c:
        raise ValueError(
            f"`b` must have length {c} (groups * w.shape[{ndim}], the output channels), got shape {tuple(b.shape)}."
        )
    window = _window.parse_transpose(
        y.shape[1:-1], kernel, stride, padding, output_padding, dilation, kernel_name=f"w.shape[:{ndim}]"
    )
    _window.check_sizes(window, n, c, o, "`padding`, `stride`, `dilation` and the shapes of `y` and `w`")
    chosen = _plan(window, n, c, o, groups, y, w, b)
    return _conv_transpose_vjp(ConvConfig(window, groups, chosen.forward, chosen.backward, precision), y, w, b)


def _transpose_forward(config: ConvConfig, y, w, b):
    c = w.shape[-2] * config.groups
    x_shape = (y.shape[0], *config.window.in_size, c)
    x, _ = _grads(config, config.backward, None, x_shape, w, y, need_dw=False)
    return x if b is None else x + b


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv_transpose_vjp(config: ConvConfig, y, w, b):
    return _transpose_forward(config, y, w, b)


def _conv_transpose_fwd(config: ConvConfig, y, w, b):
    return _transpose_forward(config, y, w, b), (y, w, None if b is None else ())


def _conv_transpose_bwd(config: ConvConfig, residuals, g):
    # The output is linear in y and in w: <conv_transpose(y, w), G> = <y, conv(G, w)>,
    # so dL/dy is the convolution of G, and dL/dw is the convolution's kernel
    # gradient with G in the place of x and y in the place of its output gradient.
    y, w, has_bias = residuals
    dy = _FORWARD_FORMS[config.forward](config, g, w)
    _, dw = _grads(config, config.backward, g, g.shape, w, y, need_dx=False)
    db = None if has_bias is None else g.sum(axis=tuple(range(g.ndim - 1)))
    return dy, dw, db


_conv_transpose_vjp.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


_TRANSPOSE_DOC = """{n}-D transposed convolution ({layout} output), the adjoint of :func:`conv{n}d` in its input.

    ``conv_transpose{n}d(y, w, ...)`` is ``x -> conv{n}d(x, w, stride=stride,
    padding=padding, dilation=dilation, groups=groups)`` transposed:
    ``<conv_transpose{n}d(y, w), z> = <y, conv{n}d(z, w)>`` for every ``z`` of
    the output's shape.  The forward is the Inserted-gradient formula of the
    convolution's ``dL/dx`` (docs/convolution.md §5.3, §6), the backward the
    convolution and its kernel gradient.

    Args:
      y: ``(N, {spatial}, O)``, floating dtype: has the convolution's output channels.
      w: ``({kspatial}, C // groups, O)``, in the *convolution's* layout.
      b: optional bias ``(C,)``, added to the output.
      stride, dilation: int or {count} ints ``>= 1``, the convolution's.
      padding: the convolution's, in the same forms as :func:`conv{n}d`'s:
        ``"VALID"`` (the default, no padding), ``"SAME"``, an int, {count}
        ints or {count} ``(lo, hi)`` pairs; explicit amounts are cropped off
        the output here.  ``"SAME"`` is the adjoint of :func:`conv{n}d` with
        ``padding="SAME"``: the output has the smallest size that
        convolution maps to ``y``'s, ``(n - 1)*s + 1`` per dimension, plus
        ``output_padding``, and the convolution's own ``"SAME"`` padding for
        that size (``output_padding = stride - 1`` gives ``n*s``, TensorFlow's
        ``conv2d_transpose`` with ``padding="SAME"``).
      output_padding: int or {count} ints, ``0 <= output_padding < stride``:
        extra entries at the high end of each dimension, which pick among the
        input sizes a strided convolution maps to ``y``'s size.
      groups: as in :func:`conv{n}d`.
      precision: as in :func:`conv2d`: every product, forward and backward
        (``None``: lax's default; no effect on the float32 ``"onednn"`` forms).

    Returns:
      ``(N, {spatial_out}, C)``, per dimension
      ``(n - 1)*s - lo - hi + d*(k - 1) + 1 + output_padding`` (``"SAME"``:
      ``(n - 1)*s + 1 + output_padding``).  With explicit padding, equal to
      PyTorch's ``conv_transpose{n}d(y, weight, stride, padding,
      output_padding, groups, dilation)`` (channels first) with ``weight`` =
      ``w`` moved to ``(O, C // groups, {kspatial})``.
    """


@_args.reverse_mode_rule
def conv_transpose1d(
    y: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    output_padding: SizeLike = 0,
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    return _conv_transpose(1, y, w, b, stride, padding, output_padding, dilation, groups, precision)


@_args.reverse_mode_rule
def conv_transpose2d(
    y: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    output_padding: SizeLike = 0,
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    return _conv_transpose(2, y, w, b, stride, padding, output_padding, dilation, groups, precision)


@_args.reverse_mode_rule
def conv_transpose3d(
    y: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: SizeLike = 1,
    padding: PaddingLike = "VALID",
    output_padding: SizeLike = 0,
    dilation: SizeLike = 1,
    groups: int = 1,
    precision: PrecisionLike = None,
) -> Array:
    return _conv_transpose(3, y, w, b, stride, padding, output_padding, dilation, groups, precision)


conv_transpose1d.__doc__ = _TRANSPOSE_DOC.format(
    n=1, layout="NWC", spatial="W", spatial_out="Wo", kspatial="K", count="one"
)
conv_transpose2d.__doc__ = (
    _TRANSPOSE_DOC.format(n=2, layout="NHWC", spatial="H, W", spatial_out="Ho, Wo", kspatial="KH, KW", count="two")
    + """
    Examples:
      >>> y = jnp.ones((1, 3, 3, 4)); w = jnp.ones((3, 3, 2, 4))
      >>> conv_transpose2d(y, w, stride=2, padding=1, output_padding=1).shape
      (1, 6, 6, 2)
    """
)
conv_transpose3d.__doc__ = _TRANSPOSE_DOC.format(
    n=3, layout="NDHWC", spatial="D, H, W", spatial_out="Do, Ho, Wo", kspatial="KD, KH, KW", count="three"
)


# The form names are the planner's (plan.CONV_FORWARD_FORMS, plan.CONV_BACKWARD_FORMS,
# listed once there); each table below is built from them, so a name without
# an implementation fails at import.  Every entry computes the same formulas and
# is tested against jax.grad (tests/test_conv.py runs each).

# Backward forms whose dx and dw are not the same-named form: "mixed".
# dX = phi*(dY F^T) contracts over the O/G output channels: with few of them
# that product runs far from the GEMM peak, while dX as the Rot180
# correlation is a stride-1 convolution XLA runs as fast as a forward.
# dF = phi(X)^T dY contracts over batch and space and stays a GEMM.
# (Winograd, stride 1 only (plan.winograd_fits): dX as F(m, k) on the rotated
# kernel, dF as F(k, m) with gradient tiles as filters.  oneDNN: its backward
# data and backward weights as XLA FFI custom calls, float32 or bfloat16, only when forced.)
_SPLIT_BACKWARD = {"mixed": ("conv", "im2row_blocked")}

# backward form name -> (dx form, dw form).
_BACKWARD_FORMS = {name: _SPLIT_BACKWARD.get(name, (name, name)) for name in plan.CONV_BACKWARD_FORMS}


def _finite_or_direct(winograd_formula, direct_formula):
    """``(config, a, b) -> winograd_formula(...)`` when every entry of ``a`` and ``b`` is finite, else the
    direct form's ``direct_formula(...)`` (a ``lax.cond`` in the program, decided at run time).

    Winograd's transforms add and subtract the inputs of a whole tile, so one
    ``inf`` becomes ``inf - inf = NaN`` and a NaN or ``inf`` reaches every
    output of its tile, also those whose window never reads it.  The direct
    form gives what the formula gives: ``inf`` where the direct sum is ``inf``,
    NaN only in the outputs that read a NaN (or an ``inf`` times 0).  Checking
    finiteness costs one pass over the two inputs; the direct form runs only
    when one is not finite.
    """

    def formula(config: ConvConfig, a, b):
        finite = jnp.isfinite(a).all() & jnp.isfinite(b).all()
        return lax.cond(finite, partial(winograd_formula, config), partial(direct_formula, config), a, b)

    return formula


# Backward forms whose dx and dw are one pair of functions (config, w, g) and (config, x, g).
_FORMULA_PAIRS = {
    **{
        name: (
            _finite_or_direct(partial(_input_grad_winograd, m=m), _input_grad_conv),
            _finite_or_direct(partial(_kernel_grad_winograd, m=m), _kernel_grad_conv),
        )
        for name, m in plan.WINOGRAD_TILES.items()
    },
    "onednn": (_input_grad_onednn, _kernel_grad_onednn),
    "onednn_blocked": (_input_grad_onednn, _kernel_grad_onednn_blocked),
}

# forward form name -> forward(config, x, w) -> y without bias; tested like the backward.
_FORWARD_FORMS = {
    name: {
        "conv": _forward_conv,
        "im2row_blocked": _forward_im2row_blocked,
        **{
            form: _finite_or_direct(partial(_forward_winograd, m=m), _forward_conv)
            for form, m in plan.WINOGRAD_TILES.items()
        },
        "onednn": _forward_onednn,
    }[name]
    for name in plan.CONV_FORWARD_FORMS
}
