"""jaxconv.matrix: the worked examples of docs/convolution.md §3 entry by entry, adjointness,
M_F^filter against conv2d, K from M, and conv2d's im2row backward against jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxconv
from jaxconv import matrix
from jaxconv._core import window as _window
from jaxconv.ops import conv as conv_module
from jaxconv.verify import check_vjp, relative_error

from ._grids import conv_arrays, conv_pair
from .strategies import conv_configs

# The eager matrix identities compile once per drawn shape: five draws in the fast suite, the
# profile's count under HYPOTHESIS_PROFILE=slow.
_FEW = 5 if settings.default.max_examples < 60 else settings.default.max_examples


def _symbols_x(planes=1, size=6):
    """The X of docs/convolution.md §3 with symbols as numbers: plane c (1-based) holds X_ij = 100(c-1) + 10i + j."""
    i, j = np.meshgrid(np.arange(1, size + 1), np.arange(1, size + 1), indexing="ij")
    return np.stack([100 * c + 10 * i + j for c in range(planes)], axis=-1).astype(np.float64)


def _symbols_f(planes=1, size=3):
    """F_ij = 10i + j per plane, plus 100(c-1) on plane c: shape (KH, KW, C, 1)."""
    return _symbols_x(planes, size)[..., None]


# --- M_X^im (docs/convolution.md §3) ------------------------------------------------------------


def test_patch_matrix_6x6_3x3_is_16x9_with_the_documented_rows():
    x = _symbols_x()
    m = np.asarray(matrix.patch_matrix(x, 3))
    assert m.shape == (16, 9)
    # The rows written out in docs/convolution.md §3 (the first five and the last), symbol for symbol
    # (1-based symbols here: X_ij = 10i + j).
    documented = {
        0: [11, 12, 13, 21, 22, 23, 31, 32, 33],
        1: [12, 13, 14, 22, 23, 24, 32, 33, 34],
        2: [13, 14, 15, 23, 24, 25, 33, 34, 35],
        3: [14, 15, 16, 24, 25, 26, 34, 35, 36],
        4: [21, 22, 23, 31, 32, 33, 41, 42, 43],
        15: [44, 45, 46, 54, 55, 56, 64, 65, 66],
    }
    for row, symbols in documented.items():
        np.testing.assert_array_equal(m[row], symbols)
    # Every row: S_lm's window X_{l+a-1, m+b-1}, a, b = 1..3, read row-major.
    expected = [
        [10 * (l + a) + (mm + b) for a in range(1, 4) for b in range(1, 4)] for l in range(4) for mm in range(4)
    ]
    np.testing.assert_array_equal(m, expected)
    # A column: column 2 is X12 X13 X14 X15 X22 ... X45 (the 4x4 block at offset (1, 2)).
    np.testing.assert_array_equal(m[:, 1], [10 * i + j for i in range(1, 5) for j in range(2, 6)])


def test_patch_matrix_4_planes_is_16x36_blocks_per_plane():
    x = _symbols_x(planes=4)
    m = np.asarray(matrix.patch_matrix(x, 3))
    assert m.shape == (16, 36)
    for c in range(4):  # M_X^im = (M_X1^im M_X2^im M_X3^im M_X4^im)
        block = np.asarray(matrix.patch_matrix(x[:, :, c : c + 1], 3))
        np.testing.assert_array_equal(m[:, 9 * c : 9 * (c + 1)], block)
        np.testing.assert_array_equal(block[0], [100 * c + v for v in (11, 12, 13, 21, 22, 23, 31, 32, 33)])


def test_vec_s_equals_patch_matrix_times_vec_f():
    x, f = _symbols_x(planes=4), _symbols_f(planes=4)
    s = jaxconv.conv2d(jnp.asarray(x)[None], jnp.asarray(f))[0]  # (4, 4, 1)
    np.testing.assert_array_equal(
        np.asarray(matrix.vec(s)), np.asarray(matrix.patch_matrix(x, 3) @ matrix.vec(f[..., 0]))
    )


# --- M_F^filter (docs/convolution.md §3) --------------------------------------------------------------


def test_filter_matrix_6x6_3x3_is_16x36_with_the_documented_rows():
    f = _symbols_f()
    m = np.asarray(matrix.filter_matrix(f, (6, 6)))
    assert m.shape == (16, 36)
    row_of_x = lambda *entries: list(entries) + [0] * (6 - len(entries))  # noqa: E731
    # S11: (F11 F12 F13 0 0 0 | F21 F22 F23 0 0 0 | F31 F32 F33 0 0 0 | 0 ...)
    np.testing.assert_array_equal(m[0], row_of_x(11, 12, 13) + row_of_x(21, 22, 23) + row_of_x(31, 32, 33) + [0] * 18)
    # S12, S13, S14: shifted one column each.
    for shift in (1, 2, 3):
        pad = [0] * shift
        expected = sum((row_of_x(*pad, 10 * r + 1, 10 * r + 2, 10 * r + 3) for r in (1, 2, 3)), []) + [0] * 18
        np.testing.assert_array_equal(m[shift], expected)
    # S21: the whole pattern moved down one row of X (6 columns of vec(X)).
    np.testing.assert_array_equal(m[4], [0] * 6 + list(m[0][:30]))
    # Every entry: F_ab at (S_lm, X_{l+a-1, m+b-1}), zero elsewhere.
    expected = np.zeros((16, 36))
    for l in range(4):
        for mm in range(4):
            for a in range(3):
                for b in range(3):
                    expected[4 * l + mm, 6 * (l + a) + (mm + b)] = 10 * (a + 1) + (b + 1)
    np.testing.assert_array_equal(m, expected)


def test_filter_matrix_4_planes_is_16x144_blocks_per_plane():
    f = _symbols_f(planes=4)
    m = np.asarray(matrix.filter_matrix(f, (6, 6)))
    assert m.shape == (16, 144)
    for c in range(4):  # M_F1^filter = (M_F11 M_F12 M_F13 M_F14)
        block = np.asarray(matrix.filter_matrix(f[:, :, c : c + 1], (6, 6)))
        np.testing.assert_array_equal(m[:, 36 * c : 36 * (c + 1)], block)
        assert block[0, 0] == 100 * c + 11 and block[0, 6] == 100 * c + 21
    x = _symbols_x(planes=4)
    s = jaxconv.conv2d(jnp.asarray(x)[None], jnp.asarray(f))[0]
    np.testing.assert_array_equal(np.asarray(m @ matrix.vec(x)), np.asarray(matrix.vec(s)))


def test_transpose_product_is_full_correlation_with_rot180():
    """v^T = g^T M_F^filter is G_zero-pad * F^rot180: the backward's Rot180 form (docs/convolution.md)."""
    f = _symbols_f()
    g = np.arange(1.0, 17.0)
    v = (g @ np.asarray(matrix.filter_matrix(f, (6, 6)))).reshape(6, 6)
    padded = np.pad(g.reshape(4, 4), 2)
    rot = f[::-1, ::-1, 0, 0]
    expected = np.array([[np.sum(padded[i : i + 3, j : j + 3] * rot) for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(v, expected)
    # v13 = g1 F31 + g5 F21 + g9 F11 (1-based): three entries of g reach x's third row, first column.
    assert v[2, 0] == 1 * 31 + 5 * 21 + 9 * 11


# --- K_conv: 3x3 input, 2x2 kernel ----------------------------------------------------------------------


def test_filter_matrix_3x3_input_2x2_kernel_is_4x9():
    k1, k2, k3, k4 = 1.0, 2.0, 3.0, 4.0
    w = np.array([[k1, k2], [k3, k4]])[:, :, None, None]
    # Each row is the kernel shifted one step along vec(x).
    expected = np.array(
        [
            [k1, k2, 0, k3, k4, 0, 0, 0, 0],
            [0, k1, k2, 0, k3, k4, 0, 0, 0],
            [0, 0, 0, k1, k2, 0, k3, k4, 0],
            [0, 0, 0, 0, k1, k2, 0, k3, k4],
        ]
    )
    np.testing.assert_array_equal(np.asarray(matrix.filter_matrix(w, 3)), expected)


# --- random configurations ------------------------------------------------------------------


def _options(config):
    opts = dict(config["options"])
    return opts, opts.pop("groups")


def _check_adjoint(config):
    """<phi(x), y> = <x, phi*(y)>, and row2im is also what autodiff transposes im2row to."""
    opts, _ = _options(config)
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal(config["x_shape"]))
    k = config["w_shape"][:2]
    rows = jax.eval_shape(lambda x: matrix.im2row(x, k, **opts), x)
    y = jnp.asarray(rng.standard_normal(rows.shape))

    @jax.jit
    def both(x, y):
        rows, pullback = jax.vjp(lambda x: matrix.im2row(x, k, **opts), x)
        return rows, matrix.row2im(y, x.shape, k, **opts), pullback(y)[0]

    rows, back, autodiff_back = both(x, y)
    lhs, rhs = float(jnp.vdot(rows, y)), float(jnp.vdot(x, back))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, float(jnp.linalg.norm(rows) * jnp.linalg.norm(y)))
    assert relative_error(back, autodiff_back)[1] <= 1e-12


@given(config=conv_configs())
def test_im2row_and_row2im_are_adjoint(config):
    _check_adjoint(config)


@settings(max_examples=_FEW)
@given(config=conv_configs())
def test_im2row_times_kernel_is_conv2d(config):
    opts, groups = _options(config)
    rng = np.random.default_rng(11)
    n, _, _, c = config["x_shape"]
    kh, kw, _, o = config["w_shape"]
    x = jnp.asarray(rng.standard_normal(config["x_shape"]))
    w = jnp.asarray(rng.standard_normal((kh, kw, c, o)))  # im2row spans all channels: groups = 1
    y = jaxconv.conv2d(x, w, **opts)
    rows = matrix.im2row(x, (kh, kw), **opts)
    assert rows.shape == (n, y.shape[1] * y.shape[2], kh * kw * c)
    assert relative_error(rows @ w.reshape(-1, o), y.reshape(n, -1, o))[1] <= 1e-12


def _check_filter_matrix(config):
    opts, groups = _options(config)
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal(config["x_shape"]))
    w = jnp.asarray(rng.standard_normal(config["w_shape"]))
    y = jaxconv.conv2d(x, w, groups=groups, **opts)
    m = matrix.filter_matrix(w, x.shape[1:3], groups=groups, **opts)
    assert m.shape == (y.shape[1] * y.shape[2] * y.shape[3], x.shape[1] * x.shape[2] * x.shape[3])
    assert relative_error(matrix.vec(x) @ m.T, matrix.vec(y))[1] <= 1e-12


@settings(max_examples=_FEW)
@given(config=conv_configs())
def test_filter_matrix_times_vec_x_is_vec_conv2d(config):
    _check_filter_matrix(config)


@settings(max_examples=_FEW)
@given(config=conv_configs())
def test_patch_matrix_times_vec_f_is_vec_s(config):
    opts, _ = _options(config)
    rng = np.random.default_rng(13)
    x = rng.standard_normal(config["x_shape"][1:])
    f = rng.standard_normal((*config["w_shape"][:2], x.shape[2]))
    s = jaxconv.conv2d(jnp.asarray(x)[None], jnp.asarray(f)[..., None], **opts)[0]
    m = matrix.patch_matrix(x, f.shape[:2], **opts)
    assert relative_error(m @ matrix.vec(f), matrix.vec(s))[1] <= 1e-12


def _check_round_trip(config):
    opts, groups = _options(config)
    rng = np.random.default_rng(14)
    h, w_ = config["x_shape"][1:3]
    w = jnp.asarray(rng.standard_normal(config["w_shape"]))
    m = matrix.filter_matrix(w, (h, w_), groups=groups, **opts)
    w_back, residual = matrix.kernel_from_matrix(m, (h, w_), w.shape, groups=groups, **opts)
    assert float(residual) <= 1e-12 * float(jnp.linalg.norm(m))
    # Weights that never meet a real pixel are not in m: they come back as 0.
    seen = jnp.asarray(matrix._structure((h, w_), tuple(w.shape), *_static(opts, (h, w_), w.shape), groups)[3] > 0)
    assert relative_error(w_back, jnp.where(seen.reshape(w.shape), w, 0.0))[1] <= 1e-12


@settings(max_examples=_FEW)
@given(config=conv_configs())
def test_kernel_from_filter_matrix_round_trip(config):
    _check_round_trip(config)


def _static(opts, in_hw, w_shape):
    window = _window.parse(in_hw, w_shape[:2], opts["stride"], opts["padding"], opts["dilation"])
    return window.stride, window.padding, window.dilation


def test_kernel_from_matrix_is_the_least_squares_kernel():
    """For a matrix off the structure: the gradient of ||m - M(w)||^2 vanishes at the
    returned w, the residual is that norm, and it equals the off-structure part."""
    rng = np.random.default_rng(15)
    opts = dict(stride=2, padding="SAME", dilation=1, groups=2)
    w_shape, in_hw = (3, 3, 2, 4), (7, 6)
    w0 = jnp.asarray(rng.standard_normal(w_shape))
    m0 = matrix.filter_matrix(w0, in_hw, **opts)
    m = m0 + 0.1 * jnp.asarray(rng.standard_normal(m0.shape))
    w, residual = matrix.kernel_from_matrix(m, in_hw, w_shape, **opts)
    objective = lambda w: jnp.sum((m - matrix.filter_matrix(w, in_hw, **opts)) ** 2)  # noqa: E731
    assert float(jnp.abs(jax.grad(objective)(w)).max()) <= 1e-12
    assert abs(float(residual) - float(jnp.sqrt(objective(w)))) <= 1e-12
    assert float(residual) > 0.1 and float(objective(w0 + 0.01)) > float(objective(w))


def test_weight_that_only_meets_padding_comes_back_zero():
    # A 1x1 input with a 3x3 kernel and padding 1: only the centre weight meets the pixel.
    w = jnp.arange(1.0, 10.0).reshape(3, 3, 1, 1)
    m = matrix.filter_matrix(w, (1, 1), padding=1)
    np.testing.assert_array_equal(np.asarray(m), [[5.0]])
    w_back, residual = matrix.kernel_from_matrix(m, (1, 1), (3, 3, 1, 1), padding=1)
    np.testing.assert_array_equal(np.asarray(w_back)[..., 0, 0], [[0, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert float(residual) == 0.0


def test_float32_views():
    rng = np.random.default_rng(16)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 3, 4)), jnp.float32)
    opts = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    y = jaxconv.conv2d(x, w, **opts)
    m = matrix.filter_matrix(w, (6, 5), **opts)
    assert m.dtype == jnp.float32
    assert relative_error(matrix.vec(x) @ m.T, matrix.vec(y))[1] <= 1e-5
    assert relative_error(matrix.im2row(x, (3, 2), **opts) @ w.reshape(-1, 4), y.reshape(2, -1, 4))[1] <= 1e-5
    w_back, residual = matrix.kernel_from_matrix(m, (6, 5), w.shape, **opts)
    assert w_back.dtype == jnp.float32 and relative_error(w_back, w)[1] <= 1e-6


# --- bad arguments ------------------------------------------------------------------------------


def test_kernel_from_matrix_shape_mismatch_names_both_shapes():
    m = jnp.zeros((16, 35))
    with pytest.raises(ValueError, match=r"`m` has shape \(16, 35\).*16x36"):
        matrix.kernel_from_matrix(m, (6, 6), (3, 3, 1, 1))
    with pytest.raises(ValueError, match="`kernel_shape`"):
        matrix.kernel_from_matrix(jnp.zeros((16, 36)), (6, 6), (3, 3, 1))
    with pytest.raises(ValueError, match="`groups` \\(=2\\)"):
        matrix.kernel_from_matrix(jnp.zeros((16, 36)), (6, 6), (3, 3, 1, 3), groups=2)
    with pytest.raises(ValueError, match="`m` must have rank 2"):
        matrix.kernel_from_matrix(jnp.zeros(16), (6, 6), (3, 3, 1, 1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: matrix.im2row(jnp.zeros((4, 4, 1)), 3), "`x` must have rank 4"),
        (lambda: matrix.im2row(jnp.zeros((1, 4, 4, 1), jnp.int32), 3), "`x` must have a floating dtype"),
        (lambda: matrix.im2row(jnp.zeros((1, 4, 4, 1)), 5), "`kernel_size`"),
        (lambda: matrix.im2row(jnp.zeros((1, 4, 4, 1)), 2, stride=0), r"`stride` \(=0\)"),
        (lambda: matrix.im2row(jnp.zeros((1, 4, 4, 1)), 2, padding="FULL"), "`padding`"),
        (lambda: matrix.row2im(jnp.zeros((1, 8, 4)), (1, 4, 4, 1), 2), r"`rows` has shape \(1, 8, 4\).*\(1, 9, 4\)"),
        (lambda: matrix.row2im(jnp.zeros((1, 9, 4)), (4, 4, 1), 2), "`input_shape`"),
        (lambda: matrix.patch_matrix(jnp.zeros((1, 4, 4, 1)), 2), "`x` must have rank 3"),
        (lambda: matrix.filter_matrix(jnp.zeros((3, 3, 1)), (6, 6)), "`w` must have rank 4"),
        (lambda: matrix.filter_matrix(jnp.zeros((3, 3, 1, 1)), (2, 2)), "`kernel_size`"),
        (lambda: matrix.filter_matrix(jnp.zeros((3, 3, 1, 1)), (6, 6, 1)), "`input_hw`"),
        (lambda: matrix.vec(jnp.zeros((3, 3))), "`a` must have rank 3"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_errors_at_trace_time():
    with pytest.raises(ValueError, match="`m` has shape"):
        jax.jit(lambda m: matrix.kernel_from_matrix(m, (6, 6), (3, 3, 1, 1)))(jnp.zeros((16, 35)))


# --- conv2d's im2row backward strategy ------------------------------------------------------------


def _arrays(rng, config, dtype=np.float64):
    return conv_arrays(rng, config["x_shape"], config["w_shape"], config["bias"], dtype)


def _im2row_strategy():
    """Force conv2d's im2row backward (a context, not a fixture: hypothesis reruns the body)."""
    return jaxconv.plan.forms(conv_backward="im2row")


@given(config=conv_configs())
def test_im2row_strategy_hypothesis_vjp(config):
    f, ref = conv_pair(config["options"])
    with _im2row_strategy():
        check_vjp(
            f, ref, *_arrays(np.random.default_rng(20), config), finite_differences=False, second_order=False
        ).assert_ok()


@pytest.mark.slow  # every check per example (~3 s each); the conformance harness covers im2row in the fast suite
@settings(max_examples=4)
@given(config=conv_configs(max_channels=4, max_hw=8, max_kernel=3))
def test_im2row_strategy_hypothesis_full_check(config):
    """Finite differences and grad-of-grad through phi and phi*, eagerly."""
    f, ref = conv_pair(config["options"])
    with _im2row_strategy():
        check_vjp(f, ref, *_arrays(np.random.default_rng(21), config), jit=False).assert_ok()


@settings(max_examples=4)
@given(config=conv_configs())
def test_im2row_strategy_float32(config):
    f, ref = conv_pair(config["options"])
    with _im2row_strategy():
        report = check_vjp(
            f,
            ref,
            *_arrays(np.random.default_rng(22), config, np.float32),
            dtype=jnp.float32,
            finite_differences=False,
            second_order=False,
        )
    report.assert_ok()


def test_im2row_strategy_is_what_runs(monkeypatch, forms):
    """Breaking phi* breaks dL/dx under the forced strategy, and only that gradient."""
    forms(conv_backward="im2row")
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    loss = lambda x, w: jaxconv.conv2d(x, w, padding=1).sum()  # noqa: E731
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    monkeypatch.setattr(conv_module._window, "unpatches", lambda rows, *a: jnp.zeros((1, 5, 5, 2)))
    dx_broken, dw_same = jax.grad(loss, argnums=(0, 1))(x, w)
    assert float(jnp.abs(dx).sum()) > 0 and float(jnp.abs(dx_broken).sum()) == 0.0
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw_same))


@pytest.mark.slow
@settings(max_examples=80)
@given(config=conv_configs())
def test_im2row_strategy_sweep_slow(config):
    f, ref = conv_pair(config["options"])
    with _im2row_strategy():
        check_vjp(f, ref, *_arrays(np.random.default_rng(23), config)).assert_ok()


@pytest.mark.slow
@settings(max_examples=80)
@given(config=conv_configs(max_channels=8, max_hw=16))
def test_matrix_views_sweep_slow(config):
    _check_adjoint(config)
    _check_filter_matrix(config)
    _check_round_trip(config)
