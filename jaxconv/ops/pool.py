r"""Average and max pooling in 1, 2 and 3 spatial dimensions with hand-derived backward passes.

One N-d implementation per kind under the names ``avg_pool1d/2d/3d`` and
``max_pool1d/2d/3d`` (NWC, NHWC, NDHWC); the window geometry is
``jaxconv._core.window``'s.  Written below for 2-D; every sum and every
offset runs over all spatial dimensions alike, in row-major order.

Both take ``x`` (N, H, W, C) in NHWC, a window ``(KH, KW)``, a stride
``(sh, sw)`` (default: the window) and a padding ``((top, bottom), (left, right))``;
per spatial dimension the output size is ``floor((H + top + bottom - KH) / sh) + 1``.
Output ``(i, j)`` looks at padded rows ``sh*i + m`` and columns ``sw*j + p`` for
``0 <= m < KH, 0 <= p < KW``, i.e. unpadded ``(sh*i + m - top, sw*j + p - left)``.

In the notation of docs/pooling.md §1 the windows are the rows of ``phi(X)`` (im2row, one row
per output position and channel), and ``phi*`` (row2im) is its adjoint: it adds
every row's entries back to the pixels they were read from, so overlapping
windows add.  ``phi*`` is written here as ``KH*KW`` zero-inserted pieces
(``lax.pad`` with ``s - 1`` interior zeros, the inserted gradient of
docs/convolution.md §5.3), one per
window offset ``(m, p)``, each shifted to ``(m - top, p - left)``.

**Average pooling** (docs/pooling.md §2; the global pool is §3):

.. math::

    y_{n,i,j,c} = \frac{1}{D_{ij}} \sum_{m,p} xp_{n,\, s_h i + m,\, s_w j + p,\, c},
    \qquad
    \frac{\partial L}{\partial x} = \phi^*\!\Big(\frac{g}{D}\,\mathbf 1^\top\Big)

with ``D_ij = KH*KW`` (``count_include_pad=True``, padding counts as zeros) or
the number of real (unpadded) pixels in window ``(i, j)``
(``count_include_pad=False``).  The backward spreads each output gradient,
divided by its window's divisor, evenly over the window (for ``k x k`` windows
with stride ``k``: ``grad x_ij = (1/k^2) grad y_(i/k)(j/k)``, here for any stride and padding).
The all-ones window factorises into rows times columns, so the spread is done
first along H (``KH`` pieces) then along W (``KW`` pieces): ``KH + KW`` shifted
adds instead of ``KH * KW``.

**Max pooling** (docs/pooling.md §4): ``Y = phi(X) S`` with ``S`` selecting one entry
of each row of ``phi(X)``, and

.. math::

    \frac{\partial L}{\partial x} = \phi^*\big(\tfrac{dL}{dY}\, S^\top\big):

each output gradient goes, whole, to the one selected pixel of its window;
overlapping windows add.  Padding counts as ``-inf``.

Which entry ``S`` selects is XLA's rule (``select_and_scatter`` with ``>=``,
what ``jax.grad`` of ``lax.reduce_window(x, -inf, lax.max)`` runs), reproduced
exactly so the hand rule equals ``jax.grad`` even on ties: the window is read in
row-major order ``(m, p)``, padded positions included, and the running choice
is replaced by each next candidate unless ``choice >= candidate``.  So:

* without NaN, the gradient goes to the **first maximum** in row-major window
  order (ties: all-equal windows, integer-valued inputs, overlapping windows);
* a window of ``-inf`` selects its first position; if that is padding, the
  gradient is dropped.  (No window reads padding only: padding is at most half
  the window, :func:`jaxconv._core.window.check_pool_padding`.)
* **NaN**: the output of a window holding a NaN is NaN, eager and under
  ``jit``, whatever XLA fuses it with (set explicitly: XLA's CPU max reductions
  drop NaN, see :func:`_window_max`; ``reference.max_pool2d`` puts it back the
  same way).  A NaN compares false, so it takes the choice over and hands it
  to the next candidate: the gradient goes to the first maximum among the
  entries *after the window's last NaN*, or to that NaN itself when it is the
  window's last entry.  The gradient stays finite (it is ``g``, wherever it
  lands); it equals ``jax.grad``'s.

Max pooling saves ``S``, not ``x``: under ``jax.vjp``/``jax.grad`` the forward
computes ``Y`` and, from the same window entries, ``S`` as the selected offset
per output (int8; int32 for windows of more than 127 entries), and keeps only
that: ``N*Ho*Wo*C`` bytes where autodiff keeps ``x`` (``N*H*W*C*itemsize``)
for ``select_and_scatter``.  The backward routes ``g`` by ``S`` alone; it never
reads ``x``.

Forms (chosen by :func:`jaxconv.plan.pool_form`; both are the
same formula and both are tested against ``jax.grad``):

* ``"slices"``: any window, stride and padding.  The ``KH*KW`` window
  positions are strided slices of the padded input (the columns of
  ``phi(X)``); a running comparison over them gives the selected offset per
  output (``S``).  ``phi*`` adds the masked gradients back one stride phase at
  a time: padded row ``sh*a + r`` is reached by the offsets ``m = r, r + sh,
  ...`` from output rows ``a - (m - r)/sh``, so each phase is a sum of masked
  ``g`` shifted by whole output rows and columns, and the ``sh*sw`` phases
  interleave into the padded grid by a reshape (the zero-inserted pieces
  without the zeros).  No ``select_and_scatter``, no scatter, no gather.
* ``"reshape"``: stride equal to the window (non-overlapping windows tile the
  padded input).  The padded, cropped input is reshaped to
  ``(N, Ho, KH, Wo, KW, C)``; ``phi`` and ``phi*`` are then reshapes, with no
  shifted pieces at all.  Chosen automatically when it applies.

Speed (CPU, float32, x of 128x32x32x64, jitted; medians of 11, two runs, on a
2-core machine shared with other work, so rough: runs differ by up to 50%).  Max pooling,
backward only (the pullback of ``jax.vjp``, given ``g``): 14-22 ms at 2x2/2,
19-22 ms at 3x3/2 VALID, 23-26 ms at 3x3/2 SAME and 47-54 ms at 3x3/1 SAME,
against 120-146, 146-162, 184-201 and 398-441 ms for ``jax.grad``'s
select_and_scatter: 6.5-8.5x faster.  Recomputing ``S`` from ``x`` in the
backward, as this module did before, took 20-23, 31-32, 51-54 and 441-463 ms
(at stride 1 XLA fused the selection into every one of the ``KH*KW`` pieces
and so recomputed it per piece).  ``Y`` is the elementwise maximum of the same
``KH*KW`` window entries that ``S`` scans, with NaN set where one is NaN, so
under ``jax.vjp`` XLA computes ``Y`` and ``S`` from one read of the window:
2x2/2, 3x3/2 VALID, 3x3/2 SAME, 3x3/1 SAME take 3-4, 4-5, 23-27 and 41-43 ms
for ``Y`` and ``S``, 18-20, 18-19, 45-50 and 82-84 ms with the backward
(``Y`` and ``dL/dx``).  ``Y`` alone takes 2-5, 2, 19-20 and 39-45 ms; with
padding XLA first writes out the ``-inf``-padded input, a copy of ``x``.
(Measured against ``Y`` from XLA's max reduction, as before NaN was set
explicitly: ``Y`` 2, 6, 6-9 and 41-68 ms, ``Y`` and ``S`` 4-6, 9-13, 29-32 and
95-96 ms, with the backward 20-22, 23-26, 44-59 and 101-107 ms; the
reduction's ``Y`` with a second, NaN-detecting ``reduce_window`` took 5-6x as
long at 2x2/2.)  Autodiff's forward and backward took 150-180, 189-192, 208-236
and 460-517 ms when last measured.  Average pooling is 1.1-1.5x faster than
autodiff.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from .._core import args as _args
from .._core import window as _window
from ..plan import planner as plan

__all__ = ["avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d"]


class PoolConfig(NamedTuple):
    """Static, hashable configuration of one pooling call."""

    window: _window.Window  # the geometry: in_size, kernel (the window), stride, padding; dilation 1
    count_include_pad: bool  # average pooling only
    form: str  # a name in plan.POOL_FORMS

    @property
    def ndim(self) -> int:
        return self.window.ndim


# The forms are plan.POOL_FORMS; the planner (:func:`jaxconv.plan.pool_form`)
# picks "reshape" for non-overlapping windows and "slices" otherwise, and
# ``jaxconv.plan.forms(pool=...)`` forces one ("reshape" falls back to
# "slices" where windows overlap).


def _config(x, ndim: int, window, stride, padding, count_include_pad=True) -> PoolConfig:
    """Validate the arguments (``ValueError`` naming each) into a :class:`PoolConfig`."""
    x = _args.check_float_array(x, "x", ndim + 2)
    in_size = tuple(x.shape[1:-1])
    if min(in_size) < 1:
        sizes = " and ".join(_window.dim_names(ndim)) if ndim > 1 else "width"
        raise ValueError(f"`x` must have a {sizes} >= 1 to pool, got shape {tuple(x.shape)}.")
    kernel = _window.ints(window, "window", ndim)
    # At most half the window per side (pool=True): every window then holds an
    # input pixel (no -inf max of padding alone, no 0/0 average with
    # count_include_pad=False).
    geometry = _window.parse(
        in_size, kernel, kernel if stride is None else stride, padding, kernel_name="window", pool=True
    )
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise ValueError(f"`count_include_pad` (={count_include_pad!r}) must be a bool.")
    _window.check_sizes(geometry, x.shape[0], x.shape[-1], x.shape[-1], "`padding`, `window` and `stride`")
    return PoolConfig(geometry, bool(count_include_pad), plan.pool_form(geometry.kernel, geometry.stride))


# --- window geometry ------------------------------------------------------------


def _real_counts(config: PoolConfig) -> list[np.ndarray]:
    """Per spatial dimension and output position, how many of the window's entries are real (unpadded)."""
    win = config.window
    counts = []
    for size, (lo, _), k, s, out in zip(win.in_size, win.padding, win.kernel, win.stride, win.out_size):
        start = s * np.arange(out) - lo
        counts.append(np.clip(np.minimum(start + k, size) - np.maximum(start, 0), 0, None))
    return counts


def _divisor(config: PoolConfig, dtype):
    """``D``: the window volume, or the ``(*out, 1)`` real-entry counts (a constant)."""
    if config.count_include_pad:
        return jnp.asarray(config.window.volume, dtype)
    total = np.ones((), np.int64)
    for counts in _real_counts(config):
        total = np.multiply.outer(total, counts)
    return jnp.asarray(total[..., None], dtype)


def _spatial_cfg(config: PoolConfig, per_dim):
    """A ``lax.pad`` config: N and C untouched, ``per_dim`` for each spatial dimension."""
    return ((0, 0, 0), *per_dim, (0, 0, 0))


def _offsets(config: PoolConfig):
    """The window offsets in row-major order (XLA's scan order)."""
    return list(itertools.product(*(range(k) for k in config.window.kernel)))


def _window_pieces(x, config: PoolConfig, fill):
    """The columns of ``phi(x)``: for each offset ``t`` in row-major order the
    ``(N, *out, C)`` array of padded entries ``s*i + t``."""
    win = config.window
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), _spatial_cfg(config, ((lo, hi, 0) for lo, hi in win.padding)))
    n, c = x.shape[0], x.shape[-1]
    pieces = []
    for offset in _offsets(config):
        limit = tuple(t + s * (m - 1) + 1 for t, s, m in zip(offset, win.stride, win.out_size))
        pieces.append(lax.slice(xp, (0, *offset, 0), (n, *limit, c), (1, *win.stride, 1)))
    return pieces


def _place(piece, config: PoolConfig, dim: int, offset: int):
    """Put an output-grid array on the *padded* input grid along spatial dimension
    ``dim`` (a piece of ``phi*``): entry ``i`` lands at padded position
    ``s*i + offset``, ``s - 1`` zeros inserted between entries.  Every amount
    is ``>= 0`` (the window fits in the padded input); :func:`_unpad` crops
    once at the end.  (Cropping here, with negative low padding, makes XLA's
    CPU fusion up to 10x slower.)"""
    win = config.window
    (lo, hi), s, size = win.padding[dim], win.stride[dim], win.in_size[dim]
    cfg = [(0, 0, 0)] * piece.ndim
    out = piece.shape[dim + 1]
    cfg[dim + 1] = (offset, size + lo + hi - offset - s * (out - 1) - 1, s - 1)
    return lax.pad(piece, jnp.zeros((), piece.dtype), cfg)


def _unpad(x, config: PoolConfig, dim: int):
    """Crop the padding off a padded-grid array along spatial dimension ``dim``."""
    (lo, _), size = config.window.padding[dim], config.window.in_size[dim]
    start = [0] * x.ndim
    limit = list(x.shape)
    start[dim + 1], limit[dim + 1] = lo, lo + size
    return lax.slice(x, start, limit)


def _tiles(x, config: PoolConfig, fill):
    """Non-overlapping windows: the padded input cropped to ``out*k`` per dimension and
    reshaped to ``(N, o_1, k_1, o_2, k_2, ..., C)`` (phi as a reshape)."""
    win = config.window
    n, c = x.shape[0], x.shape[-1]
    cfg = (
        (lo, m * k - size - lo, 0) for size, (lo, _), k, m in zip(win.in_size, win.padding, win.kernel, win.out_size)
    )
    split = [d for m, k in zip(win.out_size, win.kernel) for d in (m, k)]
    return lax.pad(x, jnp.asarray(fill, x.dtype), _spatial_cfg(config, cfg)).reshape(n, *split, c)


def _untile(tiles, config: PoolConfig):
    """The adjoint of :func:`_tiles` for ``fill = 0``: reshape back, then drop the
    padding and put zeros on the entries past the last window (phi*)."""
    win = config.window
    n, c = tiles.shape[0], tiles.shape[-1]
    flat = tiles.reshape(n, *(m * k for m, k in zip(win.out_size, win.kernel)), c)
    cfg = (
        (-lo, size + lo - m * k, 0) for size, (lo, _), k, m in zip(win.in_size, win.padding, win.kernel, win.out_size)
    )
    return lax.pad(flat, jnp.zeros((), flat.dtype), _spatial_cfg(config, cfg))


def _tile_view(a, ndim: int):
    """An output-grid array ``(N, *out, C)`` with a size-1 window axis after each spatial axis."""
    index = (slice(None),) + (slice(None), None) * ndim + (slice(None),)
    return a[index]


# --- average pooling --------------------------------------------------------------


def _avg_pool(ndim: int, x, window, stride, padding, count_include_pad):
    config = _config(x, ndim, window, stride, padding, count_include_pad)
    return _avg_pool_vjp(config, x)


@_args.reverse_mode_rule
def avg_pool2d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> Array:
    """Average pooling over ``window`` (NHWC) with the hand-derived backward (docs/pooling.md §2).

    Args:
      x: input, shape ``(N, H, W, C)``, floating dtype.
      window: ``(KH, KW)``, int or pair, ``>= 1``.
      stride: int or pair ``>= 1``; ``None`` (default) means the window.
      padding: ``"VALID"``, ``"SAME"``, int, pair ``(ph, pw)`` or
        ``((top, bottom), (left, right))``; amounts ``>= 0`` and, per side, at
        most half the window (``pad <= KH // 2`` top and bottom, ``<= KW // 2``
        left and right; PyTorch's rule, which ``"SAME"`` always meets), so
        that every window holds an input pixel.
      count_include_pad: divide by the window area ``KH*KW`` (True: padding
        counts as zeros) or by the number of real pixels in each window (False).

    Sizes (both pools): window, stride, padding and the padded height and width
    at most ``2**31 - 1``, the padded input and the output at most ``2**31 - 1``
    elements (``jaxconv._core.args.MAX_DIM``, ``MAX_ELEMENTS``); past them, or with
    padding past half the window, a ``ValueError`` at trace time naming the
    argument and the size.

    Returns:
      ``(N, Ho, Wo, C)`` with ``Ho = floor((H + top + bottom - KH) / sh) + 1``,
      likewise ``Wo``; ``y_ij = (1/D_ij) sum of window (i, j)``.  NaN: a window
      holding a NaN gives NaN (through the sum), eager and under ``jit``; the
      other windows are unaffected.

    Backward: ``dL/dx = phi*(g / D)``: each output gradient divided by its
    window's divisor and added to every pixel of the window (docs/pooling.md §2;
    see the module docstring).

    Examples:
      >>> avg_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    return _avg_pool(2, x, window, stride, padding, count_include_pad)


@_args.reverse_mode_rule
def avg_pool1d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> Array:
    """Average pooling over ``(N, W, C)``: :func:`avg_pool2d` with one spatial dimension.

    ``window``, ``stride``: an int (or a 1-tuple); ``padding``: ``"VALID"``,
    ``"SAME"``, an int, ``(p,)`` or ``((left, right),)``, at most half the window
    per side.  Output ``(N, Wo, C)``, ``Wo = floor((W + left + right - K) / s) + 1``.

    Examples:
      >>> avg_pool1d(jnp.arange(6.0).reshape(1, 6, 1), 2)[0, :, 0]
      Array([0.5, 2.5, 4.5], dtype=float32)
    """
    return _avg_pool(1, x, window, stride, padding, count_include_pad)


@_args.reverse_mode_rule
def avg_pool3d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> Array:
    """Average pooling over ``(N, D, H, W, C)``: :func:`avg_pool2d` with three spatial dimensions.

    ``window``, ``stride``: an int or a triple; ``padding``: ``"VALID"``,
    ``"SAME"``, an int, three ints or three ``(lo, hi)`` pairs, at most half
    the window per side.  Output ``(N, Do, Ho, Wo, C)``, each by avg_pool2d's formula.

    Examples:
      >>> avg_pool3d(jnp.ones((1, 4, 4, 4, 2)), 2).shape
      (1, 2, 2, 2, 2)
    """
    return _avg_pool(3, x, window, stride, padding, count_include_pad)


def _avg_forward(config: PoolConfig, x):
    divisor = _divisor(config, x.dtype)
    win = config.window
    if config.form == "reshape":
        return _tiles(x, config, 0).sum(axis=tuple(2 + 2 * d for d in range(win.ndim))) / divisor
    sums = lax.reduce_window(
        x,
        np.zeros((), x.dtype),
        lax.add,
        (1, *win.kernel, 1),
        (1, *win.stride, 1),
        ((0, 0), *win.padding, (0, 0)),
    )
    return sums / divisor


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _avg_pool_vjp(config: PoolConfig, x):
    return _avg_forward(config, x)


def _avg_pool_fwd(config: PoolConfig, x):
    # The backward needs only shapes (in the config): no residual arrays.
    return _avg_forward(config, x), None


def _avg_pool_bwd(config: PoolConfig, _, g):
    spread = g / _divisor(config, g.dtype)
    win = config.window
    if config.form == "reshape":
        n, c = g.shape[0], g.shape[-1]
        split = [d for m, k in zip(win.out_size, win.kernel) for d in (m, k)]
        return (_untile(jnp.broadcast_to(_tile_view(spread, win.ndim), (n, *split, c)), config),)
    # phi*(spread 1^T): the all-ones window factorises over the dimensions, so
    # the spread runs one dimension at a time (sum of k_d placed pieces, then
    # the crop), sum(k) shifted adds instead of prod(k).
    for dim, k in enumerate(win.kernel):
        spread = _unpad(sum(_place(spread, config, dim, t) for t in range(k)), config, dim)
    return (spread,)


_avg_pool_vjp.defvjp(_avg_pool_fwd, _avg_pool_bwd)


# --- max pooling ------------------------------------------------------------------


def _max_pool(ndim: int, x, window, stride, padding):
    config = _config(x, ndim, window, stride, padding)
    return _max_pool_vjp(config, x)


@_args.reverse_mode_rule
def max_pool2d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
) -> Array:
    """Max pooling over ``window`` (NHWC) with the hand-derived backward (docs/pooling.md §4).

    Args:
      x: input, shape ``(N, H, W, C)``, floating dtype.
      window: ``(KH, KW)``, int or pair, ``>= 1``.
      stride: int or pair ``>= 1``; ``None`` (default) means the window.
      padding: ``"VALID"``, ``"SAME"``, int, pair ``(ph, pw)`` or
        ``((top, bottom), (left, right))``; amounts ``>= 0`` and at most half
        the window per side, as :func:`avg_pool2d`'s; padding counts as ``-inf``.

    Returns:
      ``(N, Ho, Wo, C)`` with ``Ho = floor((H + top + bottom - KH) / sh) + 1``,
      likewise ``Wo``; the maximum of each window.  NaN: a window holding a
      NaN gives NaN, eager and under ``jit``; the other windows are unaffected.

    Backward: ``dL/dx = phi*(dL/dY S^T)``: each output gradient goes whole to
    the selected pixel of its window, the first maximum in row-major window
    order (XLA's rule, so ties agree with ``jax.grad`` exactly); overlapping
    windows add.  NaN: see the module docstring.

    Examples:
      >>> max_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    return _max_pool(2, x, window, stride, padding)


@_args.reverse_mode_rule
def max_pool1d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
) -> Array:
    """Max pooling over ``(N, W, C)``: :func:`max_pool2d` with one spatial dimension.

    Arguments as :func:`avg_pool1d`'s; ties go to the first maximum, padding is
    ``-inf``, a NaN makes its window's output NaN, as in :func:`max_pool2d`.

    Examples:
      >>> max_pool1d(jnp.array([[[1.0], [3.0], [2.0], [0.0]]]), 2)[0, :, 0]
      Array([3., 2.], dtype=float32)
    """
    return _max_pool(1, x, window, stride, padding)


@_args.reverse_mode_rule
def max_pool3d(
    x: ArrayLike,
    window: _window.SizeLike,
    *,
    stride: _window.SizeLike | None = None,
    padding: _window.PaddingLike = "VALID",
) -> Array:
    """Max pooling over ``(N, D, H, W, C)``: :func:`max_pool2d` with three spatial dimensions.

    Arguments as :func:`avg_pool3d`'s; the window is scanned in row-major
    ``(depth, height, width)`` order, so ties go to the first maximum in it,
    as XLA's ``select_and_scatter`` (``jax.grad`` of the reduction) does.

    Examples:
      >>> max_pool3d(jnp.ones((1, 4, 4, 4, 2)), 2, stride=1).shape
      (1, 3, 3, 3, 2)
    """
    return _max_pool(3, x, window, stride, padding)


def _max_forward(config: PoolConfig, x):
    return _window_max(_candidates(x, config))


def _window_max(candidates):
    """``Y``: the elementwise ``lax.max`` of the window entries (the columns of
    ``phi(x)``), NaN wherever one of them is NaN.

    The NaN is set explicitly because XLA's CPU backend drops it from max
    reductions (vectorised, a NaN is treated as missing: the reduction of
    ``[0, 0, 0, nan]`` came out 0 or ``-inf``) and from an elementwise max fused
    into a reduction that follows it (``max_pool2d(x).sum()`` under ``jit``).
    ``lax.max`` orders ``-0.0`` below ``0.0`` as the reductions do, so ``Y`` is
    bit for bit the reduction's wherever no NaN is involved."""
    y = candidates[0]
    has_nan = jnp.isnan(y)
    for candidate in candidates[1:]:
        y = lax.max(y, candidate)
        has_nan = has_nan | jnp.isnan(candidate)
    return jnp.where(has_nan, jnp.asarray(jnp.nan, y.dtype), y)


def _selection(candidates):
    """``S`` as the selected offset per output: XLA's scan over the window in
    row-major order, replacing the running choice unless ``choice >= candidate``
    (the first maximum; the NaN behaviour of the module docstring)."""
    index_dtype = jnp.int8 if len(candidates) <= 127 else jnp.int32
    best = candidates[0]
    chosen = jnp.zeros(best.shape, index_dtype)
    for k, candidate in enumerate(candidates[1:], start=1):
        replace = ~(best >= candidate)
        best = jnp.where(replace, candidate, best)
        chosen = jnp.where(replace, jnp.asarray(k, index_dtype), chosen)
    return chosen


def _candidates(x, config: PoolConfig):
    """The window entries in row-major order, padding as ``-inf``: the columns of
    ``phi(x)``, as tile slices ("reshape") or strided slices ("slices")."""
    if config.form == "reshape":
        tiles = _tiles(x, config, -jnp.inf)
        return [
            tiles[(slice(None),) + tuple(v for t in offset for v in (slice(None), t)) + (slice(None),)]
            for offset in _offsets(config)
        ]
    return _window_pieces(x, config, -jnp.inf)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool_vjp(config: PoolConfig, x):
    return _max_forward(config, x)


def _max_pool_fwd(config: PoolConfig, x):
    # The residual is S, the selected offset per output (int8 for windows of
    # up to 127 entries): N*prod(out)*C bytes instead of x's N*prod(in)*C*itemsize,
    # and the backward routes g by it without x.  y and S come from the same
    # window entries, so XLA reads them once for both (module docstring,
    # "Speed"); y is `_max_forward`'s, bit for bit.
    candidates = _candidates(x, config)
    return _window_max(candidates), _selection(candidates)


def _max_pool_bwd(config: PoolConfig, chosen, g):
    # phi*(dY S^T) from S alone: no x; the shapes come from the config (x's N
    # and C are g's).
    win = config.window
    if config.form == "reshape":
        # dY S^T as tiles (N, o_1, k_1, ..., C): g where the offset is the
        # chosen one, else 0.  One broadcast comparison, not one per offset:
        # when S is computed in the same program, XLA fuses it into its users,
        # and prod(k) users each recomputing the prod(k)-step selection made
        # compiling a 1x127 window take ~20 s.
        offsets = jnp.arange(win.volume, dtype=chosen.dtype).reshape(1, *(d for k in win.kernel for d in (1, k)), 1)
        tiles = jnp.where(_tile_view(chosen, win.ndim) == offsets, _tile_view(g, win.ndim), jnp.zeros((), g.dtype))
        return (_untile(tiles, config),)
    return (_route_by_phases(config, chosen, g),)


def _route_by_phases(config: PoolConfig, chosen, g):
    """phi*(dY S^T) for any window and stride, one stride phase at a time.

    Along each dimension, padded position ``R = s*a + r`` (``0 <= r < s``) is
    reached by the window offsets ``t = r, r + s, ...`` from output positions
    ``i = a - (t - r)/s``, so phase ``r`` (one per dimension) of the padded
    gradient is a sum of masked ``g`` shifted by whole output positions, and
    the phases interleave into the padded grid by stacks and a reshape (the
    "reshape" form is the case ``s = k``: one offset per phase, no shift).

    This is the zero-inserted pieces of the module docstring written without
    interior padding: ``g`` and ``S`` are padded once (``g`` with zeros, ``S``
    with ``-1``, which matches no offset) and every piece is a plain slice of
    them.  (With ``S`` an int8 residual, XLA's CPU code for the ``KH*KW``
    zero-inserted ``lax.pad`` pieces fused into one loop ran about 2.5x slower
    than with int32, 3x3/2: about 50 ms against 20; the slices of a padded
    int8 ``S`` run as fast as int32, about 20 ms.)"""
    win = config.window
    ndim = win.ndim
    n, c = g.shape[0], g.shape[-1]
    # Phase lengths: the padded grid, rounded up to whole strides.
    lengths = tuple(-(-p // s) for p, s in zip(win.padded, win.stride))
    # Largest shift, in output positions, of any offset within its phase.
    shifts = tuple((k - 1) // s for k, s in zip(win.kernel, win.stride))
    cfg = _spatial_cfg(config, ((e, a - m, 0) for e, a, m in zip(shifts, lengths, win.out_size)))
    chosen_p = lax.pad(chosen, jnp.asarray(-1, chosen.dtype), cfg)
    zero = jnp.zeros((), g.dtype)
    g_p = lax.pad(g, zero, cfg)

    def phase(r):
        acc = None
        for t in itertools.product(*(range(ri, k, s) for ri, k, s in zip(r, win.kernel, win.stride))):
            shift = [(ti - ri) // s for ti, ri, s in zip(t, r, win.stride)]
            start = (0, *(e - d for e, d in zip(shifts, shift)), 0)
            limit = (n, *(e - d + a for e, d, a in zip(shifts, shift, lengths)), c)
            flat = int(np.ravel_multi_index(t, win.kernel))
            piece = jnp.where(lax.slice(chosen_p, start, limit) == flat, lax.slice(g_p, start, limit), zero)
            acc = piece if acc is None else acc + piece
        # Stride > window: no offset reaches this phase.
        return jnp.zeros((n, *lengths, c), g.dtype) if acc is None else acc

    def interleave(r, dim):
        # Stack the phases of dimensions >= dim: the phase axis of dimension
        # `dim` goes right after its position axis.
        if dim == ndim:
            return phase(r)
        return jnp.stack([interleave(r + (ri,), dim + 1) for ri in range(win.stride[dim])], axis=dim + 2)

    padded = interleave((), 0).reshape(n, *(a * s for a, s in zip(lengths, win.stride)), c)
    return lax.slice(
        padded,
        (0, *(lo for lo, _ in win.padding), 0),
        (n, *(lo + size for (lo, _), size in zip(win.padding, win.in_size)), c),
    )


_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)
