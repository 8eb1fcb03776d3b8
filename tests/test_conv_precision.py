"""``precision=``: every product of every form, forward and backward, runs at the precision asked for.

The convolutions and ``linear`` accept what lax accepts (``None``, a
``lax.Precision``, its name, a pair, a ``DotAlgorithmPreset``); each
``dot_general`` and ``conv_general_dilated`` in the traced program (the
forward's and the pullback's) carries it, whichever form the planner runs or
:func:`jaxconv.plan.forms` forces; ``None`` leaves lax's default (``None`` in
the jaxpr, exactly as lax's own ops with ``precision=None``).
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxconv
from jaxconv import reference
from jaxconv.plan import CONV_BACKWARD_FORMS, CONV_FORWARD_FORMS

PRODUCTS = ("dot_general", "conv_general_dilated")
# The lax forms (oneDNN's host callbacks have no lax product to carry a precision).
FORWARD = [f for f in CONV_FORWARD_FORMS if f != "onednn"]
BACKWARD = [f for f in CONV_BACKWARD_FORMS if f != "onednn"]


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations (scan, map, pjit, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def _precisions(f, *args):
    """The ``precision`` of every product in ``jax.make_jaxpr(f)(*args)``."""
    closed = jax.make_jaxpr(f)(*args)
    return [eqn.params["precision"] for eqn in _eqns(closed.jaxpr) if eqn.primitive.name in PRODUCTS]


def _forward_and_pullback(op, *args, **options):
    """(forward's precisions, pullback's precisions) of ``op(*args, **options)``."""
    y = jax.eval_shape(lambda *a: op(*a, **options), *args)
    g = jnp.ones(y.shape, y.dtype)
    forward = _precisions(lambda *a: op(*a, **options), *args)
    pullback = _precisions(lambda g, *a: jax.vjp(lambda *b: op(*b, **options), *a)[1](g), g, *args)
    return forward, pullback


# A geometry every form runs (Winograd needs stride 1, dilation 1, one group).
X, W = (2, 6, 6, 3), (3, 3, 3, 4)
HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


def _conv_args(rng, dtype=np.float64):
    return (
        rng.standard_normal(X).astype(dtype),
        rng.standard_normal(W).astype(dtype),
        rng.standard_normal(W[-1]).astype(dtype),
    )


@pytest.mark.parametrize("form", FORWARD)
@pytest.mark.parametrize(
    "precision,expected",
    [
        ("highest", HIGHEST),
        (lax.Precision.HIGH, (lax.Precision.HIGH,) * 2),
        (("default", "highest"), (lax.Precision.DEFAULT, lax.Precision.HIGHEST)),
        (None, None),
    ],
)
def test_every_forward_form_carries_the_precision(forms, form, precision, expected):
    forms(conv_forward=form)
    found, _ = _forward_and_pullback(
        jaxconv.conv2d, *_conv_args(np.random.default_rng(0)), padding=1, precision=precision
    )
    assert found, f"no product in the {form} forward"
    assert all(p == expected for p in found), found


@pytest.mark.parametrize("form", BACKWARD)
@pytest.mark.parametrize("precision,expected", [("highest", HIGHEST), (None, None)])
def test_every_backward_form_carries_the_precision(forms, form, precision, expected):
    forms(conv_backward=form)
    _, found = _forward_and_pullback(
        jaxconv.conv2d, *_conv_args(np.random.default_rng(1)), padding=1, precision=precision
    )
    assert found, f"no product in the {form} backward"
    assert all(p == expected for p in found), found


@pytest.mark.parametrize("form", BACKWARD)
def test_conv_transpose_forward_and_backward_carry_the_precision(forms, form):
    """The transposed convolution's forward is a backward form's dL/dx, its backward the forward form."""
    forms(conv_backward=form, conv_forward="im2row_blocked" if form != "conv" else "conv")
    rng = np.random.default_rng(2)
    y, w = rng.standard_normal((2, 6, 6, 4)), rng.standard_normal(W)
    forward, pullback = _forward_and_pullback(jaxconv.conv_transpose2d, y, w, padding=1, precision="highest")
    assert forward and pullback
    assert all(p == HIGHEST for p in forward + pullback), (forward, pullback)


@pytest.mark.parametrize(
    "op,x_shape,w_shape",
    [
        (jaxconv.conv1d, (2, 7, 3), (3, 3, 4)),
        (jaxconv.conv3d, (1, 4, 5, 4, 2), (2, 3, 2, 2, 3)),
        (jaxconv.conv_transpose1d, (2, 7, 4), (3, 3, 4)),
        (jaxconv.conv_transpose3d, (1, 4, 5, 4, 3), (2, 3, 2, 2, 3)),
    ],
)
@pytest.mark.parametrize("backward", ["conv", "im2row"])
def test_1d_and_3d_carry_the_precision(forms, op, x_shape, w_shape, backward):
    forms(conv_backward=backward, conv_forward="conv" if backward == "conv" else "im2row_blocked")
    rng = np.random.default_rng(3)
    forward, pullback = _forward_and_pullback(
        op,
        rng.standard_normal(x_shape),
        rng.standard_normal(w_shape),
        stride=2,
        padding=1,
        precision=lax.Precision.HIGH,
    )
    assert forward and pullback
    assert all(p == (lax.Precision.HIGH,) * 2 for p in forward + pullback), (forward, pullback)


@pytest.mark.parametrize(
    "forward,backward",
    [
        (f, b)
        for f in FORWARD
        for b in BACKWARD
        if f == b or (f, b) in {("conv", "mixed"), ("im2row_blocked", "im2row")}
    ],
)
def test_results_match_the_reference_in_float64_at_every_precision_form(forms, forward, backward):
    """Precision changes nothing in float64 (CPU computes every product in float64): the rule still equals
    ``jax.vjp`` of the reference given the same precision."""
    forms(conv_forward=forward, conv_backward=backward)
    args = _conv_args(np.random.default_rng(4))
    opts = dict(padding=1, precision="highest")
    y, pull = jax.vjp(lambda *a: jaxconv.conv2d(*a, **opts), *args)
    y_ref, pull_ref = jax.vjp(lambda *a: reference.conv2d(*a, **opts), *args)
    g = np.random.default_rng(5).standard_normal(y.shape)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(pull(g), pull_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_the_reference_passes_precision_through():
    args = _conv_args(np.random.default_rng(6))
    found, pullback = _forward_and_pullback(reference.conv2d, *args, padding=1, precision="highest")
    assert found and all(p == HIGHEST for p in found + pullback)
    found, _ = _forward_and_pullback(reference.conv_transpose2d, np.ones((1, 4, 4, 4)), args[1], precision="highest")
    assert found and all(p == HIGHEST for p in found)
    found, _ = _forward_and_pullback(reference.linear, np.ones((2, 3)), np.ones((3, 4)), precision="highest")
    assert found and all(p == HIGHEST for p in found)


F64 = lax.DotAlgorithmPreset.F64_F64_F64


@pytest.mark.parametrize("precision,expected", [("highest", HIGHEST), (None, None), (F64, F64)])
def test_linear_carries_the_precision_forward_and_backward(precision, expected):
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    forward, pullback = _forward_and_pullback(jaxconv.linear, x, w, b, precision=precision)
    assert len(forward) == 1 and len(pullback) == 3  # y = x w; dx = g w^T, dw = x^T g
    assert all(p == expected for p in forward + pullback), (forward, pullback)
    if precision is not None and not isinstance(precision, lax.DotAlgorithmPreset):
        y, pull = jax.vjp(lambda *a: jaxconv.linear(*a, precision=precision), x, w, b)
        y_ref, pull_ref = jax.vjp(lambda *a: reference.linear(*a, precision=precision), x, w, b)
        np.testing.assert_allclose(y, y_ref, rtol=1e-13)
        for got, want in zip(pull(np.ones_like(y)), pull_ref(np.ones_like(y))):
            np.testing.assert_allclose(got, want, rtol=1e-13)


def test_default_precision_is_what_lax_gives_under_the_default_matmul_precision_flag(forms):
    """``None`` is left to lax: under ``jax.default_matmul_precision`` the rule's products follow the flag
    exactly like lax's own convolution does."""
    forms(conv_forward="im2row_blocked", conv_backward="im2row")
    args = _conv_args(np.random.default_rng(8), np.float32)
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(lambda *a: jaxconv.conv2d(*a, padding=1)).lower(*args).as_text()
        lax_own = jax.jit(lambda *a: reference.conv2d(*a, padding=1)).lower(*args).as_text()
    assert "HIGHEST" in lax_own and "HIGHEST" in ours


@pytest.mark.parametrize("bad", ["HIGHEST_PLEASE", 3, ("highest",), ("a", "b"), object()])
def test_a_bad_precision_is_a_value_error_naming_it(bad):
    x, w, b = _conv_args(np.random.default_rng(9))
    with pytest.raises(ValueError, match=r"`precision` \(="):
        jaxconv.conv2d(x, w, precision=bad)
    with pytest.raises(ValueError, match=r"`precision` \(="):
        jaxconv.conv_transpose2d(np.ones((1, 4, 4, 4)), w, precision=bad)
    with pytest.raises(ValueError, match=r"`precision` \(="):
        jaxconv.linear(np.ones((2, 3)), np.ones((3, 4)), precision=bad)


def test_precision_is_static_configuration_under_jit():
    """Two precisions are two traces (the precision is part of the op's static configuration)."""
    x, w, b = _conv_args(np.random.default_rng(10))
    f = jax.jit(lambda x, w, p: jaxconv.conv2d(x, w, precision=p), static_argnums=2)
    assert "HIGHEST" in f.lower(x, w, "highest").as_text()
    assert "HIGHEST" not in f.lower(x, w, None).as_text()
