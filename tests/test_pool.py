"""avg_pool2d and max_pool2d: the hand-derived VJPs equal jax.vjp of the plain-lax references.

Max pooling is checked on tie-free inputs (a shuffled permutation) wherever
finite differences run, and on inputs full of ties (integer-valued, all equal,
-inf, NaN) for the exact agreement of the selection with XLA's rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import matrix, reference
from jaxconv._core import window as _window
from jaxconv.ops import pool as pool_module
from jaxconv.verify import check_vjp, relative_error

from .strategies import permutation_input, pool_configs

# x shape, window, stride, padding.  Non-overlapping entries (stride == window)
# run under both backward forms; the others only have "slices".
GRID = [
    ((2, 6, 6, 3), 2, None, "VALID"),
    ((2, 7, 5, 2), 2, None, "VALID"),  # stride remainder: last row gets no window
    ((2, 5, 7, 3), 2, None, ((1, 0), (0, 1))),
    ((1, 8, 7, 2), 3, 3, 1),
    ((2, 4, 4, 3), 4, None, "VALID"),  # global pooling (docs/pooling.md §3)
    ((2, 7, 8, 2), 3, 2, 1),
    ((1, 9, 8, 2), (3, 2), (2, 1), "SAME"),
    ((1, 6, 6, 1), 3, 1, ((1, 0), (1, 1))),
    ((1, 7, 6, 1), (5, 4), 3, ((2, 1), (0, 2))),  # padding of half the window, the most allowed
]

OPS = [
    # name, hand op, reference op, extra options
    ("max", jaxconv.max_pool2d, reference.max_pool2d, {}),
    ("avg_include", jaxconv.avg_pool2d, reference.avg_pool2d, dict(count_include_pad=True)),
    ("avg_exclude", jaxconv.avg_pool2d, reference.avg_pool2d, dict(count_include_pad=False)),
]


def _tiles(window, stride) -> bool:
    return stride is None or _window.ints(window, "w", 2) == _window.ints(stride, "s", 2)


@pytest.fixture
def force(forms):
    """Force a backward form ("reshape" where windows do not tile falls back to "slices")."""
    return lambda name: forms(pool=name)


def _pair(f_op, ref_op, window, options):
    def f(x):
        return f_op(x, window, **options)

    def ref(x):
        return ref_op(x, window, **options)

    return f, ref


def _grid_functions(f_op, ref_op, extra, cases):
    """One function of all the grid's inputs, returning every configuration's output:
    one compiled program per check instead of one per configuration."""
    options = [(window, dict(stride=stride, padding=padding, **extra)) for _, window, stride, padding in cases]

    def f(*xs):
        return tuple(f_op(x, window, **opts) for x, (window, opts) in zip(xs, options))

    def ref(*xs):
        return tuple(ref_op(x, window, **opts) for x, (window, opts) in zip(xs, options))

    return f, ref


def _grid(form):
    """The grid entries the form covers: a forced "reshape" only where windows tile."""
    return [case for case in GRID if form != "reshape" or _tiles(case[1], case[2])]


def _labels(cases):
    return tuple(f"x{shape} w={w} s={s} p={p}" for shape, w, s, p in cases)


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
@pytest.mark.parametrize("op", OPS, ids=[op[0] for op in OPS])
def test_grid_float64_full_check(force, op, form):
    """vjp <= 1e-12, finite differences, grad-of-grad, under jit; tie-free input."""
    force(form)
    name, f_op, ref_op, extra = op
    cases = _grid(form)
    f, ref = _grid_functions(f_op, ref_op, extra, cases)
    rng = np.random.default_rng(0)
    xs = [permutation_input(rng, case[0]) for case in cases]
    report = check_vjp(f, ref, *xs, names=_labels(cases), name=f"{name}[{form}]")
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


def _draw_op(use_max, include):
    """Max, or average with the drawn divisor convention."""
    if use_max:
        return jaxconv.max_pool2d, reference.max_pool2d, {}
    return jaxconv.avg_pool2d, reference.avg_pool2d, dict(count_include_pad=include)


@given(config=pool_configs(max_hw=12, max_window=5), include=st.booleans())
def test_output_shape_formula(config, include):
    window, opts = config["window"], config["options"]
    x = jnp.zeros(config["x_shape"])
    k = _window.ints(window, "window", 2)
    s = k if opts["stride"] is None else _window.ints(opts["stride"], "stride", 2)
    pads = _window.padding(opts["padding"], x.shape[1:3], k, s, (1, 1))
    expected = tuple((n + lo + hi - kk) // ss + 1 for n, (lo, hi), kk, ss in zip(x.shape[1:3], pads, k, s))
    expected = (x.shape[0], *expected, x.shape[3])
    for op, ref_op, extra in [
        (jaxconv.max_pool2d, reference.max_pool2d, {}),
        (jaxconv.avg_pool2d, reference.avg_pool2d, dict(count_include_pad=include)),
    ]:
        assert jax.eval_shape(lambda x: op(x, window, **opts, **extra), x).shape == expected
        assert jax.eval_shape(lambda x: ref_op(x, window, **opts, **extra), x).shape == expected


# --- max pooling: ties, -inf, NaN -------------------------------------------------

TIE_CASES = [
    # x shape, window, stride, padding: non-overlapping, overlapping, padded
    ((2, 6, 6, 2), 2, None, "VALID"),
    ((1, 7, 7, 2), 3, 2, 1),
    ((1, 6, 5, 1), 3, 1, "VALID"),
    ((2, 5, 6, 1), (2, 3), (1, 2), ((1, 1), (0, 1))),
    ((1, 5, 5, 1), 3, 3, "SAME"),
    ((2, 7, 8, 2), 2, 3, 1),  # stride > window: pixels no window reads, phases no offset reaches
    ((1, 6, 7, 1), (1, 2), (3, 2), ((0, 0), (1, 1))),  # ... and windows half in padding
]


@jax.jit(static_argnums=0)
def _exact_vjp(f, x, g):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)[0]


@dataclasses.dataclass(frozen=True)
class _MaxPool:
    """A hashable max pool (a static argument of the jitted vjp: one compile per
    configuration, shared by every input of that shape); the form is part of
    the key because the switch is read at trace time."""

    op: object
    window: object
    stride: object
    padding: object
    form: str | None

    def __call__(self, x):
        return self.op(x, self.window, stride=self.stride, padding=self.padding)


def _assert_same_as_jax_grad(x, window, stride, padding, g_seed=0):
    """Forward and gradient bit for bit equal to jax.vjp of lax.reduce_window(max).

    The cotangent is integer-valued, so the sums of overlapping windows are exact
    in any order: any difference is a different choice of element."""
    f = _MaxPool(jaxconv.max_pool2d, window, stride, padding, jaxconv.plan.forced("pool"))
    ref = _MaxPool(reference.max_pool2d, window, stride, padding, None)
    y_ref = jax.eval_shape(ref, x)
    g = jnp.asarray(np.random.default_rng(g_seed).integers(1, 9, y_ref.shape).astype(x.dtype))
    y, dx = (np.asarray(a) for a in _exact_vjp(f, x, g))
    y_r, dx_r = (np.asarray(a) for a in _exact_vjp(ref, x, g))
    np.testing.assert_array_equal(y, y_r)
    np.testing.assert_array_equal(np.signbit(y[~np.isnan(y)]), np.signbit(y_r[~np.isnan(y_r)]))  # bit for bit
    np.testing.assert_array_equal(dx, dx_r)
    return dx


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
@pytest.mark.parametrize("shape,window,stride,padding", TIE_CASES)
def test_ties_equal_jax_grad_exactly(force, form, shape, window, stride, padding):
    force(form)
    rng = np.random.default_rng(5)
    for x in (
        np.ones(shape),  # every window all-equal
        rng.integers(-2, 3, shape).astype(np.float64),  # integer-valued: ties everywhere
        np.where(rng.random(shape) < 0.5, -np.inf, 1.0),  # -inf ties with the -inf padding
        np.full(shape, -np.inf),
        np.where(rng.random(shape) < 0.5, -0.0, 0.0),  # signed zeros: the maximum of -0.0 and 0.0 is 0.0
    ):
        _assert_same_as_jax_grad(jnp.asarray(x), window, stride, padding)
    _assert_same_as_jax_grad(jnp.asarray(rng.integers(-1, 2, shape).astype(np.float32)), window, stride, padding)


@settings(max_examples=8)
@given(config=pool_configs(max_hw=8, max_window=4), levels=st.integers(1, 3))
def test_hypothesis_ties_equal_jax_grad_exactly(config, levels):
    x = np.random.default_rng(6).integers(0, levels, config["x_shape"]).astype(np.float64)
    _assert_same_as_jax_grad(jnp.asarray(x), config["window"], **config["options"])


def test_first_maximum_in_row_major_order_gets_the_whole_gradient():
    x = jnp.array([[3.0, 1.0, 3.0], [2.0, 3.0, 0.0], [3.0, 3.0, 3.0]]).reshape(1, 3, 3, 1)
    dx = jax.grad(lambda x: jaxconv.max_pool2d(x, 3).sum())(x)
    expected = np.zeros((3, 3))
    expected[0, 0] = 1.0
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0]), expected)


def test_overlapping_windows_add():
    """All-equal 4x4, 3x3 windows at stride 1: each of the 4 windows picks its top-left."""
    dx = jax.jit(jax.grad(lambda x: jaxconv.max_pool2d(x, 3, stride=1).sum()))(jnp.ones((1, 4, 4, 1)))
    expected = np.zeros((4, 4))
    expected[:2, :2] = 1.0
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0]), expected)
    # With 1 of padding the windows reach further; pixel (0, 0) is the first real one of 4 windows.
    dx = jax.jit(jax.grad(lambda x: jaxconv.max_pool2d(x, 3, stride=1, padding=1).sum()))(jnp.ones((1, 4, 4, 1)))
    expected = np.array([[4, 2, 2, 0], [2, 1, 1, 0], [2, 1, 1, 0], [0, 0, 0, 0]], float)
    np.testing.assert_array_equal(np.asarray(dx[0, :, :, 0]), expected)


NAN = np.nan
NAN_WINDOWS = [
    # one 2x2 window in row-major order, and which entry XLA's scan picks
    ([1.0, NAN, 2.0, 1.0], 2),  # the first maximum after the (last) NaN
    ([NAN, 5.0, 2.0, 1.0], 1),
    ([1.0, 5.0, NAN, 1.0], 3),  # a larger value before the NaN does not count
    ([NAN, NAN, 1.0, 1.0], 2),
    ([1.0, 7.0, 2.0, NAN], 3),  # NaN last: the NaN itself
    ([NAN, NAN, NAN, NAN], 3),
]


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
@pytest.mark.parametrize("window,picked", NAN_WINDOWS)
def test_nan_output_and_gradient(force, form, window, picked):
    """A NaN makes the output NaN; the gradient (finite) goes where the docstring says, as jax.grad's."""
    force(form)
    x = jnp.asarray(window).reshape(1, 2, 2, 1)
    y, vjp = jax.vjp(lambda x: jaxconv.max_pool2d(x, 2), x)
    assert np.isnan(np.asarray(y)).all()
    dx = np.asarray(vjp(jnp.full(y.shape, 3.0))[0]).ravel()
    expected = np.zeros(4)
    expected[picked] = 3.0
    np.testing.assert_array_equal(dx, expected)
    _assert_same_as_jax_grad(x, 2, None, "VALID")


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_nan_with_overlap_and_padding_equals_jax_grad(force, form):
    force(form)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, (2, 7, 6, 2)).astype(np.float64)
    x[rng.random(x.shape) < 0.15] = np.nan
    x = jnp.asarray(x)
    for window, stride, padding in [(2, None, 1), (3, 2, 1), (3, 1, ((1, 0), (0, 1))), (3, 3, "SAME")]:
        dx = _assert_same_as_jax_grad(x, window, stride, padding)
        assert np.isfinite(dx).all()


def test_max_pool_backward_is_row2im_of_g_times_first_max_selection():
    """dL/dX = phi*(dY S^T) with phi, phi* = jaxconv.matrix.im2row/row2im and S the
    first maximum of each row of phi(X): per channel, on integer-valued (tied) input."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.integers(0, 3, (2, 7, 6, 3)).astype(np.float64))
    window, stride = (3, 2), (2, 1)
    y, vjp = jax.vjp(lambda x: jaxconv.max_pool2d(x, window, stride=stride), x)
    g = jnp.asarray(rng.standard_normal(y.shape))
    dx = vjp(g)[0]
    for c in range(x.shape[3]):
        xc = x[..., c : c + 1]
        phi = matrix.im2row(xc, window, stride=stride)  # (N, Ho*Wo, KH*KW)
        s = jax.nn.one_hot(jnp.argmax(phi, axis=2), phi.shape[2], dtype=x.dtype)  # argmax: first maximum
        np.testing.assert_array_equal(np.asarray(y[..., c]).reshape(phi.shape[:2]), np.asarray(phi.max(axis=2)))
        rows = g[..., c].reshape(phi.shape[:2])[:, :, None] * s  # dY S^T, one row per window
        expected = matrix.row2im(rows, xc.shape, window, stride=stride)
        np.testing.assert_array_equal(np.asarray(dx[..., c : c + 1]), np.asarray(expected))


def test_not_lowered_to_select_and_scatter():
    """The gradient program is the hand rule: no select_and_scatter, no scatter."""
    x = jnp.zeros((1, 6, 6, 2))
    for window, stride in [(2, None), (3, 2)]:
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jaxconv.max_pool2d(x, window, stride=stride).sum()))(x))
        assert "select_and_scatter" not in jaxpr and "scatter" not in jaxpr
        ref = str(jax.make_jaxpr(jax.grad(lambda x: reference.max_pool2d(x, window, stride=stride).sum()))(x))
        assert "select_and_scatter" in ref  # the check above can fail


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_rule_is_used_not_autodiff(monkeypatch, force, form):
    """Breaking the selection breaks jax.grad of max_pool2d: the rule is what runs."""
    force(form)
    x = jnp.asarray(permutation_input(np.random.default_rng(9), (1, 4, 4, 1)))
    grad = jax.jit(jax.grad(lambda x: jaxconv.max_pool2d(x, 2).sum()))
    good = grad(x)
    monkeypatch.setattr(pool_module, "_selection", lambda pieces: jnp.zeros(pieces[0].shape, jnp.int8))
    bad = jax.grad(lambda x: jaxconv.max_pool2d(x, 2).sum())(x)
    assert not np.array_equal(np.asarray(good), np.asarray(bad))
    np.testing.assert_array_equal(np.asarray(bad[0, ::2, ::2, 0]), np.ones((2, 2)))


# --- max pooling: the residual is S, not x ---------------------------------------

RESIDUAL_CASES = [
    # x shape, window, stride, padding
    ((2, 8, 6, 3), 2, None, "VALID"),
    ((2, 9, 8, 3), 3, 2, "SAME"),
    ((1, 7, 7, 2), 3, 1, 1),
    ((1, 5, 6, 1), 2, 2, 1),  # a padded row and column in every border window
]


def _saved(op, x, window, stride, padding):
    """The arrays the pullback of ``op`` holds on to (computed under jit: eagerly,
    every one of a wide window's slices would compile on its own)."""
    pullback = jax.jit(lambda x: jax.vjp(lambda x: op(x, window, stride=stride, padding=padding), x)[1])(x)
    return [leaf for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "dtype")]


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
@pytest.mark.parametrize("shape,window,stride,padding", RESIDUAL_CASES)
def test_max_pool_saves_the_int8_selection_not_x(force, form, shape, window, stride, padding):
    """One int8 per output (N*Ho*Wo*C bytes) is all the backward keeps; autodiff keeps x."""
    force(form)
    x = jnp.asarray(permutation_input(np.random.default_rng(14), shape))
    y_shape = jax.eval_shape(lambda x: jaxconv.max_pool2d(x, window, stride=stride, padding=padding), x).shape
    saved = _saved(jaxconv.max_pool2d, x, window, stride, padding)
    assert [(a.shape, a.dtype) for a in saved] == [(y_shape, jnp.int8)]
    assert saved[0].nbytes == int(np.prod(y_shape))
    ref_bytes = sum(a.nbytes for a in _saved(reference.max_pool2d, x, window, stride, padding))
    assert ref_bytes >= x.nbytes > saved[0].nbytes
    # The saved array is S itself: the offset, in row-major window order, of the
    # first maximum of each window (x is tie-free and NaN-free, so jnp.argmax's).
    config = pool_module._config(x, 2, window, stride, padding)
    candidates = jnp.stack(pool_module._window_pieces(x, config, -jnp.inf))
    np.testing.assert_array_equal(np.asarray(saved[0]), np.asarray(jnp.argmax(candidates, axis=0)))


def test_print_saved_residuals_shows_only_the_int8_selection(capsys):
    x = jnp.ones((2, 9, 8, 3))
    print_saved_residuals(lambda x: jaxconv.max_pool2d(x, 3, stride=2, padding="SAME"), x)
    ours = capsys.readouterr().out.strip().splitlines()
    print_saved_residuals(lambda x: reference.max_pool2d(x, 3, stride=2, padding="SAME"), x)
    ref = capsys.readouterr().out.strip().splitlines()
    assert len(ours) == 1 and ours[0].startswith("i8[2,5,4,3] ")  # 120 bytes
    assert any(line.startswith("f64[2,9,8,3] ") for line in ref)  # autodiff keeps x: 1728 * 8 bytes


@pytest.mark.parametrize("width,dtype", [(127, jnp.int8), (128, jnp.int32)])
@pytest.mark.parametrize("stride", [None, 1], ids=["reshape", "slices"])
def test_window_of_more_than_127_entries_saves_int32(stride, width, dtype):
    """An offset up to 126 fits int8; a window of 128 or more entries saves int32, and ties still agree.
    Non-overlapping windows run "reshape", overlapping ones "slices"."""
    window = (1, width)
    shape = (1, 2, width + (0 if stride is None else 2), 2)
    y_shape = jax.eval_shape(lambda x: jaxconv.max_pool2d(x, window, stride=stride), jnp.ones(shape)).shape
    saved = _saved(jaxconv.max_pool2d, jnp.ones(shape), window, stride, "VALID")
    assert [(a.shape, a.dtype) for a in saved] == [(y_shape, dtype)]
    x = np.random.default_rng(15).integers(0, 3, shape).astype(np.float64)
    x[0, 0, width - 1, 0] = 7.0  # the last offset of the first window is its maximum
    x[0, 1, :, 1] = -np.inf  # all -inf: offset 0 of every window
    dx = _assert_same_as_jax_grad(jnp.asarray(x), window, stride, "VALID")
    assert dx[0, 0, width - 1, 0] != 0 and dx[0, 1, 0, 1] != 0


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_pullback_vmapped_over_cotangents_with_one_saved_selection(force, form):
    """vmap of the backward alone: batched g, unbatched int8 residual, equal to autodiff's."""
    force(form)
    x = jnp.asarray(np.random.default_rng(16).integers(0, 3, (2, 7, 8, 2)).astype(np.float64))
    for window, stride, padding in [(2, None, "VALID"), (3, 2, 1), (2, 3, ((1, 0), (1, 1)))]:
        y, pullback = jax.vjp(lambda x: jaxconv.max_pool2d(x, window, stride=stride, padding=padding), x)
        _, pullback_ref = jax.vjp(lambda x: reference.max_pool2d(x, window, stride=stride, padding=padding), x)
        gs = jnp.asarray(np.random.default_rng(17).integers(1, 9, (3, *y.shape)).astype(np.float64))
        dx = jax.jit(jax.vmap(lambda g: pullback(g)[0]))(gs)
        np.testing.assert_array_equal(np.asarray(dx), np.asarray(jax.vmap(lambda g: pullback_ref(g)[0])(gs)))


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_vmap_of_vjp_batches_the_saved_selection(force, form):
    """vmap over x: each example saves its own S (a batched int8 residual); exact on ties."""
    force(form)
    rng = np.random.default_rng(18)
    xs = jnp.asarray(rng.integers(0, 3, (3, 2, 6, 7, 2)).astype(np.float64))
    gs = jnp.asarray(rng.integers(1, 9, (3, 2, 3, 4, 2)).astype(np.float64))

    def vjp_of(op):
        return jax.jit(jax.vmap(lambda x, g: jax.vjp(lambda x: op(x, 2, padding=((0, 0), (0, 1))), x)[1](g)[0]))

    np.testing.assert_array_equal(
        np.asarray(vjp_of(jaxconv.max_pool2d)(xs, gs)), np.asarray(vjp_of(reference.max_pool2d)(xs, gs))
    )


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_grad_of_grad_through_the_integer_residual(force, form):
    """jax.grad(jax.grad(...)) and a Hessian-vector product: the int8 residual's cotangent
    is float0, the second derivative flows through g = dL/dy only, as autodiff's."""
    force(form)
    x = jnp.asarray(permutation_input(np.random.default_rng(19), (2, 6, 6, 2)))
    v = jnp.asarray(np.random.default_rng(20).standard_normal(x.shape))

    def losses(op):
        def loss(x):
            return jnp.sum(jnp.sin(op(x, 2) * 1.5) * op(x, 3, stride=2, padding=1)[:, :3, :3, :])

        def outer(x):
            return jnp.vdot(jax.grad(loss)(x), v)

        return jax.jit(jax.grad(outer))(x), jax.jit(lambda x: jax.jvp(jax.grad(loss), (x,), (v,))[1])(x)

    for ours, ref in zip(losses(jaxconv.max_pool2d), losses(reference.max_pool2d)):
        assert float(jnp.abs(ref).max()) > 0  # a nonzero second derivative: the check can fail
        assert relative_error(ours, ref)[1] <= 1e-12


# --- average pooling: worked examples and divisors --------------------------------


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_avg_pool_2x2_backward_spreads_a_quarter_of_g(force, form):
    """docs/pooling.md §2: 4x4 -> 2x2, dL/dx_ij = (1/4) dL/dz_(i/2)(j/2)."""
    force(form)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    g = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    y, vjp = jax.vjp(lambda x: jaxconv.avg_pool2d(x, 2), x)
    np.testing.assert_array_equal(np.asarray(y[0, :, :, 0]), [[2.5, 4.5], [10.5, 12.5]])
    expected = 0.25 * np.kron(np.asarray(g[0, :, :, 0]), np.ones((2, 2)))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0][0, :, :, 0]), expected)


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
def test_count_include_pad_divisors(force, form):
    """3x3 windows, stride 3, padding 1 on 5x5: the corner window holds 4 real pixels."""
    force(form)
    x = jnp.asarray(np.arange(1.0, 26.0).reshape(1, 5, 5, 1))
    g = jnp.ones((1, 2, 2, 1))
    include, vjp_in = jax.vjp(lambda x: jaxconv.avg_pool2d(x, 3, stride=3, padding=1), x)
    exclude, vjp_ex = jax.vjp(lambda x: jaxconv.avg_pool2d(x, 3, stride=3, padding=1, count_include_pad=False), x)
    corner = np.array([1.0, 2.0, 6.0, 7.0])
    assert float(include[0, 0, 0, 0]) == pytest.approx(corner.sum() / 9, rel=1e-15)
    assert float(exclude[0, 0, 0, 0]) == pytest.approx(corner.mean(), rel=1e-15)
    # Window (1, 1) covers rows and columns 2..4: 9 real pixels, both divisors agree.
    assert float(include[0, 1, 1, 0]) == float(exclude[0, 1, 1, 0])
    dx_in, dx_ex = np.asarray(vjp_in(g)[0][0, :, :, 0]), np.asarray(vjp_ex(g)[0][0, :, :, 0])
    np.testing.assert_allclose(dx_in, np.full((5, 5), 1 / 9), rtol=1e-15)
    expected = np.ones((5, 5)) / 6
    expected[:2, :2] = 1 / 4
    expected[2:, 2:] = 1 / 9
    np.testing.assert_allclose(dx_ex, expected, rtol=1e-15)


def test_global_average_pool_is_the_mean():
    x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 7, 7, 4)))
    y = jaxconv.avg_pool2d(x, 7)
    assert relative_error(y[:, 0, 0, :], x.mean(axis=(1, 2)))[1] <= 1e-15
    dx = jax.grad(lambda x: jaxconv.avg_pool2d(x, 7).sum())(x)
    np.testing.assert_allclose(np.asarray(dx), 1 / 49, rtol=1e-15)


# --- jit, vmap -----------------------------------------------------------------------


# --- bad input -------------------------------------------------------------------------

X = jnp.zeros((2, 6, 6, 4))


@pytest.mark.parametrize("op", [jaxconv.max_pool2d, jaxconv.avg_pool2d])
@pytest.mark.parametrize(
    "x,window,kwargs,match",
    [
        (jnp.zeros((6, 6, 4)), 2, {}, r"`x` must have rank 4, got shape \(6, 6, 4\)"),
        (jnp.zeros((1, 2, 6, 6, 4)), 2, {}, r"`x` must have rank 4"),
        (jnp.zeros((2, 6, 6, 4), jnp.int32), 2, {}, r"`x` must have a floating dtype, got dtype int32"),
        (X, 7, {}, r"`window` \(=\(7, 7\).*spans 7 in height, larger than the padded input \(6 \+ 0 \+ 0 = 6\)"),
        (X, (2, 9), dict(padding=1), r"spans 9 in width, larger than the padded input \(6 \+ 1 \+ 1 = 8\)"),
        (X, 0, {}, r"`window` \(=0\) must be >= 1"),
        (X, (2, -1), {}, r"`window` \(=\(2, -1\)\) must be >= 1"),
        (X, 2.5, {}, r"`window` \(=2.5\) must be an int or a pair"),
        (X, 2, dict(stride=0), r"`stride` \(=0\) must be >= 1"),
        (X, 2, dict(stride=(1, -3)), r"`stride` \(=\(1, -3\)\) must be >= 1"),
        (X, 2, dict(padding=-1), r"`padding` \(=-1\) must be non-negative"),
        (X, 2, dict(padding="FULL"), r"`padding` \(='FULL'\) must be 'VALID', 'SAME'"),
        (
            X,
            2,
            dict(padding=3),
            r"`padding` \(=3\) puts 3 on the top, more than half the window "
            r"\(window \(2, 2\): at most 1 = 2 // 2 in height\)",
        ),
        (
            X,
            (3, 2),
            dict(stride=1, padding=((1, 1), (0, 2))),
            r"`padding` \(=\(\(1, 1\), \(0, 2\)\)\) puts 2 on the right, .*at most 1 = 2 // 2 in width",
        ),
        (X, 1, dict(padding=(0, 1)), r"`padding` \(=\(0, 1\)\) puts 1 on the left, .*at most 0 = 1 // 2"),
        (
            jnp.zeros((2, 0, 6, 4)),
            2,
            dict(padding=1),
            r"`x` must have a height and width >= 1 to pool, "
            r"got shape \(2, 0, 6, 4\)",
        ),
    ],
)
def test_bad_input_raises_at_trace_time(op, x, window, kwargs, match):
    with pytest.raises(ValueError, match=match):
        op(x, window, **kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: op(x, window, **kwargs), x)  # no array value needed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(count_include_pad="no"), r"`count_include_pad` \(='no'\) must be a bool"),
        (dict(count_include_pad=None), r"`count_include_pad` \(=None\) must be a bool"),
    ],
)
def test_avg_pool_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: jaxconv.avg_pool2d(x, 2, **kwargs), X)


@pytest.mark.parametrize("op", [jaxconv.max_pool2d, jaxconv.avg_pool2d, reference.max_pool2d, reference.avg_pool2d])
def test_padding_past_half_the_window_is_rejected_as_pytorch_does(op):
    """max_pool2d(x, 2, padding=3) used to return -inf (windows of padding only);
    now half the window is the most padding, and the hand rules and references agree."""
    x = jnp.asarray(np.random.default_rng(13).standard_normal((1, 2, 2, 1)))
    # The references name sides by position (they share no naming code with the ops).
    with pytest.raises(
        ValueError,
        match=r"`padding` \(=3\) puts 3 on the (top|low side of spatial dimension 0), "
        r"more than half the window",
    ):
        op(x, 2, stride=2, padding=3)
    with pytest.raises(
        ValueError,
        match=r"`padding` \(=\(\(0, 0\), \(2, 0\)\)\) puts 2 on the "
        r"(left|low side of spatial dimension 1)",
    ):
        jax.eval_shape(lambda x: op(x, 3, stride=1, padding=((0, 0), (2, 0))), x)
    assert op(x, 2, stride=1, padding=1).shape == (1, 3, 3, 1)  # half the window: allowed


@pytest.mark.slow  # every padding up to half the window, every form (~8 s); the grids keep padded pools fast
def test_every_window_holds_an_input_pixel_at_the_most_padding():
    """Padding of half the window on every side, any stride: no window reads padding only,
    so no max is -inf and the count_include_pad=False divisor is never 0."""
    x = jnp.asarray(np.random.default_rng(21).standard_normal((1, 5, 4, 1)))
    for window in (2, 3, 4, (5, 2)):
        k = _window.ints(window, "window", 2)
        padding = ((k[0] // 2,) * 2, (k[1] // 2,) * 2)
        for stride in (1, 2, 3, 5):
            y = jaxconv.max_pool2d(x, window, stride=stride, padding=padding)
            assert np.isfinite(np.asarray(y)).all()
            avg = jaxconv.avg_pool2d(x, window, stride=stride, padding=padding, count_include_pad=False)
            assert np.isfinite(np.asarray(avg)).all()


def test_same_padding_is_always_within_half_the_window():
    """ "SAME" never trips the rule: every size, window and stride up to 12 x 7 x 5."""
    for size in range(1, 13):
        for k in range(1, 8):
            for s in range(1, 6):
                pads = _window.padding("SAME", (size, size), (k, k), (s, s), (1, 1))
                assert max(pads[0]) <= k // 2, (size, k, s, pads)
                _window.check_pool_padding("SAME", pads, (k, k))


# --- 1-D and 3-D: the same N-d implementation -----------------------------------------------

ND_GRID = [
    # x shape, window, stride, padding
    ((2, 9, 3), 3, 2, "SAME"),
    ((2, 8, 2), 2, None, ((1, 1),)),
    ((1, 7, 2), 3, 3, "VALID"),  # a stride remainder
    ((2, 5, 4, 6, 2), 2, None, "VALID"),
    ((1, 5, 6, 4, 2), 3, 2, 1),
    ((2, 4, 5, 5, 1), (2, 3, 1), (1, 2, 2), ((1, 0), (1, 1), (0, 0))),
]


@pytest.mark.parametrize("form", jaxconv.plan.POOL_FORMS)
@pytest.mark.parametrize("shape,window,stride,padding", ND_GRID)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_1d_and_3d_equal_the_reference_float64(force, form, shape, window, stride, padding, ties):
    """Values and VJPs of avg (both divisors) and max pooling in 1-D and 3-D equal jax.vjp of the
    reference to 1e-12; with ties (integer-valued input) max pooling's gradient goes where XLA's does."""
    force(form)
    ndim = len(shape) - 2
    rng = np.random.default_rng(31)
    x = np.round(3 * rng.standard_normal(shape)) if ties else permutation_input(rng, shape)
    ops = [(f"max_pool{ndim}d", {})] + [(f"avg_pool{ndim}d", dict(count_include_pad=c)) for c in (True, False)]
    for name, extra in ops:
        f = lambda x: getattr(jaxconv, name)(x, window, stride=stride, padding=padding, **extra)  # noqa: E731
        r = lambda x: getattr(reference, name)(x, window, stride=stride, padding=padding, **extra)  # noqa: E731
        y_ref, pull_ref = jax.vjp(r, x)
        y, pull = jax.vjp(f, x)
        ct = rng.standard_normal(y_ref.shape)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(pull(ct)[0]), np.asarray(pull_ref(ct)[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxconv.max_pool1d(jnp.ones((1, 6, 6, 2)), 2), r"`x` must have rank 3"),
        (lambda: jaxconv.max_pool1d(jnp.ones((1, 6, 2)), (2, 2)), r"`window` \(=\(2, 2\)\) must be an int or one int"),
        (lambda: jaxconv.avg_pool3d(jnp.ones((1, 4, 4, 2)), 2), r"`x` must have rank 5"),
        (
            lambda: jaxconv.avg_pool3d(jnp.ones((1, 4, 4, 4, 2)), (2, 2)),
            r"`window` \(=\(2, 2\)\) must be an int or a triple",
        ),
        (
            lambda: jaxconv.max_pool3d(jnp.ones((1, 4, 4, 4, 2)), 3, padding=((2, 0), (0, 0), (0, 0))),
            r"puts 2 on the front, more than half the window",
        ),
        (lambda: jaxconv.max_pool3d(jnp.ones((1, 2, 4, 4, 2)), 3), r"`window` \(=\(3, 3, 3\).*spans 3 in depth"),
        (lambda: jaxconv.avg_pool1d(jnp.ones((1, 6, 2)), 2, stride=0), r"`stride` \(=0\) must be >= 1"),
    ],
)
def test_1d_and_3d_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
