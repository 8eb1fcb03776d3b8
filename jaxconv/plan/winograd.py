r"""Winograd minimal filtering: a stride-1 convolution and both its gradients in fewer multiplications.

Lavin & Gray (2016), "Fast Algorithms for Convolutional Neural Networks";
the derivation in our words is docs/convolution.md §7.

**One dimension.**  ``F(m, r)`` computes ``m`` outputs of the correlation
``y_i = sum_k d_{i+k} g_k`` of a filter of length ``r`` over a tile ``d`` of
``alpha = m + r - 1`` inputs with ``alpha`` multiplications instead of
``m r``:

.. math::

    y = A^T \big[ (G g) \odot (B^T d) \big].

The matrices come from polynomial multiplication (Toom-Cook): the product
``s(x) = g(x) h(x)`` of a degree ``r-1`` and a degree ``m-1`` polynomial is
fixed by its values at ``alpha`` points (here ``alpha - 1`` finite points and
infinity, whose "value" is the leading coefficient).  With ``V_k`` the
``alpha x k`` evaluation matrix (rows ``p_j^0 .. p_j^{k-1}``, the last row
``e_{k-1}`` for infinity), ``s = V_alpha^{-1} [(V_r g) \odot (V_m h)] = C h``,
where ``C[n, i] = g_{n-i}``.  The correlation is the transpose,
``y_i = sum_n C[n, i] d_n``, so

.. math::

    A^T = V_m^T, \qquad G = V_r, \qquad B^T = V_\alpha^{-T}.

Each row ``j`` of ``B^T`` is scaled to small integers and row ``j`` of ``G``
divided by the same factor: ``(G g)_j (B^T d)_j`` is unchanged.  The
matrices are built in exact rational arithmetic (:func:`transforms`), and
``tests/test_winograd.py`` checks the identity exactly.

**Several dimensions.**  The transforms are separable: a 2-D tile's
``alpha x alpha`` inputs become ``B^T d B``, the kernel ``G g G^T``, the
output ``A^T M A``, one matrix per spatial axis, for any number of axes.

**Channels.**  For the convolution's channel sums, every one of the
``alpha^ndim`` transformed positions is one matrix product over channels:
``M_xi = V_xi U_xi`` with ``V_xi`` ``(N * tiles, C)`` and ``U_xi``
``(C, O)``: ``alpha^ndim`` GEMMs in place of ``(m r)^ndim``-fold work.

**The gradients** are Winograd too (stride 1, dilation 1):

* ``dL/dx`` is the full correlation of the output gradient with the rotated
  kernel (docs/convolution.md §5.3): a stride-1 correlation, ``F(m, r)``
  again;
* ``dL/dw[k] = sum_{n,i} xp[n, i + k] g[n, i]`` is a correlation of the padded
  input with the *gradient* as filter, evaluated at only ``r`` offsets:
  ``F(r, m)`` on tiles of ``m`` gradient entries, whose input tiles
  (``alpha = m + r - 1`` entries, one every ``m``) are exactly the forward's.
  The sum over images and tiles is taken in the transformed domain, one GEMM
  ``(C, N * tiles) x (N * tiles, O)`` per transformed position, and only the
  sum is transformed back.

Tiles past the output's end read zero padding and are cropped (forward, dx)
or carry a zero gradient (dw).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["POINTS", "correlate", "kernel_grad", "transforms"]

#: Interpolation points, taken in this order: ``alpha - 1`` of them and infinity.
#: Small magnitudes and reciprocal pairs keep the transforms' entries (and the
#: float32 rounding they amplify) small (Barabasz et al., 2018).
POINTS = (
    Fraction(0),
    Fraction(1),
    Fraction(-1),
    Fraction(1, 2),
    Fraction(-2),
    Fraction(-1, 2),
    Fraction(2),
    Fraction(3, 2),
    Fraction(-3, 2),
    Fraction(2, 3),
    Fraction(-2, 3),
)


def _evaluation(points: Sequence[Fraction], k: int) -> list[list[Fraction]]:
    """``V_k``: the values at the points (and the leading coefficient at infinity) of a degree ``k - 1`` polynomial."""
    rows = [[p**i for i in range(k)] for p in points]
    rows.append([Fraction(int(i == k - 1)) for i in range(k)])
    return rows


def _inverse(a: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a square rational matrix."""
    n = len(a)
    aug = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[pivot] = aug[pivot], aug[col]
        inv = 1 / aug[col][col]
        aug[col] = [v * inv for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [v - f * p for v, p in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


@functools.cache
def transforms(m: int, r: int) -> tuple[tuple, tuple, tuple]:
    """``(A^T, G, B^T)`` of ``F(m, r)`` as tuples of rows of :class:`fractions.Fraction`.

    ``A^T`` is ``m x alpha``, ``G`` is ``alpha x r``, ``B^T`` is ``alpha x alpha``,
    ``alpha = m + r - 1``; ``y = A^T ((G g) * (B^T d))`` is the correlation of
    ``d`` (length ``alpha``) with ``g`` (length ``r``), exactly.
    """
    if m < 1 or r < 1:
        raise ValueError(f"F(m, r) needs m >= 1 and r >= 1, got m={m}, r={r}.")
    alpha = m + r - 1
    if alpha - 1 > len(POINTS):
        raise ValueError(f"F({m}, {r}) needs {alpha - 1} interpolation points; {len(POINTS)} are defined.")
    points = POINTS[: alpha - 1]
    at = [list(col) for col in zip(*_evaluation(points, m))]  # V_m^T
    g = _evaluation(points, r)
    bt = [list(col) for col in zip(*_inverse(_evaluation(points, alpha)))]  # V_alpha^{-T}
    for j, row in enumerate(bt):
        # Scale row j of B^T to coprime integers; G's row j takes the inverse factor.
        lcm = math.lcm(*(v.denominator for v in row))
        gcd = math.gcd(*(int(v * lcm) for v in row)) or 1
        scale = Fraction(lcm, gcd)
        if next(v for v in row if v != 0) < 0:
            scale = -scale
        bt[j] = [v * scale for v in row]
        g[j] = [v / scale for v in g[j]]
    return tuple(map(tuple, at)), tuple(map(tuple, g)), tuple(map(tuple, bt))


def _array(rows) -> np.ndarray:
    return np.array([[float(v) for v in row] for row in rows], dtype=np.float64)


def _weighted_sum(coeffs, piece, dtype):
    """``sum_t coeffs[t] * piece(t)`` over the nonzero coefficients (no multiply for +-1); None if all are 0.

    The transforms are written this way, not as a dot with a tiny
    contraction, so that XLA fuses each into one elementwise pass.
    """
    total = None
    for t, c in enumerate(coeffs):
        if c == 0:
            continue
        term = piece(t)
        term = term if c == 1 else (-term if c == -1 else term * jnp.asarray(c, dtype))
        total = term if total is None else total + term
    return total


def _along(a, matrix: np.ndarray, axis: int, new_axis: int):
    """Apply ``matrix`` (``p x q``) to axis ``axis`` (length ``q``) of ``a``; the result's ``p`` at ``new_axis``."""
    rows = []
    for coeffs in matrix:
        total = _weighted_sum(coeffs, lambda t: lax.index_in_dim(a, t, axis, keepdims=False), a.dtype)
        rows.append(jnp.zeros_like(lax.index_in_dim(a, 0, axis, keepdims=False)) if total is None else total)
    return jnp.stack(rows, axis=new_axis)


def _pad(x, pads):
    """Zero padding ``(lo, hi)`` per spatial axis; negative amounts crop."""
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))


def _tiling(size: Sequence[int], pads, kernel: Sequence[int], m: int):
    """``(out, tiles, pads)``: the stride-1 output size, the tiles of ``m`` covering it, and ``pads``
    with the high side extended so that the last tile's ``m + k - 1`` inputs exist (zeros)."""
    padded = [s + lo + hi for s, (lo, hi) in zip(size, pads)]
    out = tuple(p - k + 1 for p, k in zip(padded, kernel))
    tiles = tuple(-(-o // m) for o in out)
    pads = tuple((lo, hi + t * m + k - 1 - p) for (lo, hi), t, k, p in zip(pads, tiles, kernel, padded))
    return out, tiles, pads


def correlate(x, w, pads, m: int, block: int | None = None, *, precision=None):
    """Stride-1, dilation-1 correlation of ``x`` ``(N, *S, C)`` with ``w`` ``(*K, C, O)`` by ``F(m, k)`` per axis.

    ``pads`` are ``(lo, hi)`` zeros per spatial axis (negative crops).  Output
    ``(N, *(S + lo + hi - K + 1), O)``.  ``block`` images at a time (a
    ``lax.map`` over the batch) when given and smaller than ``N``.  ``precision``
    (lax's, ``None`` its default) is that of the kernel transform and the channel products.
    """
    ndim = x.ndim - 2
    n, o = x.shape[0], w.shape[-1]
    kernel = w.shape[:ndim]
    out, tiles, pads = _tiling(x.shape[1:-1], pads, kernel, m)
    u = _kernel_transform(w, m, precision)  # (alpha^ndim, C, O)

    def run(xb):
        nb = xb.shape[0]
        v = _transformed_tiles(_pad(xb, pads), m, kernel, tiles)  # (alpha^ndim, nb*T, C)
        prod = jnp.matmul(v, u, precision=precision)  # (alpha^ndim, nb*T, O)
        return _output_transform(prod, m, kernel, nb, tiles, o, out)

    if block is None or block >= n:
        return run(x)
    y = lax.map(run, x.reshape(n // block, block, *x.shape[1:]))
    return y.reshape(n, *y.shape[2:])


def _transformed_tiles(xp, m, kernel, tiles, dual: bool = False):
    """``B^T d B`` of every tile, ``(N, *P, C) -> (alpha^ndim, N * prod(tiles), C)``.

    Tile ``t`` of an axis reads padded positions ``t m .. t m + alpha - 1``.
    ``B`` is ``F(m, k)``'s per axis, or ``F(k, m)``'s with ``dual`` (the kernel
    gradient's: same tiles, the roles of kernel and tile exchanged).
    """
    v = xp
    for axis, k in enumerate(kernel):
        _, _, bt = transforms(k, m) if dual else transforms(m, k)
        v = _tile_axis(v, axis, m, tiles[axis], _array(bt))
    return v.reshape(-1, xp.shape[0] * math.prod(tiles), xp.shape[-1])


def _tile_axis(v, axis: int, step: int, count: int, bt: np.ndarray):
    """Transform spatial axis ``axis``: ``alpha`` strided slices (tile offsets), combined by ``bt``.

    ``v`` holds the ``axis`` already transformed axes in front, then
    ``(N, *spatial, C)`` with the tiled spatial axes already reduced to their
    tile counts; the new transformed axis goes after the earlier ones.
    """
    pos = axis + 1 + axis  # transformed axes in front, then N, then the spatial axes

    def offset(t):  # the t-th entry of every tile: a strided slice
        start, limit, strides = [0] * v.ndim, list(v.shape), [1] * v.ndim
        start[pos], limit[pos], strides[pos] = t, t + step * (count - 1) + 1, step
        return lax.slice(v, start, limit, strides)

    return jnp.stack([_weighted_sum(coeffs, offset, v.dtype) for coeffs in bt], axis=axis)


def _kernel_transform(w, m: int, precision=None):
    """``G g G^T`` (per axis) of the kernel: ``(*K, C, O) -> (alpha^ndim, C, O)``."""
    ndim = w.ndim - 2
    u = w
    for axis in range(ndim):
        _, g, _ = transforms(m, w.shape[axis])
        gm = jnp.asarray(_array(g), w.dtype)
        u = jnp.tensordot(gm, u, axes=((1,), (axis,)), precision=precision)  # new axis in front
        u = jnp.moveaxis(u, 0, axis)
    alphas = u.shape[:ndim]
    return u.reshape(math.prod(alphas), *u.shape[ndim:])


def _output_transform(prod, m, kernel, n, tiles, o, out):
    """``A^T M A`` (per axis), then the tiles back in place: ``(alpha^ndim, N*T, O) -> (N, *out, O)``."""
    ndim = len(kernel)
    alphas = [m + k - 1 for k in kernel]
    v = prod.reshape(*alphas, n, *tiles, o)
    for axis in range(ndim):
        at, _, _ = transforms(m, kernel[axis])
        v = _along(v, _array(at), axis, axis)  # (alpha -> m) on axis `axis`, in place
    # v: (m,)*ndim + (N, *tiles, O) -> (N, t1, m, t2, m, ..., O)
    perm = [ndim] + [p for axis in range(ndim) for p in (ndim + 1 + axis, axis)] + [2 * ndim + 1]
    v = v.transpose(perm).reshape(n, *(t * m for t in tiles), o)
    crop = (slice(None), *(slice(0, s) for s in out))
    return v[crop]


def kernel_grad(x, g, pads, kernel: Sequence[int], m: int, block: int | None = None, *, precision=None):
    """``dL/dw[k, c, o] = sum_{n, i} xp[n, i + k, c] g[n, i, o]`` by ``F(k, m)`` per axis (stride 1, dilation 1).

    ``x`` ``(N, *S, C)``, ``g`` ``(N, *out, O)`` with ``out = S + lo + hi - K + 1``;
    returns ``(*K, C, O)``.  The gradient is cut into tiles of ``m`` (zeros past
    its end); each tile and the ``m + k - 1`` inputs it meets give a
    correlation evaluated at the ``k`` kernel offsets, ``F(k, m)`` with the
    gradient tile as the filter.  Summed over images and tiles in the
    transformed domain, transformed back once.  ``precision``: the channel products' (lax's).
    """
    ndim = x.ndim - 2
    n, c, o = x.shape[0], x.shape[-1], g.shape[-1]
    out, tiles, pads = _tiling(x.shape[1:-1], pads, kernel, m)
    alphas = [m + k - 1 for k in kernel]
    gpads = tuple((0, t * m - s) for t, s in zip(tiles, out))

    def run(acc, xg):
        xb, gb = xg
        v = _transformed_tiles(_pad(xb, pads), m, kernel, tiles, dual=True)  # (alpha^ndim, nb*T, C)
        h = _gradient_transform(_pad(gb, gpads), m, kernel, tiles)  # (alpha^ndim, nb*T, O)
        return acc + jnp.matmul(v.transpose(0, 2, 1), h, precision=precision), None

    zero = jnp.zeros((math.prod(alphas), c, o), x.dtype)
    if block is None or block >= n:
        acc, _ = run(zero, (x, g))
    else:
        acc, _ = lax.scan(
            run, zero, (x.reshape(n // block, block, *x.shape[1:]), g.reshape(n // block, block, *g.shape[1:]))
        )
    v = acc.reshape(*alphas, c, o)
    for axis in range(ndim):
        at, _, _ = transforms(kernel[axis], m)  # F(k, m): k outputs
        v = _along(v, _array(at), axis, axis)
    return v


def _gradient_transform(gp, m, kernel, tiles):
    """``G' h G'^T`` of ``F(k, m)`` for every ``m``-tile ``h`` of the gradient: ``(alpha^ndim, N*T, O)``."""
    ndim = len(kernel)
    n, o = gp.shape[0], gp.shape[-1]
    # (N, t1*m, t2*m, O) -> (m, m, N, t1, t2, O): tile-internal axes in front.
    v = gp.reshape(n, *(x for t in tiles for x in (t, m)), o)
    perm = [2 + 2 * axis for axis in range(ndim)] + [0] + [1 + 2 * axis for axis in range(ndim)] + [2 * ndim + 1]
    v = v.transpose(perm)
    for axis in range(ndim):
        _, gmat, _ = transforms(kernel[axis], m)  # alpha x m
        v = _along(v, _array(gmat), axis, axis)
    return v.reshape(-1, n * math.prod(tiles), o)
