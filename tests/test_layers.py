"""relu, linear, flatten: the hand-derived VJPs (docs/layers.md)
equal jax.vjp of the plain references."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxconv
from jaxconv import reference
from jaxconv.verify import check_vjp, relative_error

from .strategies import permutation_input

layers_module = sys.modules["jaxconv.layers"]


# --- relu ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 3, 3)])
def test_relu_float64_full_check(shape):
    """Kink-free input (a shuffled permutation, no zeros), so finite differences are exact."""
    x = permutation_input(np.random.default_rng(0), shape)
    report = check_vjp(jaxconv.relu, reference.relu, x, names=("x",))
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


def test_relu_float32():
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    report = check_vjp(jaxconv.relu, reference.relu, x, dtype=jnp.float32, finite_differences=False, second_order=False)
    report.assert_ok()


def test_relu_gradient_at_zero_and_nan_matches_jax_nn_relu_and_the_reference():
    x = jnp.array([-2.0, -0.0, 0.0, 1e-300, 3.0, jnp.nan, -jnp.inf, jnp.inf])
    g = jnp.arange(1.0, 9.0)
    ours = jax.vjp(jaxconv.relu, x)[1](g)[0]
    theirs = jax.vjp(jax.nn.relu, x)[1](g)[0]
    oracle = jax.vjp(reference.relu, x)[1](g)[0]  # jax.grad of the reference: 0 at NaN too
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(oracle))
    np.testing.assert_array_equal(np.asarray(ours), [0, 0, 0, 4, 5, 0, 0, 8])
    for f in (jaxconv.relu, jax.jit(jaxconv.relu), reference.relu, jax.jit(reference.relu)):
        y = np.asarray(f(x))
        np.testing.assert_array_equal(y, np.asarray(jax.nn.relu(x)))  # NaN where x is NaN
        assert not np.signbit(y[1])  # relu(-0.0) is +0.0, in the hand rule and the reference alike


def test_relu_residual_is_a_boolean_mask():
    """The smallest residual: one bool per element, nothing else saved."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)))
    y, residual = layers_module._relu_fwd(x)
    leaves = jax.tree.leaves(residual)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.bool_ and leaves[0].shape == x.shape


def test_relu_vmap_and_jit():
    xs = permutation_input(np.random.default_rng(3), (3, 4, 5))
    check_vjp(jax.vmap(jaxconv.relu), jax.vmap(reference.relu), xs).assert_ok()
    check_vjp(jaxconv.relu, reference.relu, xs, jit=False).assert_ok()


# --- linear --------------------------------------------------------------------


def _linear_args(rng, n, d_in, d_out, bias, dtype=np.float64):
    x = rng.standard_normal((n, d_in)).astype(dtype)
    w = rng.standard_normal((d_in, d_out)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("n,d_in,d_out,bias", [(4, 5, 3, True), (1, 7, 1, False), (6, 1, 4, True)])
def test_linear_float64_full_check(n, d_in, d_out, bias):
    args = _linear_args(np.random.default_rng(4), n, d_in, d_out, bias)
    report = check_vjp(jaxconv.linear, reference.linear, *args, names=("x", "w", "b"))
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


def test_linear_float32():
    args = _linear_args(np.random.default_rng(5), 8, 20, 6, True, np.float32)
    report = check_vjp(
        jaxconv.linear, reference.linear, *args, dtype=jnp.float32, finite_differences=False, second_order=False
    )
    report.assert_ok()
    assert report.worst("vjp") <= 1e-5


def test_linear_backward_is_seed_002s_table():
    """dx = g W^T, dW = x^T g, db = sum over the batch of g, entry by entry."""
    rng = np.random.default_rng(6)
    x, w, b = _linear_args(rng, 3, 4, 2, True)
    g = rng.standard_normal((3, 2))
    dx, dw, db = jax.vjp(jaxconv.linear, x, w, b)[1](jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(dw), x.T @ g, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(db), g.sum(0), rtol=1e-14)


@given(n=st.integers(1, 5), d_in=st.integers(1, 7), d_out=st.integers(1, 7), bias=st.booleans())
def test_linear_hypothesis(n, d_in, d_out, bias):
    args = _linear_args(np.random.default_rng(7), n, d_in, d_out, bias)
    check_vjp(jaxconv.linear, reference.linear, *args, finite_differences=False, second_order=False).assert_ok()


def test_linear_vmap_and_eager():
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((3, 4, 5))
    ws = rng.standard_normal((3, 5, 2))
    b = jnp.asarray(rng.standard_normal(2))
    check_vjp(jax.vmap(lambda x, w: jaxconv.linear(x, w, b)), jax.vmap(lambda x, w: reference.linear(x, w, b)),
              xs, ws).assert_ok()
    check_vjp(jaxconv.linear, reference.linear, xs[0], ws[0], np.asarray(b), jit=False).assert_ok()


# --- flatten -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 5), (2, 1, 3, 1, 2)])
def test_flatten_float64_full_check(shape):
    x = np.random.default_rng(9).standard_normal(shape)
    report = check_vjp(jaxconv.flatten, reference.flatten, x, names=("x",))
    report.assert_ok()
    assert report.worst("vjp") == 0.0  # a rearrangement: exact


def test_flatten_is_row_major_and_backward_is_reshape():
    x = jnp.arange(24.0).reshape(2, 2, 3, 2)
    y = jaxconv.flatten(x)
    np.testing.assert_array_equal(np.asarray(y), np.arange(24.0).reshape(2, 12))
    g = jnp.arange(100.0, 124.0).reshape(2, 12)
    np.testing.assert_array_equal(np.asarray(jax.vjp(jaxconv.flatten, x)[1](g)[0]), np.asarray(g).reshape(2, 2, 3, 2))


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5))
def test_flatten_hypothesis_shapes(shape):
    x = np.random.default_rng(10).standard_normal(shape)
    assert jaxconv.flatten(x).shape == (shape[0], int(np.prod(shape[1:])))
    check_vjp(jaxconv.flatten, reference.flatten, x, finite_differences=False, second_order=False).assert_ok()


def test_flatten_vmap_and_jit():
    xs = np.random.default_rng(11).standard_normal((3, 2, 4, 5))
    check_vjp(jax.vmap(jaxconv.flatten), jax.vmap(reference.flatten), xs).assert_ok()
    assert relative_error(jax.jit(jaxconv.flatten)(xs), xs.reshape(3, 40))[1] == 0.0


def test_layers_compose_like_the_lectures_network_head():
    """relu -> flatten -> linear, grads of all three against the reference chain."""
    rng = np.random.default_rng(12)
    s = permutation_input(rng, (2, 3, 3, 2))
    w = rng.standard_normal((18, 4))
    b = rng.standard_normal(4)

    def ours(s, w, b):
        return jaxconv.linear(jaxconv.flatten(jaxconv.relu(s)), w, b)

    def ref(s, w, b):
        return reference.linear(reference.flatten(reference.relu(s)), w, b)

    check_vjp(ours, ref, s, w, b).assert_ok()


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxconv.relu(np.arange(4)), r"`x` must have a floating dtype"),
        (lambda: jaxconv.linear(np.ones((2, 3, 1)), np.ones((3, 2))), r"`x` must have rank 2"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones(3)), r"`w` must have rank 2"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((4, 2))), r"`x.shape\[1\]` \(=3\) must equal `w.shape\[0\]` \(=4\)"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((3, 2)), np.ones(3)), r"`b` must have length 2"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((3, 2)), np.ones((1, 2))), r"`b` must have rank 1"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((3, 2), np.float32)), r"dtypes must match"),
        (lambda: jaxconv.linear(np.ones((2, 3), np.int32), np.ones((3, 2))), r"`x` must have a floating dtype"),
        (lambda: jaxconv.flatten(np.ones(5)), r"`x` must have rank >= 2"),
        (lambda: jaxconv.flatten(np.ones((2, 3), np.int64)), r"`x` must have a floating dtype"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_input_fails_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"`x.shape\[1\]` \(=3\)"):
        jax.jit(jaxconv.linear).lower(jnp.ones((2, 3)), jnp.ones((4, 2)))


@pytest.mark.slow
@settings(max_examples=40)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), d_out=st.integers(1, 5), bias=st.booleans())
def test_layers_sweep_slow(shape, d_out, bias):
    """Full checks (FD, grad-of-grad) of the three layers on drawn shapes."""
    rng = np.random.default_rng(13)
    x = permutation_input(rng, shape)
    check_vjp(jaxconv.relu, reference.relu, x).assert_ok()
    check_vjp(jaxconv.flatten, reference.flatten, x).assert_ok()
    d_in = int(np.prod(shape[1:]))
    args = _linear_args(rng, shape[0], d_in, d_out, bias)
    check_vjp(jaxconv.linear, reference.linear, *args).assert_ok()
