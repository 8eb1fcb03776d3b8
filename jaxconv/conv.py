r"""2-D convolution (cross-correlation, as in every deep-learning library) with a
hand-derived backward pass.

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
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _args, plan
from .matrix import _output_hw, _patches, _unpatches

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


class ConvConfig(NamedTuple):
    """Static, hashable configuration of one conv2d call."""

    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    strategy: str  # backward: a key of _BACKWARD_STRATEGIES
    forward: str = "conv"  # forward: a key of _FORWARD_STRATEGIES


@_args.reverse_mode_rule
def conv2d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1):
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

    Sizes: stride, dilation, every padding amount, and the padded input's
    height and width at most ``2**31 - 1``; the padded input and the output
    at most ``2**31 - 1`` elements each (``jaxconv._args.MAX_DIM`` and
    ``MAX_ELEMENTS``).  Past them: ``ValueError`` at trace time, naming the
    argument and the size.

    Returns:
      ``(N, Ho, Wo, O)`` with ``Ho = floor((H + top + bottom - d*(KH-1) - 1) / s) + 1``
      and likewise ``Wo``.  NaN: a NaN in ``x`` makes every output whose window
      reads it NaN (in all ``O`` channels of its group; ``0 * NaN`` is NaN,
      so a zero weight does not hide it); a NaN in ``w[..., o]`` or ``b[o]``
      makes every output of channel ``o`` NaN (padding too is ``0 * NaN``).
      Eager and under ``jit``.

    Backward: see the module docstring and docs/convolution.md §5.

    Example:
      >>> x = jnp.ones((1, 5, 5, 1)); w = jnp.ones((3, 3, 1, 2))
      >>> conv2d(x, w, stride=2, padding=1).shape
      (1, 3, 3, 2)
    """
    x = _args.check_float_array(x, "x", 4)
    w = _args.check_float_array(w, "w", 4)
    if b is not None:
        b = _args.check_float_array(b, "b", 1)
    _args.check_same_dtype(x=x, w=w, b=b)
    stride = _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    if not _args._is_int(groups) or int(groups) < 1:
        raise ValueError(f"`groups` (={groups!r}) must be a positive int.")
    groups = int(groups)
    n, h, wd, c = x.shape
    kh, kw, ci, o = w.shape
    if c != groups * ci:
        raise ValueError(
            f"input channels `x.shape[3]` (={c}) must equal `groups` (={groups}) times "
            f"the kernel's input channels `w.shape[2]` (={ci})."
        )
    if o % groups:
        raise ValueError(f"`groups` (={groups}) must divide the output channels `w.shape[3]` (={o}).")
    if b is not None and b.shape[0] != o:
        raise ValueError(f"`b` must have length {o} (the output channels), got shape {tuple(b.shape)}.")
    pads = _args.padding_2d(padding, (h, wd), (kh, kw), stride, dilation)
    _args.check_window_fits((h, wd), pads, (kh, kw), dilation, "w.shape[:2]")
    _args.check_window_op_sizes(
        x.shape, pads, _output_hw((h, wd), pads, (kh, kw), stride, dilation), o,
        "`padding`, `stride`, `dilation` and the shapes of `x` and `w`",
    )
    chosen = plan.conv_plan(
        batch=n, out_spatial=_output_hw((h, wd), pads, (kh, kw), stride, dilation), kernel_spatial=(kh, kw),
        in_channels=c, out_channels=o, groups=groups, stride=stride, platform=plan.platform_of(x, w, b),
    )
    config = ConvConfig(stride, pads, dilation, groups, chosen.backward, chosen.forward)
    return _conv2d(config, x, w, b)


def _forward_conv(config: ConvConfig, x, w):
    """XLA's convolution."""
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=config.stride,
        padding=config.padding,
        rhs_dilation=config.dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=config.groups,
    )


def _phi_by_group(config: ConvConfig, x, w_shape):
    """phi(X) per group, ``(G, N*Ho*Wo, KH*KW*C/G)`` (im2row, docs/convolution.md §2; HWIO column order)."""
    kh, kw, cg, _ = w_shape
    groups = config.groups
    rows = _patches(x, (kh, kw), config.stride, config.padding, config.dilation)  # (N, Ho, Wo, KH, KW, C)
    m = rows.shape[0] * rows.shape[1] * rows.shape[2]
    return rows.reshape(m, kh * kw, groups, cg).transpose(2, 0, 1, 3).reshape(groups, m, kh * kw * cg)


def _kernel_by_group(w, groups: int):
    """The kernel matrix F per group, ``(G, KH*KW*C/G, O/G)``."""
    kh, kw, cg, o = w.shape
    return w.reshape(kh * kw * cg, groups, o // groups).transpose(1, 0, 2)


def _images_per_block(config: ConvConfig, x, w_shape) -> int:
    """The batch block of the blocked im2row forms: its phi fits ``_IM2ROW_BLOCK_BYTES``."""
    kh, kw, cg, _ = w_shape
    out_hw = _output_hw(x.shape[1:3], config.padding, (kh, kw), config.stride, config.dilation)
    entries = plan.phi_entries_per_image(out_hw, (kh, kw), cg * config.groups)
    return _batch_block(x.shape[0], entries * x.dtype.itemsize, _IM2ROW_BLOCK_BYTES)


def _forward_im2row(config: ConvConfig, x, w):
    """``Y = phi(X) F`` (docs/convolution.md §2), one matrix product per group."""
    n, o = x.shape[0], w.shape[3]
    ho, wo = _output_hw(x.shape[1:3], config.padding, w.shape[:2], config.stride, config.dilation)
    y = jnp.matmul(_phi_by_group(config, x, w.shape), _kernel_by_group(w, config.groups),
                   precision=lax.Precision.HIGHEST)  # (G, N*Ho*Wo, O/G)
    return y.transpose(1, 0, 2).reshape(n, ho, wo, o)


def _forward_im2row_blocked(config: ConvConfig, x, w):
    """``Y_b = phi(X_b) F`` over cache-sized batch blocks (see :func:`_backward_im2row_blocked`)."""
    n = x.shape[0]
    block = _images_per_block(config, x, w.shape)
    if block == n:
        return _forward_im2row(config, x, w)
    y = lax.map(lambda xb: _forward_im2row(config, xb, w), x.reshape(n // block, block, *x.shape[1:]))
    return y.reshape(n, *y.shape[2:])


def _forward(config: ConvConfig, x, w, b):
    y = _FORWARD_STRATEGIES[config.forward](config, x, w)
    if b is not None:
        y = y + b
    return y


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv2d(config: ConvConfig, x, w, b):
    return _forward(config, x, w, b)


def _conv2d_fwd(config: ConvConfig, x, w, b):
    # Residuals are the inputs autodiff keeps, x and w, and no more: whether a
    # bias gradient is owed travels as an empty pytree, () or None, not as b.
    return _forward(config, x, w, b), (x, w, None if b is None else ())


def _stride_remainder(size: int, lo: int, hi: int, k: int, s: int, d: int) -> int:
    """Padded rows past the last window: ``(size + lo + hi - d(k-1) - 1) mod s``."""
    return (size + lo + hi - d * (k - 1) - 1) % s


def rot180_swap(w, groups: int):
    """Rot180 of each filter with input and output channels swapped per group.

    ``(KH, KW, C/G, O)`` -> ``(KH, KW, O/G, C)``: the kernel of dL/dx, where the
    output gradient's O channels are the input and x's C channels the output.
    """
    kh, kw, ci, o = w.shape
    w = w[::-1, ::-1]
    w = w.reshape(kh, kw, ci, groups, o // groups)
    w = w.transpose(0, 1, 4, 3, 2)
    return w.reshape(kh, kw, o // groups, groups * ci)


def _input_grad_conv(config: ConvConfig, x_shape, w, g):
    """dL/dx = (Inserted, zero-padded g) * Rot180(w), cropped to x (docs/convolution.md §5.3)."""
    (sh, sw), (dh, dw), groups = config.stride, config.dilation, config.groups
    _, h, wd, _ = x_shape
    kh, kw = w.shape[:2]
    pads = []
    for size, (lo, hi), k, s, d in zip((h, wd), config.padding, (kh, kw), (sh, sw), (dh, dw)):
        extent = d * (k - 1)
        rem = _stride_remainder(size, lo, hi, k, s, d)
        # Full correlation pads the inserted gradient by extent on each side;
        # taking away the forward padding crops dx back to the unpadded input,
        # and the remainder restores rows past the last window (they get zero).
        pads.append((extent - lo, extent - hi + rem))
    return lax.conv_general_dilated(
        g,
        rot180_swap(w, groups),
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=config.stride,  # the zero insertion: s - 1 zeros between entries
        rhs_dilation=config.dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _kernel_grad_conv(config: ConvConfig, x, w_shape, g):
    """dL/dw = padded x correlated with Inserted g (docs/convolution.md §5.4), batch summed.

    The batch axis is the contraction axis of this correlation, the channel
    axis of ``x`` plays the batch, and the inserted ``g`` is the filter.
    """
    kh, kw = w_shape[:2]
    _, h, wd, _ = x.shape
    pads = []
    for size, (lo, hi), k, s, d in zip((h, wd), config.padding, (kh, kw), config.stride, config.dilation):
        pads.append((lo, hi - _stride_remainder(size, lo, hi, k, s, d)))
    return lax.conv_general_dilated(
        x,
        g,
        window_strides=config.dilation,
        padding=pads,
        rhs_dilation=config.stride,  # Inserted Grad
        dimension_numbers=("CHWN", "IHWO", "HWNC"),
        batch_group_count=config.groups,
    )


def _backward_conv(config: ConvConfig, x, w, g):
    """The convolution form (seeds 001 and 003): (dL/dx, dL/dw)."""
    return _input_grad_conv(config, x.shape, w, g), _kernel_grad_conv(config, x, w.shape, g)


def _backward_im2row(config: ConvConfig, x, w, g, need_dx: bool = True):
    """The im2row form (docs/convolution.md §5.2): (dL/dx, dL/dw).

    With ``phi`` = im2row (one row per output position, one column per kernel
    entry, HWIO order) and per group ``F`` the ``(KH*KW*C/G, O/G)`` kernel matrix,
    ``dY`` the ``(N*Ho*Wo, O/G)`` output gradient:
    ``dF = phi(X)^T dY`` and ``dX = phi*(dY F^T)``, ``phi*`` = row2im, the adjoint.
    Groups are a batch of these matrix products; stride, padding and dilation
    live in ``phi`` and ``phi*`` (``jaxconv.matrix``).  With ``need_dx=False``
    only ``dL/dw`` is computed (dL/dx is None).
    """
    kh, kw, cg, o = w.shape
    groups = config.groups
    og = o // groups
    n, ho, wo, _ = g.shape
    m = n * ho * wo
    phi = _phi_by_group(config, x, w.shape)  # (G, N*Ho*Wo, KH*KW*C/G)
    dy = g.reshape(m, groups, og).transpose(1, 0, 2)  # (G, N*Ho*Wo, O/G)
    hi = lax.Precision.HIGHEST
    df = jnp.matmul(phi.transpose(0, 2, 1), dy, precision=hi)
    dw = df.transpose(1, 0, 2).reshape(w.shape)
    if not need_dx:
        return None, dw
    f = _kernel_by_group(w, groups)  # (G, KH*KW*C/G, O/G)
    drows = jnp.matmul(dy, f.transpose(0, 2, 1), precision=hi)  # (G, N*Ho*Wo, KH*KW*C/G)
    drows = drows.reshape(groups, n, ho, wo, kh, kw, cg).transpose(1, 2, 3, 4, 5, 0, 6)
    drows = drows.reshape(n, ho, wo, kh, kw, groups * cg)
    dx = _unpatches(drows, x.shape[1:3], config.stride, config.padding, config.dilation)
    return dx, dw


# Bytes of phi(X) one block of the blocked im2row form may hold: a few MiB,
# so that a block is written and read back while still in cache.
_IM2ROW_BLOCK_BYTES = 4 * 2**20


def _batch_block(n: int, bytes_per_image: int, budget: int) -> int:
    """The largest divisor of ``n`` whose images' phi rows fit in ``budget`` (at least 1)."""
    fits = max(1, budget // max(1, bytes_per_image))
    return max(d for d in range(1, min(n, fits) + 1) if n % d == 0)


def _backward_im2row_blocked(config: ConvConfig, x, w, g, need_dx: bool = True):
    """The im2row form (docs/convolution.md §5.2) over blocks of the batch: (dL/dx, dL/dw).

    ``phi(X)^T dY`` is a sum over the rows of phi, one row per output position,
    so it splits over images: ``dF = sum_b phi(X_b)^T dY_b``; and ``phi*`` acts
    on each image alone, so ``dX_b = phi*(dY_b F^T)``.  A ``lax.scan`` over
    batch blocks runs :func:`_backward_im2row` on each block, sized so that
    the block's phi (``B*Ho*Wo`` rows of ``KH*KW*C``) stays in cache; the
    products are then GEMMs at close to the machine's matrix-product speed,
    where the whole phi would be ``KH*KW`` times the input, streamed from
    memory.  Same formula, same sums, only grouped by image.
    """
    n = x.shape[0]
    block = _images_per_block(config, x, w.shape)
    if block == n:
        return _backward_im2row(config, x, w, g, need_dx)
    blocks = n // block

    def one_block(dw, xg):
        xb, gb = xg
        dxb, dwb = _backward_im2row(config, xb, w, gb, need_dx)
        return dw + dwb, dxb

    dw, dx = lax.scan(
        one_block,
        jnp.zeros(w.shape, w.dtype),
        (x.reshape(blocks, block, *x.shape[1:]), g.reshape(blocks, block, *g.shape[1:])),
    )
    return (None if dx is None else dx.reshape(x.shape)), dw


def _backward_mixed(config: ConvConfig, x, w, g):
    """dL/dx in the convolution form, dL/dw in the blocked im2row form.

    ``dX = phi*(dY F^T)`` contracts over the O/G output channels: with few of
    them that product runs far from the GEMM peak, while ``dX`` as the
    Rot180 correlation (docs/convolution.md §5.3) is a plain stride-1 convolution, which
    XLA runs as fast as a forward.  ``dF = phi(X)^T dY`` contracts over the
    batch and space and stays a GEMM.
    """
    return _input_grad_conv(config, x.shape, w, g), _backward_im2row_blocked(config, x, w, g, need_dx=False)[1]


def _conv2d_bwd(config: ConvConfig, residuals, g):
    x, w, has_bias = residuals
    dx, dw = _BACKWARD_STRATEGIES[config.strategy](config, x, w, g)
    db = g.sum(axis=(0, 1, 2)) if has_bias is not None else None
    return dx, dw, db


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)

# name -> backward(config, x, w, g) -> (dx, dw).  Every entry computes the same
# formula and is tested against jax.grad (tests/test_conv.py runs each).
_BACKWARD_STRATEGIES = {
    "conv": _backward_conv,
    "im2row": _backward_im2row,
    "im2row_blocked": _backward_im2row_blocked,
    "mixed": _backward_mixed,
}

# name -> forward(config, x, w) -> y without bias; tested like the backward.
_FORWARD_STRATEGIES = {
    "conv": _forward_conv,
    "im2row_blocked": _forward_im2row_blocked,
}
