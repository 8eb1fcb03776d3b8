"""softmax, log_loss, softmax_cross_entropy, l2_penalty: the hand-derived VJPs
(docs/losses.md: softmax, log-loss, cross-entropy, L2) equal jax.vjp of the references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import reference
from jaxconv.verify import relative_error


def _probabilities(rng, n, d):
    e = np.exp(rng.standard_normal((n, d)))
    return e / e.sum(axis=1, keepdims=True)


# --- softmax -------------------------------------------------------------------


def test_softmax_backward_is_the_simplified_jacobian_product():
    """dz/dx_d = Y_d (dz/dY_d - sum_k dz/dY_k Y_k), and equals the unsimplified Jacobian sum."""
    rng = np.random.default_rng(2)
    s, g = rng.standard_normal(6), rng.standard_normal(6)
    p = np.exp(s) / np.exp(s).sum()
    ds = np.asarray(jax.vjp(jaxconv.softmax, jnp.asarray(s))[1](jnp.asarray(g))[0])
    np.testing.assert_allclose(ds, p * (g - np.dot(g, p)), rtol=1e-13)
    big_l = np.exp(s).sum()
    unsimplified = [
        sum(g[k] * (np.exp(s[d]) / big_l * (k == d) - np.exp(s[d] + s[k]) / big_l**2) for k in range(6))
        for d in range(6)
    ]
    np.testing.assert_allclose(ds, unsimplified, rtol=1e-12, atol=1e-15)


def test_softmax_large_scores_finite():
    s = jnp.array([[1e4, -1e4, 0.0], [1e4, 1e4, -3.0], [-1e4, -1e4, -1e4]])
    p = jaxconv.softmax(s)
    assert jnp.all(jnp.isfinite(p))
    np.testing.assert_allclose(np.asarray(p), [[1, 0, 0], [0.5, 0.5, 0], [1 / 3] * 3], atol=1e-15)
    grad = jax.grad(lambda s: jnp.sum(jaxconv.softmax(s) * jnp.arange(3.0)))(s)
    assert jnp.all(jnp.isfinite(grad))


# --- log_loss ------------------------------------------------------------------


def test_log_loss_backward_is_minus_one_over_n_p_at_the_label():
    """dL/dp[n, k] = -[k = c_n] / (N p[n, c_n]); zero elsewhere, exactly."""
    p = jnp.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = jnp.array([1, 2])
    loss, vjp = jax.vjp(lambda p: jaxconv.log_loss(p, labels), p)
    np.testing.assert_allclose(float(loss), -(np.log(0.5) + np.log(0.1)) / 2, rtol=1e-15)
    expected = np.array([[0, -1 / (2 * 0.5), 0], [0, 0, -1 / (2 * 0.1)]])
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones(()))[0]), expected, rtol=1e-15)


# --- softmax_cross_entropy -----------------------------------------------------


def test_cross_entropy_backward_is_p_minus_onehot_over_n():
    """(p - onehot(y)) / N, and the column-vector form -y^T/(y^T p) (diag(p) - p p^T) per example is the same."""
    rng = np.random.default_rng(9)
    logits, labels = rng.standard_normal((3, 4)), np.array([2, 0, 3])
    grad = np.asarray(jax.grad(jaxconv.softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels)))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(grad, (p - onehot) / 3, rtol=1e-13, atol=1e-16)
    for n in range(3):
        y, pn = onehot[n], p[n]
        column_form = -y / (y @ pn) @ (np.diag(pn) - np.outer(pn, pn))
        np.testing.assert_allclose(grad[n], column_form / 3, rtol=1e-12, atol=1e-16)


def test_cross_entropy_equals_softmax_then_log_loss():
    rng = np.random.default_rng(10)
    logits, labels = jnp.asarray(rng.standard_normal((5, 4))), jnp.asarray(rng.integers(0, 4, 5))
    fused = jax.value_and_grad(jaxconv.softmax_cross_entropy)(logits, labels)
    composed = jax.value_and_grad(lambda s: jaxconv.log_loss(jaxconv.softmax(s), labels))(logits)
    assert relative_error(fused[0], composed[0])[1] <= 1e-14
    assert relative_error(fused[1], composed[1])[1] <= 1e-13


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_cross_entropy_finite_for_logits_of_magnitude_1e4(dtype):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [5e3, -1e4, 1e4]], dtype)
    labels = jnp.array([1, 0, 2])
    loss, grad = jax.value_and_grad(jaxconv.softmax_cross_entropy)(logits, labels)
    assert jnp.isfinite(loss) and jnp.all(jnp.isfinite(grad))
    # Row by row: 2e4, 2e4 + log 2, 0 (to rounding of exp(-5e3) = 0).
    expected = (2e4 + (2e4 + np.log(2.0)) + 0.0) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6 if dtype == jnp.float32 else 1e-15)
    np.testing.assert_allclose(np.asarray(grad), np.array([[1, -1, 0], [-1, 0.5, 0.5], [0, 0, 0]]) / 3, atol=1e-7)
    ref_loss, ref_grad = jax.value_and_grad(reference.softmax_cross_entropy)(logits, labels)
    assert relative_error(loss, ref_loss)[1] <= 1e-7 and relative_error(grad, ref_grad)[1] <= 1e-7


def test_out_of_range_label_under_jit_is_nan_not_a_wrong_class():
    """The documented behaviour when the range check cannot run (traced labels)."""
    logits, p = jnp.zeros((2, 3)), jnp.full((2, 3), 1 / 3)
    for bad in (3, -1):
        labels = jnp.array([0, bad])
        assert jnp.isnan(jax.jit(jaxconv.softmax_cross_entropy)(logits, labels))
        assert jnp.isnan(jax.jit(jaxconv.log_loss)(p, labels))


# --- l2_penalty ----------------------------------------------------------------


def _params(rng, dtype=np.float64):
    return {
        "conv": {"w": rng.standard_normal((3, 3, 2, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)},
        "dense": [rng.standard_normal((5, 3)).astype(dtype), None],
        "scale": rng.standard_normal(()).astype(dtype),
    }


def test_l2_penalty_value_and_gradients():
    params = {"a": jnp.array([1.0, -2.0]), "b": (jnp.array([[3.0]]),)}
    value, (grads, dlam) = jax.value_and_grad(jaxconv.l2_penalty, argnums=(0, 1))(params, jnp.asarray(0.5))
    assert float(value) == 0.5 * 14.0
    np.testing.assert_array_equal(np.asarray(grads["a"]), [1.0, -2.0])  # 2 * 0.5 * w
    np.testing.assert_array_equal(np.asarray(grads["b"][0]), [[3.0]])
    assert float(dlam) == 14.0


def test_l2_penalty_keeps_each_leafs_dtype():
    params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64)}
    value, grads = jax.value_and_grad(jaxconv.l2_penalty)(params, 0.1)
    assert value.dtype == jnp.float64
    assert grads["a"].dtype == jnp.float32 and grads["b"].dtype == jnp.float64


def test_l2_penalty_traced_lam_under_jit():
    params = {"w": jnp.arange(4.0)}
    grad_lam = jax.jit(jax.grad(jaxconv.l2_penalty, argnums=1))(params, 0.2)
    assert float(grad_lam) == 14.0


# --- bad input -----------------------------------------------------------------


P = np.full((3, 4), 0.25)
LABELS = np.array([0, 3, 1])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxconv.softmax(np.arange(3)), r"`s` must have a floating dtype"),
        (lambda: jaxconv.softmax(np.float64(1.0)), r"`s` must have a last \(class\) axis"),
        (lambda: jaxconv.softmax(np.ones((2, 0))), r"`s` must have a last \(class\) axis of length >= 1"),
        (lambda: jaxconv.log_loss(np.full((2, 3, 4), 0.25), LABELS), r"`p` must have rank 2"),
        (lambda: jaxconv.log_loss(np.full(4, 0.25), LABELS), r"`p` must have rank 2"),
        (lambda: jaxconv.log_loss(P, LABELS.astype(np.float64)), r"`labels` must have an integer dtype"),
        (lambda: jaxconv.log_loss(P, np.array([True, False, True])), r"`labels` must have an integer dtype"),
        (lambda: jaxconv.log_loss(P, np.array([0, 1])), r"`labels` must have shape \(3,\)"),
        (lambda: jaxconv.log_loss(P, LABELS[:, None]), r"`labels` must have shape \(3,\)"),
        (lambda: jaxconv.log_loss(P, np.array([0, 4, 1])), r"`labels` \(=4 at index 1\) must lie in \[0, 4\)"),
        (lambda: jaxconv.log_loss(P, jnp.array([0, 1, -1])), r"`labels` \(=-1 at index 2\)"),
        (lambda: jaxconv.softmax_cross_entropy(P, [0.0, 1.0, 2.0]), r"`labels` must have an integer dtype"),
        (lambda: jaxconv.softmax_cross_entropy(P, np.array([0, 1, 2, 3])), r"`labels` must have shape \(3,\)"),
        (lambda: jaxconv.softmax_cross_entropy(P, np.array([7, 0, 0])), r"`labels` \(=7 at index 0\)"),
        (lambda: jaxconv.softmax_cross_entropy(np.ones(4), np.array([0])), r"`logits` must have rank 2"),
        (lambda: jaxconv.softmax_cross_entropy(P.astype(np.int32), LABELS), r"`logits` must have a floating"),
        (lambda: jaxconv.l2_penalty({"w": np.arange(3)}, 0.1), r"`params\['w'\]` must have a floating dtype"),
        (lambda: jaxconv.l2_penalty({}, 0.1), r"`params` \(=\{\}\) has no array leaves"),
        (lambda: jaxconv.l2_penalty({"w": np.ones(3)}, -0.1), r"`lam` \(=-0.1\) must be finite and >= 0"),
        (lambda: jaxconv.l2_penalty({"w": np.ones(3)}, float("inf")), r"`lam` \(=inf\)"),
        (lambda: jaxconv.l2_penalty({"w": np.ones(3)}, np.ones(2)), r"`lam` must be a scalar"),
        (lambda: jaxconv.l2_penalty({"w": np.ones(3)}, "big"), r"`lam` \(='big'\) must be a real scalar"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_label_checks_at_trace_time_under_jit():
    """Dtype and shape are checked on tracers too; only the range needs concrete labels."""
    with pytest.raises(ValueError, match=r"`labels` must have an integer dtype"):
        jax.jit(jaxconv.softmax_cross_entropy).lower(jnp.zeros((3, 4)), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(3,\)"):
        jax.jit(jaxconv.log_loss).lower(jnp.full((3, 4), 0.25), jnp.zeros(2, jnp.int32))
