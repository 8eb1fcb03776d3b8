"""jaxconv._core.window's geometry pinned against lax's own: ``"SAME"`` padding against
``lax.padtype_to_pads``, and every output size against the shape ``lax.conv_general_dilated`` gives.

The ops resolve padding and sizes with ``_core.window``; ``jaxconv.reference`` hands
``"SAME"``/``"VALID"`` to lax unchanged.  These tests compare the two resolutions
directly, over a grid of sizes, kernels, strides and dilations in 1, 2 and 3
dimensions, so a geometry mistake fails here by name and not only as a gradient
mismatch in the conformance harness.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxconv._core import window as _window

# Per dimension: input size, kernel, stride, dilation.  Every combination in 1-D;
# 2-D and 3-D draw their dimensions from the same list.
SIZES, KERNELS, STRIDES, DILATIONS = range(1, 10), range(1, 6), range(1, 5), range(1, 4)
PER_DIM = list(itertools.product(SIZES, KERNELS, STRIDES, DILATIONS))


def _grid(ndim: int, count: int = 150):
    """Every per-dimension combination for 1-D; ``count`` combinations of them for 2-D and 3-D."""
    if ndim == 1:
        return [(c,) for c in PER_DIM]
    rng = np.random.default_rng([ndim, 7])
    return [tuple(PER_DIM[i] for i in rng.integers(0, len(PER_DIM), ndim)) for _ in range(count)]


def _lax_out_size(dims, padding):
    """The spatial output shape ``lax.conv_general_dilated`` computes for ``padding`` (a string or pairs)."""
    ndim = len(dims)
    sizes, kernel, stride, dilation = zip(*dims)
    sp = "DHW"[3 - ndim :]
    shape = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(
            x, w, stride, padding, rhs_dilation=dilation, dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C")
        ),
        jax.ShapeDtypeStruct((1, *sizes, 1), jnp.float32),
        jax.ShapeDtypeStruct((*kernel, 1, 1), jnp.float32),
    ).shape
    return tuple(shape[1:-1])


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_same_padding_is_lax_padtype_to_pads(ndim):
    """``"SAME"`` (any case) gives exactly lax's pads for the dilated kernel, output ``ceil(n / s)``,
    and the output size lax's convolution has under ``"SAME"``."""
    for dims in _grid(ndim):
        sizes, kernel, stride, dilation = zip(*dims)
        extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        want = tuple(tuple(p) for p in lax.padtype_to_pads(sizes, extent, stride, "SAME"))
        for spelling in ("SAME", "same"):
            assert _window.padding(spelling, sizes, kernel, stride, dilation) == want, dims
        window = _window.parse(sizes, kernel, stride, "SAME", dilation)
        assert window.padding == want, dims
        assert window.out_size == tuple(-(-n // s) for n, s in zip(sizes, stride)), dims
        assert window.out_size == _lax_out_size(dims, "SAME"), dims


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_output_sizes_are_lax_convolution_shapes(ndim):
    """``Window.out_size`` under ``"VALID"`` and under explicit asymmetric pads equals the spatial
    shape of ``lax.conv_general_dilated``; a window that does not fit is a ``ValueError`` (lax would
    give a non-positive size)."""
    rng = np.random.default_rng([ndim, 11])
    for dims in _grid(ndim):
        sizes, kernel, stride, dilation = zip(*dims)
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 4, (ndim, 2)))
        for padding, lax_padding in (("VALID", "VALID"), (pads, pads)):
            fits = all(
                d * (k - 1) + 1 <= n + lo + hi
                for (n, k, _, d), (lo, hi) in zip(dims, ((0, 0),) * ndim if padding == "VALID" else pads)
            )
            if not fits:
                with pytest.raises(ValueError, match="larger than the padded input"):
                    _window.parse(sizes, kernel, stride, padding, dilation)
                continue
            window = _window.parse(sizes, kernel, stride, padding, dilation)
            assert window.out_size == _lax_out_size(dims, lax_padding), (dims, padding)
            assert all(0 <= r < s for r, s in zip(window.remainder, stride)), (dims, padding)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_pool_same_padding_is_lax_reduce_window_padding(ndim):
    """Pooling's ``"SAME"`` (no dilation) is the padding ``lax.reduce_window`` resolves, and its output
    the shape ``reduce_window`` gives."""
    for dims in _grid(ndim):
        sizes, kernel, stride, _ = zip(*dims)
        window = _window.parse(sizes, kernel, stride, "SAME", pool=True)
        assert window.padding == tuple(tuple(p) for p in lax.padtype_to_pads(sizes, kernel, stride, "SAME"))
        shape = jax.eval_shape(
            lambda x: lax.reduce_window(x, np.float32(0), lax.add, (1, *kernel, 1), (1, *stride, 1), "SAME"),
            jax.ShapeDtypeStruct((1, *sizes, 1), jnp.float32),
        ).shape
        assert window.out_size == tuple(shape[1:-1]), dims
