"""conv2d specifics: output sizes, the stride remainder, bias, the rule is what runs, a worked example.

(The float64 VJP / finite-difference / second-order / float32 / jit / vmap /
hypothesis checks of every conv op run in test_conformance.py; every form over
a grid in test_conv_forms.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jaxconv
from jaxconv import reference
from jaxconv._core import window as _window
from jaxconv.ops import conv as conv_module
from jaxconv.verify import check_vjp

from ._grids import CONV2D_GRID, conv_arrays, conv_pair
from .strategies import conv_configs


def forward_for(backward: str) -> str:
    """The forward run with each backward in the tests: the same form (so every
    forward form meets the whole grid too)."""
    return "conv" if backward == "conv" else "im2row_blocked"


@pytest.fixture(params=sorted(conv_module._BACKWARD_FORMS))
def form(request, forms):
    """Run the test once per backward form (with the forward of the same form)."""
    forms(conv_backward=request.param, conv_forward=forward_for(request.param))
    return request.param


@pytest.mark.parametrize("x_shape,w_shape,options", CONV2D_GRID)
def test_every_form_on_the_grid(form, x_shape, w_shape, options):
    """Each backward form (with the forward of its kind) on every grid configuration: VJP against
    the reference in float64 (the harness adds finite differences and second order on its grids)."""
    f, ref = conv_pair(options)
    args = conv_arrays(np.random.default_rng(0), x_shape, w_shape)
    check_vjp(f, ref, *args, names=("x", "w", "b"), finite_differences=False, second_order=False).assert_ok()


@given(config=conv_configs())
def test_output_shape_formula(config):
    x = jnp.zeros(config["x_shape"])
    w = jnp.zeros(config["w_shape"])
    y = jax.eval_shape(lambda x, w: jaxconv.conv2d(x, w, **config["options"]), x, w)
    opts = config["options"]
    s = _window.ints(opts["stride"], "stride", 2)
    d = _window.ints(opts["dilation"], "dilation", 2)
    pads = _window.padding(opts["padding"], x.shape[1:3], w.shape[:2], s, d)
    expected = tuple(
        (size + lo + hi - dd * (k - 1) - 1) // ss + 1
        for size, (lo, hi), k, ss, dd in zip(x.shape[1:3], pads, w.shape[:2], s, d)
    )
    assert y.shape == (x.shape[0], *expected, w.shape[3])
    ref_shape = jax.eval_shape(lambda x, w: reference.conv2d(x, w, **opts), x, w).shape
    assert y.shape == ref_shape


def test_same_padding_keeps_size_at_stride_one():
    y = jaxconv.conv2d(jnp.zeros((1, 7, 6, 2)), jnp.zeros((4, 3, 2, 5)), padding="SAME")
    assert y.shape == (1, 7, 6, 5)


def test_stride_remainder_gets_exact_zero_gradient():
    """Rows and columns that no window reaches receive exactly zero."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 8, 8, 1)))
    w = jnp.ones((3, 3, 1, 1))
    # 8 = 3 + 2*2 + 1: the last row and column are never covered at stride 2.
    dx = jax.grad(lambda x: jaxconv.conv2d(x, w, stride=2).sum())(x)
    assert jnp.all(dx[:, 7, :, :] == 0.0) and jnp.all(dx[:, :, 7, :] == 0.0)
    assert jnp.all(dx[:, :7, :7, :] != 0.0)


def test_without_a_bias_the_gradients_are_those_with_a_zero_bias():
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, 5, 5, 2)), rng.standard_normal((3, 2, 2, 3))
    g = rng.standard_normal((2, 3, 4, 3))
    y, pullback = jax.vjp(lambda x, w: jaxconv.conv2d(x, w), x, w)
    y_b, pullback_b = jax.vjp(lambda x, w, b: jaxconv.conv2d(x, w, b), x, w, np.zeros(3))
    np.testing.assert_array_equal(y, y_b)
    dx, dw = pullback(g)
    dx_b, dw_b, db = pullback_b(g)
    np.testing.assert_array_equal(dx, dx_b)
    np.testing.assert_array_equal(dw, dw_b)
    np.testing.assert_allclose(db, g.sum(axis=(0, 1, 2)), rtol=1e-13)
    _, ref_pullback = jax.vjp(lambda x, w: reference.conv2d(x, w), x, w)
    for mine, theirs in zip((dx, dw), ref_pullback(g)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-13)


def test_rule_is_used_not_autodiff(monkeypatch):
    """Breaking the hand rule breaks jax.grad of conv2d: the rule is what runs."""
    x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1))
    loss = lambda x: jaxconv.conv2d(x, w).sum()
    assert float(jnp.abs(jax.grad(loss)(x)).sum()) > 0
    monkeypatch.setattr(
        conv_module,
        "_input_grad_conv",
        lambda config, w, g: jnp.zeros((g.shape[0], *config.window.in_size, 1), g.dtype),
    )
    assert float(jnp.abs(jax.grad(loss)(x)).sum()) == 0.0


def test_stride_two_backward_is_inserted_gradient_times_rot180_kernel():
    """docs/convolution.md §5.3: 5x5 input, 3x3 kernel, stride 2: dL/dx is Inserted Grad * Rot180(w)."""
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)
    w = jnp.arange(9.0).reshape(3, 3, 1, 1)
    g = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    _, vjp = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, stride=2), x, w)
    dx, dw = vjp(g)
    inserted = np.zeros((7, 7))
    inserted[2:5:2, 2:5:2] = g[0, :, :, 0]
    rot = np.asarray(w[::-1, ::-1, 0, 0])
    expected_dx = np.array([[np.sum(inserted[i : i + 3, j : j + 3] * rot) for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0]), expected_dx)
    expected_dw = np.array(
        [
            [np.sum(np.asarray(x[0, i : i + 3 : 2, j : j + 3 : 2, 0]) * np.asarray(g[0, :, :, 0])) for j in range(3)]
            for i in range(3)
        ]
    )
    np.testing.assert_array_equal(np.asarray(dw[:, :, 0, 0]), expected_dw)
