r"""Matrix views of a convolution (docs/convolution.md §2-§4): im2row, row2im, M_X^im, M_F^filter.

A convolution is linear in its input and linear in its kernel, so it is a matrix
product either way round.  This module builds both matrices, their inverse
(a kernel from a matrix), and the im2row operator with its adjoint, which
``conv2d``'s im2row backward form uses.

**vec()** is the one of docs/convolution.md §3 (``M_F = (M_F1 M_F2 ...)`` blocks): the
channel planes stacked, each plane row-major.  For one image ``X`` of shape
``(H, W, C)``, ``vec(X) = X.transpose(2, 0, 1).ravel()``; for a single filter
``F`` of shape ``(KH, KW, C)`` likewise; for a response ``S`` of shape
``(Ho, Wo, O)`` the O planes are stacked.

**im2row** (docs/convolution.md §2, ``phi``).  With padded input ``xp``, stride ``s`` and
dilation ``d``,

.. math::

    [\phi(X)]_{(i, j),\,(k, p, c)} = xp_{s i + d k,\; s j + d p,\; c},

one row per output position ``(i, j)`` (row-major), one column per kernel entry
``(k, p, c)`` in HWIO order (``c`` fastest), so that ``phi(X) @ w.reshape(-1, O)``
is the convolution, ``Y = phi(X) F``.  ``phi`` only copies entries: it is linear,
``vec(phi(X)) = H vec(X)`` for a 0/1 matrix ``H``.

**row2im** (``phi*``), the adjoint ``H^T``: every row entry is added back to the
input pixel it was copied from; entries copied from padding are dropped, pixels
no window reaches get zero.  ``<phi(x), y> = <x, phi*(y)>``.

**M_X^im** (docs/convolution.md §3, :func:`patch_matrix`): ``vec(S) = M_X^im vec(F)`` for one
image and one filter; the same entries as ``phi(X)`` with the columns in
vec()'s ``(c, k, p)`` order, i.e. the blocks ``(M_X1^im M_X2^im ...)``, one
per input plane.  The worked example of docs/convolution.md §3: a 6x6 image and a 3x3 filter give 16x9;
with 4 planes 16x36.

**M_F^filter** (docs/convolution.md §3, also written ``K_conv`` or ``M``;
:func:`filter_matrix`): ``vec(S) = M_F^filter vec(X)``, a row per output entry
``(o, i, j)`` and a column per input entry ``(c, u, v)``:

.. math::

    [M_F]_{(o, i, j),\,(c, u, v)} = w_{k, p, c', o}
    \quad\text{if } u = s i + d k - lo_h,\ v = s j + d p - lo_w
    \text{ and } c \text{ is input channel } c' \text{ of } o\text{'s group},

zero elsewhere.  Example (docs/convolution.md §3): 6x6x4 input, one 3x3x4 filter: 16x144.

**K from M** (docs/convolution.md §4, :func:`kernel_from_matrix`).  Each kernel weight ``e``
occupies a fixed set ``P_e`` of entries of ``M_F``, the sets are disjoint, and
every other entry is zero.  The least-squares kernel for an arbitrary ``m`` is
therefore the mean of ``m`` over each ``P_e``, and the residual
``||m - M_F(w)||_F`` measures how far ``m`` is from any convolution.
Consequence, used by ``experiments/commutative_diagram.py``: projecting a
gradient step on M back to a kernel is gradient descent on the kernel with the
per-weight rate ``eta / |P_e|``, since ``dL/dw_e`` is the sum of ``dL/dM`` over
``P_e``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ._core import args as _args
from ._core import window as _window

__all__ = ["im2row", "row2im", "patch_matrix", "filter_matrix", "kernel_from_matrix", "vec"]


def _window_config(in_hw, kernel_size, stride, padding, dilation) -> _window.Window:
    """The validated 2-D window of an input of spatial size ``in_hw``."""
    return _window.parse(tuple(in_hw), kernel_size, stride, padding, dilation, kernel_name="kernel_size")


# --- public: phi, phi*, M_X^im ----------------------------------------------------


def vec(a):
    """vec() (docs/convolution.md §3): ``(H, W, C) -> (C*H*W,)``, planes stacked, each row-major.

    A leading batch axis is kept: ``(N, H, W, C) -> (N, C*H*W)``.
    """
    a = jnp.asarray(a)
    if a.ndim == 3:
        return a.transpose(2, 0, 1).reshape(-1)
    if a.ndim == 4:
        return a.transpose(0, 3, 1, 2).reshape(a.shape[0], -1)
    raise ValueError(f"`a` must have rank 3 (H, W, C) or 4 (N, H, W, C), got shape {tuple(a.shape)}.")


def im2row(x, kernel_size, *, stride=1, padding="VALID", dilation=1):
    """im2row ``phi`` (docs/convolution.md §2): every window of ``x`` as a row.

    Args:
      x: ``(N, H, W, C)``, floating dtype.
      kernel_size: int or pair ``(KH, KW)``.
      stride, padding, dilation: as in :func:`jaxconv.conv2d`; padding is zeros.

    Returns:
      ``(N, Ho*Wo, KH*KW*C)``: row ``i*Wo + j`` holds the window of output
      position ``(i, j)``, column ``(k*KW + p)*C + c`` its entry at kernel offset
      ``(k, p)`` and channel ``c`` (HWIO order), so for a kernel ``w``
      ``im2row(x, w.shape[:2], ...) @ w.reshape(-1, O)`` equals ``conv2d(x, w, ...)``
      reshaped to ``(N, Ho*Wo, O)``.  ``Ho = floor((H + top + bottom - d(KH-1) - 1)/s) + 1``.

    Examples:
      >>> im2row(jnp.ones((1, 4, 4, 2)), 3).shape
      (1, 4, 18)
    """
    x = _args.check_float_array(x, "x", 4)
    window = _window_config(x.shape[1:3], kernel_size, stride, padding, dilation)
    n, c = x.shape[0], x.shape[3]
    ho, wo = window.out_size
    _args.check_elements((n, ho * wo, window.volume * c), "`kernel_size`, `padding` and `x`'s shape", "phi(x)")
    return _window.patches(x, window).reshape(n, ho * wo, window.volume * c)


def row2im(rows, input_shape, kernel_size, *, stride=1, padding="VALID", dilation=1):
    """row2im ``phi*`` (docs/convolution.md §2), the adjoint of :func:`im2row`.

    ``[phi*(Y)]_(u, v, c) = sum of Y over every (row, column) that im2row copied
    from pixel (u, v, c)``: overlapping windows add, entries that came from
    padding are dropped.  ``<im2row(x), y> = <x, row2im(y, x.shape, ...)>``.

    Args:
      rows: ``(N, Ho*Wo, KH*KW*C)``, as returned by :func:`im2row`.
      input_shape: ``(N, H, W, C)``, the shape of the image to rebuild.
      kernel_size, stride, padding, dilation: as given to :func:`im2row`.

    Returns:
      ``(N, H, W, C)``.
    """
    rows = _args.check_float_array(rows, "rows", 3)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 4 or not all(_args._is_int(v) and int(v) >= 1 for v in shape):
        raise ValueError(f"`input_shape` (={input_shape!r}) must be four positive ints (N, H, W, C).")
    n, h, w, c = (int(v) for v in shape)
    _args.check_elements(shape, "`input_shape`", "the image")
    window = _window_config((h, w), kernel_size, stride, padding, dilation)
    ho, wo = window.out_size
    expected = (n, ho * wo, window.volume * c)
    if tuple(rows.shape) != expected:
        raise ValueError(
            f"`rows` has shape {tuple(rows.shape)}, but im2row of an input of shape {(n, h, w, c)} with "
            f"this kernel_size, stride, padding and dilation has shape {expected}."
        )
    return _window.unpatches(rows.reshape(n, ho, wo, *window.kernel, c), window)


def patch_matrix(x, kernel_size, *, stride=1, padding="VALID", dilation=1):
    """``M_X^im`` (docs/convolution.md §3) for one image: ``vec(S) = M_X^im vec(F)``.

    ``S = X * F`` is the response of one filter ``F`` of shape ``(KH, KW, C)``.
    Row ``i*Wo + j`` is the window at output ``(i, j)``; the columns are in the
    vec() order ``(c, k, p)``: the blocks ``(M_X1^im M_X2^im ...)``,
    one per input plane, each the plane's window read row-major (docs/convolution.md §3:
    ``X11 X12 X13 X21 X22 X23 X31 X32 X33``, then ``X12 ... X34``, ...).

    Args:
      x: one image ``(H, W, C)``, floating dtype.
      kernel_size, stride, padding, dilation: as in :func:`jaxconv.conv2d`.

    Returns:
      ``(Ho*Wo, C*KH*KW)``.  E.g. 6x6x1 with 3x3 gives 16x9; 6x6x4 gives 16x36.
    """
    x = _args.check_float_array(x, "x", 3)
    window = _window_config(x.shape[:2], kernel_size, stride, padding, dilation)
    ho, wo = window.out_size
    _args.check_elements((ho * wo, x.shape[2] * window.volume), "`kernel_size`, `padding` and `x`'s shape", "M_X^im")
    rows = _window.patches(x[None], window)[0]  # (Ho, Wo, KH, KW, C)
    ho, wo, kh, kw, c = rows.shape
    return rows.transpose(0, 1, 4, 2, 3).reshape(ho * wo, c * kh * kw)


# --- public: M_F^filter and its inverse ----------------------------------------------


@functools.lru_cache(maxsize=64)
def _structure(in_hw, kernel_shape, stride, pads, dilation, groups):
    """Where each kernel weight sits in ``M_F^filter``.

    Returns ``(rows, cols, weight, counts, shape)``: the weight with flat HWIO
    index ``weight[t]`` sits at ``(rows[t], cols[t])``; ``counts[e] = |P_e|`` is
    how many entries weight ``e`` occupies; ``shape = (O*Ho*Wo, C*H*W)``.
    Built with broadcasting, one array operation per quantity.
    """
    h, w = in_hw
    kh, kw, cg, o = kernel_shape
    (sh, sw), (dh, dw), ((top, _), (left, _)) = stride, dilation, pads
    ho, wo = (
        _window.output_size(size, lo, hi_, k, s_, d_)
        for size, (lo, hi_), k, s_, d_ in zip(in_hw, pads, (kh, kw), stride, dilation)
    )
    og = o // groups
    oo, ii, jj, kk, pp, cc = np.meshgrid(
        np.arange(o),
        np.arange(ho),
        np.arange(wo),
        np.arange(kh),
        np.arange(kw),
        np.arange(cg),
        indexing="ij",
        sparse=True,
    )
    u = sh * ii + dh * kk - top
    v = sw * jj + dw * pp - left
    channel = (oo // og) * cg + cc
    full = np.broadcast_shapes(oo.shape, ii.shape, jj.shape, kk.shape, pp.shape, cc.shape)
    valid = np.broadcast_to((u >= 0) & (u < h) & (v >= 0) & (v < w), full)
    rows = np.broadcast_to((oo * ho + ii) * wo + jj, full)[valid]
    cols = np.broadcast_to((channel * h + u) * w + v, full)[valid]
    weight = np.broadcast_to(((kk * kw + pp) * cg + cc) * o + oo, full)[valid]
    counts = np.bincount(weight, minlength=kh * kw * cg * o)
    return rows, cols, weight, counts, (o * ho * wo, groups * cg * h * w)


def _filter_config(kernel_shape, input_hw, stride, padding, dilation, groups):
    in_hw = _window.ints(input_hw, "input_hw", 2)
    kh, kw, cg, o = kernel_shape
    if not _args._is_int(groups) or int(groups) < 1:
        raise ValueError(f"`groups` (={groups!r}) must be a positive int.")
    groups = int(groups)
    if o % groups:
        raise ValueError(f"`groups` (={groups}) must divide the output channels (={o}) of the kernel.")
    window = _window_config(in_hw, (kh, kw), stride, padding, dilation)
    stride, pads, dilation = window.stride, window.padding, window.dilation
    ho, wo = window.out_size
    # The matrix, and the index arrays (one entry per weight use) built for it.
    _args.check_elements(
        (o * ho * wo, groups * cg * in_hw[0] * in_hw[1]), "`input_hw`, `padding` and the kernel's shape", "M_F^filter"
    )
    _args.check_elements(
        (o * ho * wo, kh * kw * cg), "`input_hw`, `padding` and the kernel's shape", "M_F^filter's index arrays"
    )
    return in_hw, stride, pads, dilation, groups


def filter_matrix(w, input_hw, *, stride=1, padding="VALID", dilation=1, groups=1):
    """``M_F^filter`` (docs/convolution.md §3; also written ``M`` or ``K_conv``).

    ``vec(conv2d(x, w, ...)[n]) = filter_matrix(w, x.shape[1:3], ...) @ vec(x[n])``
    with :func:`vec` (planes stacked, each row-major).

    Meant for small images: the matrix is dense, ``(O*Ho*Wo, C*H*W)``, mostly
    zeros (for 28x28x32 -> 32 channels it already holds 6e8 entries).  Built by
    one scatter of the kernel into index arrays computed once per
    configuration, no Python loop over entries; linear, differentiable in ``w``.

    Args:
      w: kernel ``(KH, KW, C // groups, O)``, floating dtype.
      input_hw: ``(H, W)`` of the input (int or pair).
      stride, padding, dilation, groups: as in :func:`jaxconv.conv2d`.

    Returns:
      ``(O*Ho*Wo, C*H*W)``.  E.g. 6x6x1 input, 3x3 filter: 16x36; 6x6x4: 16x144.
      3x3 input, 2x2 kernel: 4x9.

    Examples:
      >>> filter_matrix(jnp.ones((3, 3, 4, 1)), (6, 6)).shape
      (16, 144)
    """
    w = _args.check_float_array(w, "w", 4)
    in_hw, stride, pads, dilation, groups = _filter_config(w.shape, input_hw, stride, padding, dilation, groups)
    rows, cols, weight, _, shape = _structure(in_hw, tuple(w.shape), stride, pads, dilation, groups)
    return jnp.zeros(shape, w.dtype).at[rows, cols].set(w.reshape(-1)[weight])


def kernel_from_matrix(m, input_hw, kernel_shape, *, stride=1, padding="VALID", dilation=1, groups=1):
    """ "Get K from M" (docs/convolution.md §4): the least-squares kernel of a matrix, and the residual.

    Weight ``e`` occupies the entries ``P_e`` of :func:`filter_matrix`, the sets
    are disjoint and all other entries are structural zeros, so

    .. math::

        \\hat w = \\arg\\min_w \\|m - M_F(w)\\|_F, \\qquad
        \\hat w_e = \\frac{1}{|P_e|} \\sum_{(r, c) \\in P_e} m_{rc}.

    A weight that meets no input pixel (it only ever multiplies padding) is not
    determined by ``m``; it is returned as 0, the minimum-norm solution.

    Args:
      m: ``(O*Ho*Wo, C*H*W)``, floating dtype.
      input_hw: ``(H, W)``.
      kernel_shape: ``(KH, KW, C // groups, O)``.
      stride, padding, dilation, groups: as in :func:`jaxconv.conv2d`.

    Returns:
      ``(w, residual)``: the kernel ``(KH, KW, C // groups, O)`` and the scalar
      ``||m - filter_matrix(w)||_F``, zero exactly when ``m`` is a convolution's
      matrix.  ``kernel_from_matrix(filter_matrix(w), ...)`` returns ``w``.

    Raises:
      ValueError: ``kernel_shape`` is not four positive ints, or ``m``'s shape is
        not the ``(O*Ho*Wo, C*H*W)`` of this input size and configuration.
    """
    m = _args.check_float_array(m, "m", 2)
    if (
        not isinstance(kernel_shape, (tuple, list))
        or len(kernel_shape) != 4
        or not all(_args._is_int(v) and int(v) >= 1 for v in kernel_shape)
    ):
        raise ValueError(f"`kernel_shape` (={kernel_shape!r}) must be four positive ints (KH, KW, C // groups, O).")
    kernel_shape = tuple(int(v) for v in kernel_shape)
    in_hw, stride, pads, dilation, groups = _filter_config(kernel_shape, input_hw, stride, padding, dilation, groups)
    rows, cols, weight, counts, shape = _structure(in_hw, kernel_shape, stride, pads, dilation, groups)
    if tuple(m.shape) != shape:
        raise ValueError(
            f"`m` has shape {tuple(m.shape)}, but a kernel of shape {kernel_shape} on a {in_hw} input "
            f"(stride {stride}, padding {pads}, dilation {dilation}, groups {groups}) has a "
            f"{shape[0]}x{shape[1]} matrix (O*Ho*Wo, C*H*W)."
        )
    size = int(np.prod(kernel_shape))
    sums = jnp.zeros(size, m.dtype).at[weight].add(m[rows, cols])
    w = (sums / np.maximum(counts, 1).astype(m.dtype)).reshape(kernel_shape)
    rebuilt = jnp.zeros(shape, m.dtype).at[rows, cols].set(w.reshape(-1)[weight])
    return w, jnp.linalg.norm(m - rebuilt)
