"""Winograd minimal filtering (jaxconv.plan.winograd) and the conv forms built on it.

The transforms are checked exactly in rational arithmetic; every Winograd
form (``"winograd2"``, ``"winograd4"``, forward and backward) against
``jax.grad`` of the plain-lax reference in float64 over a stride-1 grid
(paddings past the kernel, sizes no tile divides, 1x1 and 5x5 and
non-square kernels, 1-D and 3-D, several batch blocks), with finite
differences and grad-of-grad, under vmap, on hypothesis-drawn
configurations; their float32 error against the direct form's; the
planner's choice and its fallback; and the residuals they keep.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import plan, reference
from jaxconv.ops import conv as conv_module
from jaxconv.plan import winograd
from jaxconv.verify import check_vjp

from ._grids import conv_arrays, conv_pair, float32_errors

WINOGRAD_FORMS = sorted(plan.WINOGRAD_TILES)


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (3, 2), (2, 5), (4, 5), (5, 4), (6, 3), (2, 1), (1, 4), (2, 9)])
def test_transforms_are_exact(m, r):
    """``A^T ((G g) * (B^T d))`` equals the correlation of d and g, in exact rational arithmetic."""
    at, g, bt = winograd.transforms(m, r)
    alpha = m + r - 1
    assert (len(at), len(at[0]), len(g), len(g[0]), len(bt), len(bt[0])) == (m, alpha, alpha, r, alpha, alpha)
    rng = np.random.default_rng([m, r])
    for _ in range(3):
        d = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-50, 50, alpha), rng.integers(1, 9, alpha))]
        k = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-50, 50, r), rng.integers(1, 9, r))]
        gk = [sum(a * b for a, b in zip(row, k)) for row in g]
        bd = [sum(a * b for a, b in zip(row, d)) for row in bt]
        y = [sum(a * u * v for a, u, v in zip(row, gk, bd)) for row in at]
        assert y == [sum(d[i + t] * k[t] for t in range(r)) for i in range(m)]
    # B^T is scaled to integers (G takes the factors): the data transform multiplies by small whole numbers.
    assert all(v.denominator == 1 for row in bt for v in row)


def test_transforms_refuse_sizes_without_points():
    with pytest.raises(ValueError, match="interpolation points"):
        winograd.transforms(6, 9)
    with pytest.raises(ValueError, match="m >= 1"):
        winograd.transforms(0, 3)


# x shape, w shape, options: all stride 1, dilation 1, one group (what Winograd covers).
GRID = [
    ((2, 6, 6, 3), (3, 3, 3, 4), dict()),
    ((2, 7, 5, 2), (3, 3, 2, 3), dict(padding="SAME")),  # odd sizes: the last tile reads padding
    ((1, 9, 8, 3), (3, 3, 3, 2), dict(padding=((4, 0), (1, 5)))),  # padding past k - 1: dx's pads crop
    ((2, 8, 9, 2), (5, 5, 2, 3), dict(padding=1)),
    ((2, 6, 7, 3), (2, 3, 3, 2), dict(padding=((1, 0), (0, 1)))),  # non-square, even kernel
    ((2, 5, 5, 4), (1, 1, 4, 3), dict()),
    ((1, 3, 3, 2), (3, 3, 2, 2), dict()),  # one output: one tile, mostly cropped
]


def _outside_cond(jaxpr):
    """The primitives of ``jaxpr`` and its nested jaxprs, except those inside a ``cond``'s branches."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        if eqn.primitive.name == "cond":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _outside_cond(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _outside_cond(sub)


def _check_float64(f, ref, args):
    """The forced form really runs (the traced gradient's XLA convolutions are only the direct form inside
    the non-finite guard's cond, so it is not the planner's fallback), and its VJP is the reference's to
    1e-12."""
    names = list(_outside_cond(jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1)))(*args).jaxpr))
    assert "conv_general_dilated" not in names and "cond" in names
    report = check_vjp(f, ref, *args, names=("x", "w", "b"), finite_differences=False, second_order=False)
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
@pytest.mark.parametrize("x_shape,w_shape,options", GRID)
def test_float64_every_tile_on_the_grid(forms, form, x_shape, w_shape, options):
    forms(conv_forward=form, conv_backward=form)
    _check_float64(*conv_pair(options), conv_arrays(np.random.default_rng(0), x_shape, w_shape))


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
@pytest.mark.parametrize("index", [1, 3])
def test_finite_differences_and_second_order(forms, form, index):
    x_shape, w_shape, options = GRID[index]
    forms(conv_forward=form, conv_backward=form)
    f, ref = conv_pair(options)
    check_vjp(f, ref, *conv_arrays(np.random.default_rng(1), x_shape, w_shape), names=("x", "w", "b")).assert_ok()


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
@pytest.mark.parametrize(
    "ndim,x_shape,w_shape,options",
    [
        (1, (2, 11, 3), (3, 3, 4), dict(padding="SAME")),
        (1, (2, 9, 2), (5, 2, 3), dict(padding=((3, 0),))),
        (3, (2, 5, 6, 4, 2), (3, 2, 3, 2, 3), dict(padding=((1, 1), (0, 2), (1, 0)))),
    ],
)
def test_1d_and_3d(forms, form, ndim, x_shape, w_shape, options):
    forms(conv_forward=form, conv_backward=form)
    _check_float64(*conv_pair(options, ndim), conv_arrays(np.random.default_rng(2), x_shape, w_shape))


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
def test_several_batch_blocks(forms, monkeypatch, form):
    """A block budget of one image: the forward's and dx's lax.map and dw's scan over blocks."""
    forms(conv_forward=form, conv_backward=form)
    monkeypatch.setattr(conv_module, "_WINOGRAD_BLOCK_BYTES", 1)
    f, ref = conv_pair(dict(padding="SAME"))
    args = conv_arrays(np.random.default_rng(3), (3, 7, 6, 2), (3, 3, 2, 4))
    text = str(jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1)))(*args))
    assert "scan" in text  # lax.map and the dw accumulation run over blocks
    check_vjp(f, ref, *args, names=("x", "w", "b"), finite_differences=False).assert_ok()


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
def test_transposed_convolution(forms, form):
    """conv_transpose2d's forward is the dx formula and its backward the forward and dw: all Winograd here."""
    forms(conv_forward=form, conv_backward=form)
    rng = np.random.default_rng(4)
    y, w, b = rng.standard_normal((2, 6, 5, 3)), rng.standard_normal((3, 3, 2, 3)), rng.standard_normal(2)
    opts = dict(padding=1)
    check_vjp(
        lambda y, w, b: jaxconv.conv_transpose2d(y, w, b, **opts),
        lambda y, w, b: reference.conv_transpose2d(y, w, b, **opts),
        y,
        w,
        b,
    ).assert_ok()


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
def test_vmap_and_jit(forms, form):
    forms(conv_forward=form, conv_backward=form)
    rng = np.random.default_rng(5)
    xs, ws = rng.standard_normal((3, 2, 6, 6, 2)), rng.standard_normal((3, 3, 3, 2, 4))
    batched = lambda op: jax.vmap(lambda x, w: op(x, w, padding="SAME"))
    check_vjp(batched(jaxconv.conv2d), batched(reference.conv2d), xs, ws, finite_differences=False).assert_ok()


@st.composite
def _stride1_configs(draw):
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pads = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(2))
    size = tuple(max(1, k - lo - hi) + draw(st.integers(0, 6)) for k, (lo, hi) in zip(kernel, pads))
    c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (draw(st.integers(1, 3)), *size, c), (*kernel, c, o), dict(padding=pads)


@settings(max_examples=6, deadline=None)
@given(config=_stride1_configs(), form=st.sampled_from(WINOGRAD_FORMS))
def test_hypothesis_stride1(config, form):
    x_shape, w_shape, options = config
    with plan.forms(conv_forward=form, conv_backward=form):
        f, ref = conv_pair(options)
        report = check_vjp(
            f,
            ref,
            *conv_arrays(np.random.default_rng(6), x_shape, w_shape),
            names=("x", "w", "b"),
            finite_differences=False,
            second_order=False,
        )
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


def test_float32_error_against_the_direct_form():
    """F(2x2, 3x3), the tile the planner uses, stays within 2x the direct form's float32 error in y,
    dx and dw (benchmarks/README.md reports the ratios for every tile); F(4x4, 3x3), a forced-only
    form, loses more (about 3x) but stays usable."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 32)))
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) / np.sqrt(9 * 32))
    g = jnp.asarray(rng.standard_normal((8, 16, 16, 32)))
    direct, tile2, tile4 = (
        float32_errors(
            jaxconv.conv2d, reference.conv2d, x, w, g, dict(conv_forward=form, conv_backward=form), padding="SAME"
        )
        for form in ("conv", "winograd2", "winograd4")
    )
    for name, d, e2, e4 in zip(("y", "dx", "dw"), direct, tile2, tile4):
        print(f"{name}: direct {d:.2e}  F(2,3) {e2:.2e} ({e2 / d:.2f}x)  F(4,3) {e4:.2e} ({e4 / d:.2f}x)")
        assert e2 <= 2 * d, (name, e2, d)
        assert e4 <= 2e-5, (name, e4)


def test_planner_picks_f2x2_3x3_only_where_it_applies(forms):
    def choice(kernel=(3, 3), c=64, o=64, stride=(1, 1), dilation=None, groups=1, platform="cpu", size=32):
        return plan.conv_plan(
            batch=128,
            out_spatial=(size, size),
            kernel_spatial=kernel,
            in_channels=c,
            out_channels=o,
            groups=groups,
            stride=stride,
            dilation=dilation,
            platform=platform,
        )

    assert choice()[:2] == ("winograd2", "winograd2")
    assert "Winograd" in choice().reason
    assert choice(stride=(2, 2)).forward != "winograd2"
    assert choice(dilation=(2, 2)).forward != "winograd2"
    assert choice(groups=2).forward != "winograd2"
    assert choice(kernel=(5, 5)).forward != "winograd2"  # no 5x5 tile keeps float32 within 2x
    assert choice(kernel=(1, 1)).forward != "winograd2"
    assert choice(c=16, o=16).backward == "conv"  # narrow GEMMs: XLA's convolution forms
    assert choice(platform="gpu")[:2] == ("conv", "conv")
    # Forced on a convolution it cannot run, a Winograd form gives way to the planner's own choice.
    forms(conv_forward="winograd4", conv_backward="winograd2")
    strided = choice(stride=(2, 2))
    assert strided[:2] == ("im2row_blocked", "im2row_blocked") and "needs stride 1" in strided.reason
    assert choice(kernel=(5, 5))[:2] == ("winograd4", "winograd2")


def test_forced_on_a_strided_convolution_runs_the_fallback(forms):
    forms(conv_forward="winograd2", conv_backward="winograd2")
    f, ref = conv_pair(dict(stride=2, padding=1))
    check_vjp(
        f,
        ref,
        *conv_arrays(np.random.default_rng(8), (2, 7, 7, 2), (3, 3, 2, 3)),
        names=("x", "w", "b"),
        finite_differences=False,
        second_order=False,
    ).assert_ok()


@pytest.mark.parametrize("form", WINOGRAD_FORMS)
def test_saves_x_and_w_only(forms, capsys, form):
    """Like every conv form, the Winograd ones keep x and w (autodiff's residuals), no transformed tiles."""
    forms(conv_forward=form, conv_backward=form)
    x, w, b = jnp.zeros((4, 10, 10, 3)), jnp.zeros((3, 3, 3, 5)), jnp.zeros(5)
    capsys.readouterr()
    print_saved_residuals(lambda x, w: jaxconv.conv2d(x, w, b, padding="SAME").sum(), x, w)
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 2
        and "[4,10,10,3] from the argument x" in lines[0]
        and "[3,3,3,5] from the argument w" in lines[1]
    ), lines


def _nonfinite_input(n=4, size=16, channels=32, dtype=np.float32):
    """x with an inf, a -inf and a NaN in separate images, away from each other."""
    x = np.random.default_rng(0).standard_normal((n, size, size, channels)).astype(dtype)
    x[0, 5, 6, 3] = np.inf
    x[1, 9, 2, 0] = -np.inf
    x[2, 12, 13, 7] = np.nan
    return x


def _same_pattern(got, want, what):
    """inf, -inf and NaN in the same entries, the finite entries close."""
    got, want = np.asarray(got), np.asarray(want)
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        np.testing.assert_array_equal(test(got), test(want), err_msg=f"{what}: {name} entries differ")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-3, err_msg=what)


@pytest.mark.parametrize("form", [None, *plan.WINOGRAD_TILES])
def test_inf_and_nan_reach_what_the_direct_form_gives_them(forms, form):
    """An inf gives inf (not inf - inf = NaN from a tile transform), and a NaN or inf reaches only the outputs
    whose window reads it, as in the "conv" form: forward, dx and dw; eager and jitted.  ``None``: the
    planner's own choice, which is Winograd for this layer."""
    x = _nonfinite_input()
    w = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32) * 0.1
    chosen = plan.conv_plan(
        batch=4,
        out_spatial=(16, 16),
        kernel_spatial=(3, 3),
        in_channels=32,
        out_channels=32,
        groups=1,
        stride=(1, 1),
        platform="cpu",
        dtype=np.float32,
    )
    assert chosen.forward in plan.WINOGRAD_TILES and chosen.backward in plan.WINOGRAD_TILES, chosen
    g = np.random.default_rng(2).standard_normal((4, 16, 16, 32)).astype(np.float32)
    g[3, 4, 4, 5] = np.inf  # dx and dw from a non-finite output gradient too

    def run(x, w, g):
        y, pull = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, padding=1), x, w)
        return (y, *pull(g))

    with plan.forms(conv_forward="conv", conv_backward="conv"):
        want = jax.jit(run)(x, w, g)
    if form is not None:
        forms(conv_forward=form, conv_backward=form)
    for how, f in (("eager", run), ("jit", jax.jit(run))):
        for name, got, expected in zip(("y", "dx", "dw"), f(x, w, g), want):
            _same_pattern(got, expected, f"{form} {how} {name}")
    # The forward's pattern is the one the formula gives: inf where only the inf is read (not NaN).
    y = np.asarray(want[0])
    assert np.isposinf(y[0, 5, 6]).any() and np.isnan(y[2, 11:14, 12:15]).all()
    assert np.isfinite(y[2, :10]).all()  # far from every non-finite input: finite in every form


def test_all_finite_inputs_still_run_winograd(forms):
    """The guard picks the Winograd branch for finite inputs: its float32 rounding differs from the direct
    form's, and the program holds both branches under one cond."""
    forms(conv_forward="winograd4", conv_backward="winograd4")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 12, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    text = jax.jit(lambda x, w: jaxconv.conv2d(x, w, padding=1)).lower(x, w).as_text()
    assert "stablehlo.case" in text or "stablehlo.if" in text
    winograd_y = np.asarray(jaxconv.conv2d(x, w, padding=1))
    with plan.forms(conv_forward="conv"):
        direct_y = np.asarray(jaxconv.conv2d(x, w, padding=1))
    exact = np.asarray(reference.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1))
    assert not np.array_equal(winograd_y, direct_y)  # a different computation ...
    np.testing.assert_allclose(winograd_y, exact, rtol=1e-3, atol=1e-3)  # ... of the same sum
