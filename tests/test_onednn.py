"""The optional ``"onednn"`` conv forms (jaxconv.plan.onednn): float32 host callbacks into oneDNN.

oneDNN computes in float32 only, so these forms are checked against the
float64 reference by their float32 error (within 2x the direct form's, as the
planner asks of every form), through check_vjp's float32 mode, grad-of-grad
(the callbacks' tangents are the lax formulas), jit, vmap, transposed
convolution and 1-D/3-D; and their fallback (float64, groups) and the clear
error when the library is missing.  oneDNN's wheel exists for Linux x86-64,
where CI installs it (``.ci/run``: the ``onednn`` extra).
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import plan, reference
from jaxconv.plan import onednn
from jaxconv.verify import check_vjp

from ._grids import float32_errors  # one float32-error measure for every form

pytestmark = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")),
    reason="oneDNN's wheel (onednn-cpu-gomp) exists for Linux x86-64 only",
)

ONEDNN = dict(conv_forward="onednn", conv_backward="onednn")


def test_library_is_installed_and_loads():
    """CI installs the extra: these forms are tested, not skipped, wherever the wheel exists."""
    assert onednn.library_path() is not None, onednn.INSTALL_HINT
    assert onednn.available()


@pytest.mark.parametrize(
    "ndim,x_shape,w_shape,options",
    [
        (2, (4, 12, 11, 8), (3, 3, 8, 16), dict(padding=1)),
        (2, (4, 13, 12, 6), (3, 3, 6, 8), dict(stride=2, padding="SAME")),
        (2, (3, 14, 14, 4), (5, 5, 4, 8), dict()),
        (2, (2, 11, 10, 3), (3, 2, 3, 5), dict(dilation=2, padding=((2, 1), (0, 3)))),
        (2, (3, 12, 11, 2), (5, 5, 2, 3), dict(stride=3)),  # stride remainder
        (1, (4, 20, 6), (3, 6, 8), dict(padding="SAME")),
        (3, (2, 6, 7, 6, 3), (3, 3, 2, 3, 4), dict(padding=((1, 1), (0, 2), (1, 0)))),
    ],
)
def test_float32_error_within_twice_the_direct_form(ndim, x_shape, w_shape, options):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:-1]))
    op, ref = getattr(jaxconv, f"conv{ndim}d"), getattr(reference, f"conv{ndim}d")
    y = jax.eval_shape(lambda x, w: ref(x, w, **options), x, w)
    g = rng.standard_normal(y.shape)
    ours = float32_errors(op, ref, x, w, g, ONEDNN, **options)
    direct = float32_errors(op, ref, x, w, g, dict(conv_forward="conv", conv_backward="conv"), **options)
    for name, e, d in zip(("y", "dx", "dw"), ours, direct):
        assert e <= 2 * d + 1e-7, (name, e, d)


def _float32(*arrays):
    return [None if a is None else np.asarray(a, np.float32) for a in arrays]


def test_check_vjp_float32_with_bias_jit_and_eager(forms):
    forms(**ONEDNN)
    rng = np.random.default_rng(1)
    x, w, b = _float32(
        rng.standard_normal((3, 9, 8, 4)), rng.standard_normal((3, 3, 4, 5)) * 0.3, rng.standard_normal(5)
    )
    opts = dict(stride=(1, 2), padding="SAME")
    for jit in (True, False):
        report = check_vjp(
            lambda x, w, b: jaxconv.conv2d(x, w, b, **opts),
            lambda x, w, b: reference.conv2d(x, w, b, **opts),
            x,
            w,
            b,
            dtype=jnp.float32,
            finite_differences=False,
            second_order=False,
            jit=jit,
        )
        report.assert_ok()
        assert report.worst("vjp") <= 1e-5


def test_the_callbacks_really_run(forms):
    forms(**ONEDNN)
    x, w = jnp.ones((2, 6, 6, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)
    text = str(jax.make_jaxpr(jax.grad(lambda x, w: jaxconv.conv2d(x, w).sum(), argnums=(0, 1)))(x, w))
    assert text.count("pure_callback") == 3 and "conv_general_dilated" not in text


def test_second_order_through_the_lax_tangents(forms):
    """grad-of-grad: the callbacks' derivatives are the lax formulas (bilinear tangents)."""
    rng = np.random.default_rng(2)
    x, w = (jnp.asarray(a, jnp.float32) for a in (rng.standard_normal((2, 7, 6, 3)), rng.standard_normal((3, 3, 3, 4))))

    def hessian_vector(op):
        inner = lambda x, w: (op(x, w, padding=1) ** 2).sum()
        return jax.grad(lambda x, w: (jax.grad(inner, argnums=1)(x, w) ** 2).sum(), argnums=(0, 1))(x, w)

    forms(**ONEDNN)
    ours = jax.jit(lambda: hessian_vector(jaxconv.conv2d))()
    want = hessian_vector(reference.conv2d)
    for a, b in zip(ours, want):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5


def test_vmap_and_transposed_convolution(forms):
    forms(**ONEDNN)
    rng = np.random.default_rng(3)
    xs, ws = _float32(rng.standard_normal((2, 3, 6, 6, 2)), rng.standard_normal((2, 3, 3, 2, 4)))
    batched = lambda op: jax.vmap(lambda x, w: op(x, w, padding="SAME"))
    check_vjp(
        batched(jaxconv.conv2d),
        batched(reference.conv2d),
        xs,
        ws,
        dtype=jnp.float32,
        finite_differences=False,
        second_order=False,
    ).assert_ok()
    y, w = _float32(rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((3, 3, 2, 3)))
    opts = dict(stride=2, padding=1, output_padding=1)
    check_vjp(
        lambda y, w: jaxconv.conv_transpose2d(y, w, **opts),
        lambda y, w: reference.conv_transpose2d(y, w, **opts),
        y,
        w,
        dtype=jnp.float32,
        finite_differences=False,
        second_order=False,
    ).assert_ok()


def test_keeps_x_and_w_only(forms, capsys):
    forms(**ONEDNN)
    x, w = jnp.zeros((4, 10, 10, 3), jnp.float32), jnp.zeros((3, 3, 3, 5), jnp.float32)
    capsys.readouterr()
    print_saved_residuals(lambda x, w: jaxconv.conv2d(x, w, padding="SAME").sum(), x, w)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "f32[4,10,10,3]" in lines[0] and "f32[3,3,3,5]" in lines[1], lines


def test_float64_and_groups_run_the_planners_forms(forms):
    forms(**ONEDNN)
    common = dict(
        batch=8,
        out_spatial=(12, 11),
        kernel_spatial=(3, 3),
        in_channels=4,
        out_channels=8,
        stride=(1, 1),
        platform="cpu",
    )
    assert plan.conv_plan(groups=1, dtype=jnp.float32, **common)[:2] == ("onednn", "onednn")
    for case in (
        dict(groups=1, dtype=jnp.float64),
        dict(groups=2, dtype=jnp.float32),
        dict(groups=1, dtype=jnp.float32, platform="gpu"),
    ):
        chosen = plan.conv_plan(**{**common, **case})
        assert "onednn" not in chosen[:2] and "onednn needs" in chosen.reason
    # float64 (the suite's default here) then simply runs and agrees to 1e-12.
    rng = np.random.default_rng(4)
    check_vjp(
        lambda x, w: jaxconv.conv2d(x, w, padding=1),
        lambda x, w: reference.conv2d(x, w, padding=1),
        rng.standard_normal((2, 6, 6, 2)),
        rng.standard_normal((3, 3, 2, 3)),
        finite_differences=False,
        second_order=False,
    ).assert_ok()


def test_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(onednn.LIBRARY_ENV, "/nonexistent/libdnnl.so.3")
    onednn._library.cache_clear()
    onednn._runtime.cache_clear()
    try:
        assert not onednn.available()
        with pytest.raises(
            ValueError, match=r"`conv_forward` \(='onednn'\) needs the oneDNN library.*jaxconv\[onednn\]"
        ):
            plan.forms(conv_forward="onednn").__enter__()
    finally:
        monkeypatch.delenv(onednn.LIBRARY_ENV)
        onednn._library.cache_clear()
        onednn._runtime.cache_clear()
    assert onednn.available()
