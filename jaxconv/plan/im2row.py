"""The im2row forms of a convolution and its gradients: matrix products over ``phi``, whole or in batch blocks.

With ``phi`` = im2row (``jaxconv._core.window.patches``: one row per output
position, one column per kernel entry, kernel-major) and, per group, ``F`` the
``(prod(K)*C/G, O/G)`` kernel matrix (docs/convolution.md §2, §5.2):

* forward ``Y = phi(X) F`` (:func:`forward`, :func:`forward_blocked`);
* ``dF = phi(X)^T dY`` and ``dX = phi*(dY F^T)``, ``phi*`` = row2im, the
  adjoint (:func:`grads`, :func:`grads_blocked`).

The ``"im2row"``, ``"im2row_blocked"`` and (for ``dF``) ``"mixed"`` forms of
:mod:`jaxconv.ops.conv` run these; the rule and the dispatch stay there.  Each
function takes the convolution's static configuration, anything with the
:class:`Geometry` attributes (``jaxconv.ops.conv.ConvConfig``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax.numpy as jnp
from jax import lax

from .._core import window as _window
from .planner import phi_entries_per_image

__all__ = [
    "BLOCK_BYTES",
    "Geometry",
    "batch_block",
    "forward",
    "forward_blocked",
    "grads",
    "grads_blocked",
    "images_per_block",
    "kernel_by_group",
    "phi_by_group",
]


class Geometry(Protocol):
    """What the im2row forms read of a convolution's static configuration."""

    @property
    def window(self) -> _window.Window: ...  # the convolution's geometry

    @property
    def groups(self) -> int: ...

    @property
    def precision(self) -> Any: ...  # every product's (jaxconv._core.args.precision's form)


def phi_by_group(config: Geometry, x):
    """phi(X) per group, ``(G, N*prod(out), prod(K)*C/G)`` (im2row, docs/convolution.md §2; kernel-major columns)."""
    window, groups = config.window, config.groups
    rows = _window.patches(x, window)  # (N, *out, *K, C)
    m = x.shape[0] * math.prod(window.out_size)
    cg = x.shape[-1] // groups
    return rows.reshape(m, window.volume, groups, cg).transpose(2, 0, 1, 3).reshape(groups, m, window.volume * cg)


def kernel_by_group(w, groups: int):
    """The kernel matrix F per group, ``(G, prod(K)*C/G, O/G)``."""
    o = w.shape[-1]
    return w.reshape(-1, groups, o // groups).transpose(1, 0, 2)


def images_per_block(config: Geometry, batch: int, channels: int, itemsize: int) -> int:
    """The batch block of the blocked im2row forms: its phi fits ``BLOCK_BYTES``."""
    entries = phi_entries_per_image(config.window.out_size, config.window.kernel, channels)
    return batch_block(batch, entries * itemsize, BLOCK_BYTES)


def forward(config: Geometry, x, w):
    """``Y = phi(X) F`` (docs/convolution.md §2), one matrix product per group."""
    n, o = x.shape[0], w.shape[-1]
    y = jnp.matmul(
        phi_by_group(config, x), kernel_by_group(w, config.groups), precision=config.precision
    )  # (G, N*prod(out), O/G)
    return y.transpose(1, 0, 2).reshape(n, *config.window.out_size, o)


def forward_blocked(config: Geometry, x, w):
    """``Y_b = phi(X_b) F`` over cache-sized batch blocks (see :func:`grads_blocked`)."""
    n = x.shape[0]
    block = images_per_block(config, n, x.shape[-1], x.dtype.itemsize)
    if block == n:
        return forward(config, x, w)
    y = lax.map(lambda xb: forward(config, xb, w), x.reshape(n // block, block, *x.shape[1:]))
    return y.reshape(n, *y.shape[2:])


def grads(config: Geometry, x, x_shape, w, g, need_dx: bool, need_dw: bool):
    """The im2row form (docs/convolution.md §5.2): (dL/dx, dL/dw), each None unless needed.

    With ``phi`` = im2row (one row per output position, one column per kernel
    entry, kernel-major) and per group ``F`` the ``(prod(K)*C/G, O/G)`` kernel
    matrix, ``dY`` the ``(N*prod(out), O/G)`` output gradient:
    ``dF = phi(X)^T dY`` and ``dX = phi*(dY F^T)``, ``phi*`` = row2im, the
    adjoint.  Groups are a batch of these matrix products; stride, padding
    and dilation live in ``phi`` and ``phi*`` (``jaxconv._core.window``).
    ``dX`` needs only ``x``'s shape.
    """
    window, groups = config.window, config.groups
    o = w.shape[-1]
    og, cg = o // groups, w.shape[-2]
    n = g.shape[0]
    m = n * math.prod(window.out_size)
    dy = g.reshape(m, groups, og).transpose(1, 0, 2)  # (G, N*prod(out), O/G)
    hi = config.precision
    dx = dw = None
    if need_dw:
        df = jnp.matmul(phi_by_group(config, x).transpose(0, 2, 1), dy, precision=hi)
        dw = df.transpose(1, 0, 2).reshape(w.shape)
    if need_dx:
        drows = jnp.matmul(dy, kernel_by_group(w, groups).transpose(0, 2, 1), precision=hi)
        ndim = window.ndim
        drows = drows.reshape(groups, n, *window.out_size, *window.kernel, cg)
        # (G, N, *out, *K, C/G) -> (N, *out, *K, G, C/G): the group joins the channels.
        drows = drows.transpose(*range(1, 2 * ndim + 2), 0, 2 * ndim + 2)
        dx = _window.unpatches(drows.reshape(n, *window.out_size, *window.kernel, groups * cg), window)
    return dx, dw


# Bytes of phi(X) one block of the blocked im2row form may hold: a few MiB,
# so that a block is written and read back while still in cache.
BLOCK_BYTES = 4 * 2**20


def batch_block(n: int, bytes_per_image: int, budget: int) -> int:
    """The largest divisor of ``n`` whose images' phi rows fit in ``budget`` (at least 1)."""
    fits = max(1, budget // max(1, bytes_per_image))
    return max(d for d in range(1, min(n, fits) + 1) if n % d == 0)


def grads_blocked(config: Geometry, x, x_shape, w, g, need_dx: bool, need_dw: bool):
    """The im2row form (docs/convolution.md §5.2) over blocks of the batch.

    ``phi(X)^T dY`` is a sum over the rows of phi, one row per output position,
    so it splits over images: ``dF = sum_b phi(X_b)^T dY_b``; and ``phi*`` acts
    on each image alone, so ``dX_b = phi*(dY_b F^T)``.  A ``lax.scan`` over
    batch blocks runs :func:`grads` on each block, sized so that the
    block's phi (``B*prod(out)`` rows of ``prod(K)*C``) stays in cache; the
    products are then GEMMs at close to the machine's matrix-product speed,
    where the whole phi would be ``prod(K)`` times the input, streamed from
    memory.  Same formula, same sums, only grouped by image.
    """
    n = g.shape[0]
    block = images_per_block(config, n, x_shape[-1], g.dtype.itemsize)
    if block == n:
        return grads(config, x, x_shape, w, g, need_dx, need_dw)
    blocks = n // block
    block_shape = (block, *x_shape[1:])

    def one_block(dw, xg):
        xb, gb = xg
        dxb, dwb = grads(config, xb, block_shape, w, gb, need_dx, need_dw)
        return (None if dw is None else dw + dwb), dxb

    xs = x.reshape(blocks, *block_shape) if need_dw else None
    dw, dx = lax.scan(
        one_block, jnp.zeros(w.shape, w.dtype) if need_dw else None, (xs, g.reshape(blocks, block, *g.shape[1:]))
    )
    return (None if dx is None else dx.reshape(x_shape)), dw
