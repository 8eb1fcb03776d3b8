"""relu, linear, flatten: the hand-derived VJPs (docs/layers.md)
equal jax.vjp of the plain references."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import reference
from jaxconv.verify import check_vjp

from .strategies import permutation_input

layers_module = sys.modules["jaxconv.ops.layers"]


# --- relu ----------------------------------------------------------------------


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


# --- linear --------------------------------------------------------------------


def _linear_args(rng, n, d_in, d_out, bias, dtype=np.float64):
    x = rng.standard_normal((n, d_in)).astype(dtype)
    w = rng.standard_normal((d_in, d_out)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype) if bias else None
    return x, w, b


def test_linear_backward_is_g_wt_xt_g_and_batch_sum():
    """dx = g W^T, dW = x^T g, db = sum over the batch of g, entry by entry."""
    rng = np.random.default_rng(6)
    x, w, b = _linear_args(rng, 3, 4, 2, True)
    g = rng.standard_normal((3, 2))
    dx, dw, db = jax.vjp(jaxconv.linear, x, w, b)[1](jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(dw), x.T @ g, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(db), g.sum(0), rtol=1e-14)


# --- flatten -------------------------------------------------------------------


def test_flatten_is_row_major_and_backward_is_reshape():
    x = jnp.arange(24.0).reshape(2, 2, 3, 2)
    y = jaxconv.flatten(x)
    np.testing.assert_array_equal(np.asarray(y), np.arange(24.0).reshape(2, 12))
    g = jnp.arange(100.0, 124.0).reshape(2, 12)
    np.testing.assert_array_equal(np.asarray(jax.vjp(jaxconv.flatten, x)[1](g)[0]), np.asarray(g).reshape(2, 2, 3, 2))


def test_relu_flatten_linear_head_matches_the_reference_chain():
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
        (
            lambda: jaxconv.linear(np.ones((2, 3)), np.ones((4, 2))),
            r"`x.shape\[1\]` \(=3\) must equal `w.shape\[0\]` \(=4\)",
        ),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((3, 2)), np.ones(3)), r"`b` must have length 2"),
        (lambda: jaxconv.linear(np.ones((2, 3)), np.ones((3, 2)), np.ones((1, 2))), r"`b` must have rank 1"),
        (lambda: jaxconv.linear(np.ones((2, 3), np.int32), np.ones((3, 2))), r"`x` must have a floating dtype"),
        (lambda: jaxconv.flatten(np.ones(5)), r"`x` must have rank >= 2"),
        (lambda: jaxconv.flatten(np.ones((2, 3), np.int64)), r"`x` must have a floating dtype"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "x,w,b,match",
    [
        (np.ones((2, 3)), np.ones((3, 2), np.float32), None, r"dtypes must match, got `x` float64, `w` float32\."),
        (np.ones((2, 3)), np.ones((3, 2)), np.ones(2, np.float32), r"got `x` float64, `w` float64, `b` float32"),
    ],
)
def test_linear_dtype_mismatch_is_a_type_error_naming_the_arguments(x, w, b, match):
    with pytest.raises(TypeError, match=match):
        jaxconv.linear(x, w, b)


def test_bad_input_fails_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"`x.shape\[1\]` \(=3\)"):
        jax.jit(jaxconv.linear).lower(jnp.ones((2, 3)), jnp.ones((4, 2)))
