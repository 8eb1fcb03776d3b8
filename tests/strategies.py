"""Hypothesis strategies and small helpers shared by the op tests."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from jaxconv._core import window as _window


def int_or_pair(low, high):
    return st.one_of(st.integers(low, high), st.tuples(st.integers(low, high), st.integers(low, high)))


def padding_forms(max_pad=3):
    """Every padding form: VALID, SAME, int, pair, and asymmetric per-side."""
    side = st.integers(0, max_pad)
    return st.one_of(
        st.sampled_from(["VALID", "SAME"]),
        side,
        st.tuples(side, side),
        st.tuples(st.tuples(side, side), st.tuples(side, side)),
    )


def fits(in_hw, window, stride, padding, dilation=1) -> bool:
    """Whether the (dilated) window fits in the padded input."""
    window, stride, dilation = (_window.ints(v, "v", 2) for v in (window, stride, dilation))
    pads = _window.padding(padding, in_hw, window, stride, dilation)
    return all(d * (k - 1) + 1 <= n + lo + hi for n, (lo, hi), k, d in zip(in_hw, pads, window, dilation))


@st.composite
def conv_configs(draw, max_channels=6, max_hw=12, max_kernel=5):
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, max(1, max_channels // groups)))
    cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    stride = draw(int_or_pair(1, 3))
    dilation = draw(int_or_pair(1, 3))
    padding = draw(padding_forms())
    bias = draw(st.booleans())
    assume(fits((h, w), (kh, kw), stride, padding, dilation))
    return dict(
        x_shape=(n, h, w, cin),
        w_shape=(kh, kw, cin // groups, cout),
        bias=bias,
        options=dict(stride=stride, padding=padding, dilation=dilation, groups=groups),
    )


def permutation_input(rng, shape, dtype=np.float64):
    """Distinct values (a shuffled permutation, scaled): no ties, no zeros, for kinks."""
    size = int(np.prod(shape))
    # Steps of 2/(size+1) in (-1, 1), shifted by a third of a step so none is 0.
    values = (2.0 * (rng.permutation(size) + 1) - (size + 1) + 1.0 / 3.0) / (size + 1)
    return values.reshape(shape).astype(dtype)


def pool_padding_forms(window):
    """Every padding form a pool accepts for ``window``: VALID, SAME, int, pair,
    and asymmetric per-side, each side at most half the window (PyTorch's rule)."""
    kh, kw = _window.ints(window, "window", 2)
    rows, cols = st.integers(0, kh // 2), st.integers(0, kw // 2)
    return st.one_of(
        st.sampled_from(["VALID", "SAME"]),
        st.integers(0, min(kh, kw) // 2),
        st.tuples(rows, cols),
        st.tuples(st.tuples(rows, rows), st.tuples(cols, cols)),
    )


@st.composite
def pool_configs(draw, max_hw=10, max_window=4, max_channels=3, max_batch=2):
    """A pooling configuration: input shape, window, stride (None = the window), padding."""
    n, c = draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    window = draw(int_or_pair(1, max_window))
    stride = draw(st.one_of(st.none(), int_or_pair(1, 3)))
    padding = draw(pool_padding_forms(window))
    assume(fits((h, w), window, window if stride is None else stride, padding))
    return dict(x_shape=(n, h, w, c), window=window, options=dict(stride=stride, padding=padding))
