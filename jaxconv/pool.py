r"""2-D average and max pooling with hand-derived backward passes.

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
  the window, :func:`jaxconv._args.check_pool_padding`.)
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

Strategies (chosen by :func:`jaxconv.plan.pool_form`; both are the
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

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _args, plan


class PoolConfig(NamedTuple):
    """Static, hashable configuration of one pooling call."""

    in_hw: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    count_include_pad: bool  # average pooling only
    strategy: str

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(
            _args.output_size(size, lo, hi, k, s)
            for size, (lo, hi), k, s in zip(self.in_hw, self.padding, self.window, self.stride)
        )


# The registered forms; the planner (:func:`jaxconv.plan.pool_form`) picks
# "reshape" for non-overlapping windows and "slices" otherwise, and
# ``jaxconv.plan.forms(pool=...)`` forces one ("reshape" falls back to
# "slices" where windows overlap).
_STRATEGIES = plan.POOL_FORMS


def _config(x, window, stride, padding, count_include_pad=True) -> PoolConfig:
    """Validate the arguments (``ValueError`` naming each) into a :class:`PoolConfig`."""
    x = _args.check_float_array(x, "x", 4)
    window = _args.pair(window, "window")
    stride = window if stride is None else _args.pair(stride, "stride")
    in_hw = tuple(int(v) for v in x.shape[1:3])
    if min(in_hw) < 1:
        raise ValueError(f"`x` must have a height and width >= 1 to pool, got shape {tuple(x.shape)}.")
    pads = _args.padding_2d(padding, in_hw, window, stride)
    # At most half the window per side: every window then holds an input pixel
    # (no -inf max of padding alone, no 0/0 average with count_include_pad=False).
    _args.check_pool_padding(padding, pads, window)
    _args.check_window_fits(in_hw, pads, window, (1, 1), "window")
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise ValueError(f"`count_include_pad` (={count_include_pad!r}) must be a bool.")
    config = PoolConfig(in_hw, window, stride, pads, bool(count_include_pad), plan.pool_form(window, stride))
    _args.check_window_op_sizes(x.shape, pads, config.out_hw, x.shape[3], "`padding`, `window` and `stride`")
    return config


# --- window geometry ------------------------------------------------------------


def _real_counts(config: PoolConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per output row and column, how many of the window's rows/columns are real pixels."""
    counts = []
    for size, (lo, _), k, s, out in zip(config.in_hw, config.padding, config.window, config.stride, config.out_hw):
        start = s * np.arange(out) - lo
        counts.append(np.clip(np.minimum(start + k, size) - np.maximum(start, 0), 0, None))
    return counts[0], counts[1]


def _divisor(config: PoolConfig, dtype):
    """``D``: the window area, or the ``(Ho, Wo, 1)`` real-pixel counts (a constant)."""
    if config.count_include_pad:
        kh, kw = config.window
        return jnp.asarray(kh * kw, dtype)
    rows, cols = _real_counts(config)
    return jnp.asarray((rows[:, None] * cols[None, :])[:, :, None], dtype)


def _padded(x, config: PoolConfig, fill):
    """``x`` padded with ``fill``, as ``lax.pad`` config (N and C untouched)."""
    (top, bottom), (left, right) = config.padding
    return lax.pad(x, jnp.asarray(fill, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _window_pieces(x, config: PoolConfig, fill):
    """The columns of ``phi(x)``: for each offset ``(m, p)`` in row-major order the
    ``(N, Ho, Wo, C)`` array of padded pixels ``(sh*i + m, sw*j + p)``."""
    xp = _padded(x, config, fill)
    n, _, _, c = x.shape
    (ho, wo), (sh, sw) = config.out_hw, config.stride
    kh, kw = config.window
    return [
        lax.slice(xp, (0, m, p, 0), (n, m + sh * (ho - 1) + 1, p + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
        for m in range(kh)
        for p in range(kw)
    ]


def _place(piece, config: PoolConfig, row_offset: int | None = None, col_offset: int | None = None):
    """Put an output-grid array on the *padded* input grid (a piece of ``phi*``):
    along H (if ``row_offset`` is given) entry ``i`` lands at padded row
    ``sh*i + row_offset``, ``sh - 1`` zeros inserted between entries, and
    likewise along W.  Every amount is ``>= 0`` (the window fits in the padded
    input); :func:`_unpad` crops once at the end.  (Cropping here, with negative
    low padding, makes XLA's CPU fusion up to 10x slower.)"""
    cfg = [(0, 0, 0)] * 4
    for axis, offset, size, (lo, hi), s in zip((1, 2), (row_offset, col_offset), config.in_hw, config.padding,
                                               config.stride):
        if offset is not None:
            out = piece.shape[axis]
            cfg[axis] = (offset, size + lo + hi - offset - s * (out - 1) - 1, s - 1)
    return lax.pad(piece, jnp.zeros((), piece.dtype), cfg)


def _unpad(x, config: PoolConfig, rows: bool = True, cols: bool = True):
    """Crop the padding off a padded-grid array (along H and/or W)."""
    (h, w), ((top, _), (left, _)) = config.in_hw, config.padding
    start = [0, top if rows else 0, left if cols else 0, 0]
    limit = [x.shape[0], top + h if rows else x.shape[1], left + w if cols else x.shape[2], x.shape[3]]
    return lax.slice(x, start, limit)


def _tiles(x, config: PoolConfig, fill):
    """Non-overlapping windows: the padded input cropped to ``Ho*KH x Wo*KW`` and
    reshaped to ``(N, Ho, KH, Wo, KW, C)`` (phi as a reshape)."""
    n, h, w, c = x.shape
    (ho, wo), (kh, kw) = config.out_hw, config.window
    (top, _), (left, _) = config.padding
    cfg = ((0, 0, 0), (top, ho * kh - h - top, 0), (left, wo * kw - w - left, 0), (0, 0, 0))
    return lax.pad(x, jnp.asarray(fill, x.dtype), cfg).reshape(n, ho, kh, wo, kw, c)


def _untile(tiles, config: PoolConfig):
    """The adjoint of :func:`_tiles` for ``fill = 0``: reshape back, then drop the
    padding and put zeros on the rows/columns past the last window (phi*)."""
    n, ho, kh, wo, kw, c = tiles.shape
    (h, w), ((top, _), (left, _)) = config.in_hw, config.padding
    flat = tiles.reshape(n, ho * kh, wo * kw, c)
    cfg = ((0, 0, 0), (-top, h + top - ho * kh, 0), (-left, w + left - wo * kw, 0), (0, 0, 0))
    return lax.pad(flat, jnp.zeros((), flat.dtype), cfg)


# --- average pooling --------------------------------------------------------------


@_args.reverse_mode_rule
def avg_pool2d(x, window, *, stride=None, padding="VALID", count_include_pad=True):
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
    elements (``jaxconv._args.MAX_DIM``, ``MAX_ELEMENTS``); past them, or with
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

    Example:
      >>> avg_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    config = _config(x, window, stride, padding, count_include_pad)
    return _avg_pool2d(config, x)


def _avg_forward(config: PoolConfig, x):
    divisor = _divisor(config, x.dtype)
    if config.strategy == "reshape":
        return _tiles(x, config, 0).sum(axis=(2, 4)) / divisor
    kh, kw = config.window
    sums = lax.reduce_window(
        x, np.zeros((), x.dtype), lax.add, (1, kh, kw, 1), (1, *config.stride, 1),
        ((0, 0), *config.padding, (0, 0)),
    )
    return sums / divisor


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _avg_pool2d(config: PoolConfig, x):
    return _avg_forward(config, x)


def _avg_pool2d_fwd(config: PoolConfig, x):
    # The backward needs only shapes (in the config): no residual arrays.
    return _avg_forward(config, x), None


def _avg_pool2d_bwd(config: PoolConfig, _, g):
    spread = g / _divisor(config, g.dtype)
    (top, _), (left, _) = config.padding
    kh, kw = config.window
    if config.strategy == "reshape":
        n, ho, wo, c = g.shape
        tiles = jnp.broadcast_to(spread[:, :, None, :, None, :], (n, ho, kh, wo, kw, c))
        return (_untile(tiles, config),)
    # phi*(spread 1^T), the all-ones window split into rows then columns.
    rows = _unpad(sum(_place(spread, config, row_offset=m) for m in range(kh)), config, cols=False)
    return (_unpad(sum(_place(rows, config, col_offset=p) for p in range(kw)), config, rows=False),)


_avg_pool2d.defvjp(_avg_pool2d_fwd, _avg_pool2d_bwd)


# --- max pooling ------------------------------------------------------------------


@_args.reverse_mode_rule
def max_pool2d(x, window, *, stride=None, padding="VALID"):
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

    Example:
      >>> max_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    config = _config(x, window, stride, padding)
    return _max_pool2d(config, x)


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
    if config.strategy == "reshape":
        tiles = _tiles(x, config, -jnp.inf)
        kh, kw = config.window
        return [tiles[:, :, m, :, p, :] for m in range(kh) for p in range(kw)]
    return _window_pieces(x, config, -jnp.inf)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool2d(config: PoolConfig, x):
    return _max_forward(config, x)


def _max_pool2d_fwd(config: PoolConfig, x):
    # The residual is S, the selected offset per output (int8 for windows of
    # up to 127 entries): N*Ho*Wo*C bytes instead of x's N*H*W*C*itemsize, and
    # the backward routes g by it without x.  y and S come from the same window
    # entries, so XLA reads them once for both (module docstring, "Speed");
    # y is `_max_forward`'s, bit for bit.
    candidates = _candidates(x, config)
    return _window_max(candidates), _selection(candidates)


def _max_pool2d_bwd(config: PoolConfig, chosen, g):
    # phi*(dY S^T) from S alone: no x; the shapes come from the config (x's N
    # and C are g's).
    if config.strategy == "reshape":
        kh, kw = config.window
        # dY S^T as tiles (N, Ho, KH, Wo, KW, C): g where the offset is the
        # chosen one, else 0.  One broadcast comparison, not one per offset:
        # when S is computed in the same program, XLA fuses it into its users,
        # and KH*KW users each recomputing the KH*KW-step selection made
        # compiling a 1x127 window take ~20 s.
        offsets = jnp.arange(kh * kw, dtype=chosen.dtype).reshape(1, 1, kh, 1, kw, 1)
        tiles = jnp.where(chosen[:, :, None, :, None, :] == offsets, g[:, :, None, :, None, :],
                          jnp.zeros((), g.dtype))
        return (_untile(tiles, config),)
    return (_route_by_phases(config, chosen, g),)


def _route_by_phases(config: PoolConfig, chosen, g):
    """phi*(dY S^T) for any window and stride, one stride phase at a time.

    Padded row ``R = sh*a + r`` (``0 <= r < sh``) is reached by the window
    offsets ``m = r, r + sh, ...`` from output rows ``i = a - (m - r)/sh``
    (likewise columns), so phase ``(r, t)`` of the padded gradient is a sum of
    masked ``g`` shifted by whole output rows/columns, and the phases
    interleave into the padded grid by a stack and a reshape (the "reshape"
    strategy is the case ``sh = KH``: one offset per phase, no shift).

    This is the zero-inserted pieces of the module docstring written without
    interior padding: ``g`` and ``S`` are padded once (``g`` with zeros, ``S``
    with ``-1``, which matches no offset) and every piece is a plain slice of
    them.  (With ``S`` an int8 residual, XLA's CPU code for the ``KH*KW``
    zero-inserted ``lax.pad`` pieces fused into one loop ran about 2.5x slower
    than with int32, 3x3/2: about 50 ms against 20; the slices of a padded
    int8 ``S`` run as fast as int32, about 20 ms.)"""
    n, ho, wo, c = g.shape
    (h, w), ((top, bottom), (left, right)) = config.in_hw, config.padding
    (kh, kw), (sh, sw) = config.window, config.stride
    # Phase lengths: the padded grid, rounded up to whole strides.
    a_len, b_len = -(-(h + top + bottom) // sh), -(-(w + left + right) // sw)
    # Largest shift, in output rows/columns, of any offset within its phase.
    d_max, e_max = (kh - 1) // sh, (kw - 1) // sw
    cfg = ((0, 0, 0), (d_max, a_len - ho, 0), (e_max, b_len - wo, 0), (0, 0, 0))
    chosen_p = lax.pad(chosen, jnp.asarray(-1, chosen.dtype), cfg)
    zero = jnp.zeros((), g.dtype)
    g_p = lax.pad(g, zero, cfg)
    phase_rows = []
    for r in range(sh):
        phases = []
        for t in range(sw):
            acc = None
            for m in range(r, kh, sh):
                for p in range(t, kw, sw):
                    d, e = (m - r) // sh, (p - t) // sw
                    start = (0, d_max - d, e_max - e, 0)
                    limit = (n, d_max - d + a_len, e_max - e + b_len, c)
                    piece = jnp.where(lax.slice(chosen_p, start, limit) == m * kw + p, lax.slice(g_p, start, limit),
                                      zero)
                    acc = piece if acc is None else acc + piece
            # Stride > window: no offset reaches this phase.
            phases.append(jnp.zeros((n, a_len, b_len, c), g.dtype) if acc is None else acc)
        phase_rows.append(jnp.stack(phases, axis=3))
    padded = jnp.stack(phase_rows, axis=2).reshape(n, a_len * sh, b_len * sw, c)
    return lax.slice(padded, (0, top, left, 0), (n, top + h, left + w, c))


_max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)
