"""batch_norm specifics: the formulas in NumPy, what the rule saves, bad input.

(The float64 VJP / finite-difference / second-order / jit / vmap / hypothesis
checks against the reference run in test_conformance.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import reference


def _numpy(x, scale, offset, g, eps):
    """Forward and the three gradients, written out per channel over every other axis."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = ((x - mean) ** 2).mean(axis=axes)  # biased
    xhat = (x - mean) / np.sqrt(var + eps)
    y = scale * xhat + offset
    dx = scale / np.sqrt(var + eps) * (g - g.mean(axis=axes) - xhat * (g * xhat).mean(axis=axes))
    return y, dx, (g * xhat).sum(axis=axes), g.sum(axis=axes)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3, 2), (3, 2, 2, 2, 4)])
def test_forward_and_backward_are_the_formulas(shape):
    rng = np.random.default_rng(0)
    x, g = 3 * rng.standard_normal(shape) + 1, rng.standard_normal(shape)
    scale, offset = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    y, pullback = jax.vjp(lambda *a: jaxconv.batch_norm(*a, eps=1e-3), x, scale, offset)
    expected = _numpy(x, scale, offset, g, 1e-3)
    for got, want in zip((y, *pullback(g)), expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    # Normalised: zero mean and (with eps) unit variance per channel before the affine part.
    xhat = jaxconv.batch_norm(x, jnp.ones(shape[-1]), jnp.zeros(shape[-1]), eps=1e-12)
    np.testing.assert_allclose(np.asarray(xhat).reshape(-1, shape[-1]).mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(xhat).reshape(-1, shape[-1]).var(0), 1, rtol=1e-9)


def test_saves_xhat_and_one_number_per_channel_not_x(capsys):
    x = jnp.ones((4, 5, 5, 3)) * jnp.arange(3.0)
    scale, offset = jnp.ones(3), jnp.zeros(3)
    print_saved_residuals(lambda x, s, o: jaxconv.batch_norm(x, s, o), x, scale, offset)
    saved = capsys.readouterr().out.strip().splitlines()
    shapes = sorted(line.split(" ")[0] for line in saved)
    assert shapes == ["f64[3]", "f64[3]", "f64[4,5,5,3]"], saved  # 1/sigma, scale; xhat (x itself is not kept)
    assert not any("from the argument x" in line for line in saved)


def test_equals_the_reference_for_a_constant_channel():
    """A channel with zero variance: xhat is 0 and the output the offset; 1/sigma is 1/sqrt(eps), so
    dx = scale / sqrt(eps) * (g - mean(g)), large but finite, as autodiff of the reference has it."""
    x = jnp.stack([jnp.full((6,), 2.0), jnp.arange(6.0)], axis=-1)
    scale, offset = jnp.array([1.5, 1.0]), jnp.array([0.25, 0.0])
    g = jnp.asarray(np.random.default_rng(1).standard_normal((6, 2)))
    y, pull = jax.vjp(jaxconv.batch_norm, x, scale, offset)
    y_ref, pull_ref = jax.vjp(reference.batch_norm, x, scale, offset)
    np.testing.assert_allclose(np.asarray(y[:, 0]), 0.25)
    for a, b in zip(pull(g), pull_ref(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    expected = 1.5 / np.sqrt(1e-5) * (np.asarray(g[:, 0]) - np.asarray(g[:, 0]).mean())
    np.testing.assert_allclose(np.asarray(pull(g)[0][:, 0]), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxconv.batch_norm(jnp.ones(4), jnp.ones(4), jnp.zeros(4)), r"`x` must have rank >= 2"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(3), jnp.zeros(4)), r"`scale` must have length 4"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros((4, 1))), r"`offset` must have rank 1"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4), jnp.int32), jnp.ones(4), jnp.zeros(4)), r"floating dtype"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), eps=0), r"`eps` \(=0\) must be"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), eps=float("nan")), r"`eps`"),
        (lambda: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), eps="1e-5"), r"`eps`"),
        (lambda: jaxconv.batch_norm(jnp.ones((0, 4)), jnp.ones(4), jnp.zeros(4)), r"no entries per channel"),
        (
            lambda: jax.jit(lambda e: jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), eps=e))(1e-5),
            r"`eps`.*concrete",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dtype_mismatch_is_a_type_error_naming_the_arguments():
    with pytest.raises(TypeError, match=r"dtypes must match, got `x` float64, `scale` float32, `offset` float64"):
        jaxconv.batch_norm(jnp.ones((2, 4)), jnp.ones(4, jnp.float32), jnp.zeros(4))


def test_two_entries_per_channel_the_gradient_is_eps_sized():
    """With m = 2 entries per channel, g minus its projections on 1 and on xhat is (nearly) 0: dL/dx is
    of the order of eps, computed by cancelling terms of size scale/sigma*|g|. Rule and reference agree to
    rounding of those terms (the harness's relative check is meaningless here, so it draws m >= 3)."""
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    scale, offset = 1 + rng.standard_normal(3) * 0.1, rng.standard_normal(3)
    _, pull = jax.vjp(lambda x: jaxconv.batch_norm(x, scale, offset), x)
    _, pull_ref = jax.vjp(lambda x: reference.batch_norm(x, scale, offset), x)
    s = 1 / np.sqrt(x.var(axis=0) + 1e-5)
    terms = np.max(np.abs(scale * s * g))
    dx, dx_ref = np.asarray(pull(g)[0]), np.asarray(pull_ref(g)[0])
    assert np.max(np.abs(dx - dx_ref)) <= 1e-14 * terms
    _, dx_np, _, _ = _numpy(x, scale, offset, g, 1e-5)
    assert np.max(np.abs(dx - dx_np)) <= 1e-14 * terms
    assert np.max(np.abs(dx)) <= 1e-3 * terms  # eps-sized, as derived
