"""check_rule on users' own rules (none of them in jaxconv): right ones pass, planted bugs are caught and named.

Every rule here is written the way a user would write it; each planted bug is
a mistake one makes in a hand-derived rule (a mean for a sum, a forgotten chain
factor, a sign, a wrong row stride), and each test asserts the check that
catches it and the argument it names.
"""

from __future__ import annotations

import io
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxconv.verify import (
    arguments,
    array,
    assert_report_ok,
    assert_rule_ok,
    check_rule,
    low_precision_tolerance,
    reduction_size,
    sample,
    shapes,
    sweep,
)

FAST = dict(second_order=False, jit_consistency=False, residuals=False, num_cotangents=1)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _failed(report):
    return {(c.kind, c.argument) for c in report.failures}


# --- users' rules ---------------------------------------------------------------------------


def make_dense(bug=None):
    """``x @ w + b`` with a hand-written VJP; ``bug="db_mean"`` averages the bias gradient over the batch."""

    @jax.custom_vjp
    def dense(x, w, b):
        return x @ w + b

    def fwd(x, w, b):
        return x @ w + b, (x, w)

    def bwd(res, g):
        x, w = res
        db = g.mean(0) if bug == "db_mean" else g.sum(0)
        return g @ w.T, x.T @ g, db

    dense.defvjp(fwd, bwd)
    return dense


def make_scaled_softplus(bug=None):
    """``softplus(beta x) / beta`` with a hand-written JVP in both arguments; ``bug`` drops the -1/beta^2 term."""

    @jax.custom_jvp
    def scaled_softplus(x, beta):
        return jnp.logaddexp(beta * x, 0.0) / beta

    @scaled_softplus.defjvp
    def _(primals, tangents):
        x, beta = primals
        tx, tbeta = tangents
        z = beta * x
        y = jnp.logaddexp(z, 0.0) / beta
        s = jax.nn.sigmoid(z)
        dbeta = s * x / beta if bug == "beta" else s * x / beta - y / beta
        return y, s * tx + dbeta * tbeta

    return scaled_softplus


def make_power(bug=None):
    """``x ** n`` with ``n`` in ``nondiff_argnums``; ``bug`` forgets the factor n."""

    @partial(jax.custom_vjp, nondiff_argnums=(1,))
    def power(x, n):
        return x**n

    def fwd(x, n):
        return x**n, x

    def bwd(n, x, g):
        return ((1 if bug else n) * x ** (n - 1) * g,)

    power.defvjp(fwd, bwd)
    return power


def make_soft_clip(bug=None):
    """``limit * tanh(x / limit)``, ``limit`` a nondiff Python float; ``bug`` forgets the 1/limit inside tanh."""

    @partial(jax.custom_jvp, nondiff_argnums=(1,))
    def soft_clip(x, limit):
        return limit * jnp.tanh(x / limit)

    @soft_clip.defjvp
    def _(limit, primals, tangents):
        (x,), (t,) = primals, tangents
        inner = x if bug else x / limit
        return limit * jnp.tanh(x / limit), (1 - jnp.tanh(inner) ** 2) * t

    return soft_clip


class Moments(NamedTuple):
    mean: jax.Array
    var: jax.Array


def make_moments(bug=None):
    """Column mean and variance of ``batch["x"] * batch["scale"]``, and the argmax (an integer output).

    A dict in (with a boolean mask, held fixed), a NamedTuple and an int array out.
    ``bug`` scales the gradient of ``batch["scale"]`` by 1.0001.
    """

    @jax.custom_vjp
    def moments(batch):
        x = batch["x"] * batch["scale"]
        m = x.mean(0)
        return Moments(m, ((x - m) ** 2).mean(0)), jnp.argmax(x, 0)

    def fwd(batch):
        out = moments(batch)
        return out, (batch, out[0].mean)

    def bwd(res, g):
        batch, m = res
        g_stats, _ = g
        x = batch["x"] * batch["scale"]
        n = x.shape[0]
        dx = g_stats.mean / n + g_stats.var * 2 * (x - m) / n
        dscale = (dx * batch["x"]).sum(0) * (1.0001 if bug else 1.0)
        return ({"x": dx * batch["scale"], "scale": dscale, "mask": None},)

    moments.defvjp(fwd, bwd)
    return moments


def make_polar(bug=None):
    """Two outputs ``(r, theta)`` of two arguments; ``bug`` flips the sign of dtheta/dx."""

    @jax.custom_vjp
    def polar(x, y):
        return jnp.hypot(x, y), jnp.arctan2(y, x)

    def fwd(x, y):
        return polar(x, y), (x, y)

    def bwd(res, g):
        x, y = res
        gr, gt = g
        r2 = x**2 + y**2
        r = jnp.sqrt(r2)
        sign = 1.0 if bug else -1.0
        return gr * x / r + sign * gt * y / r2, gr * y / r + gt * x / r2

    polar.defvjp(fwd, bwd)
    return polar


def _host_sin(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="broadcast_all")


def make_host_sin(bug=None):
    """``sin`` computed on the host by a callback: the primal cannot be differentiated."""

    @jax.custom_vjp
    def host_sin(x):
        return _host_sin(x)

    host_sin.defvjp(lambda x: (_host_sin(x), x), lambda x, g: ((1.01 if bug else 1.0) * jnp.cos(x) * g,))
    return host_sin


# A 'valid', stride-1 correlation whose backward walks the kernel taps, flattened
# row-major; the bug takes the row stride of the flattened taps to be KH instead
# of KW: right for every square kernel, wrong for most others.
def _correlate(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tap_backward(row_stride):
    def bwd(res, g):
        x, w = res
        kh, kw, c, o = w.shape
        ho, wo = g.shape[1:3]
        taps = w.reshape(kh * kw, c, o)
        dx = jnp.zeros_like(x)
        dw = []
        for i in range(kh):
            for j in range(kw):
                tap = taps[i * row_stride(kh, kw) + j]
                dx = dx.at[:, i : i + ho, j : j + wo, :].add(jnp.einsum("nhwo,co->nhwc", g, tap))
                dw.append(jnp.einsum("nhwc,nhwo->co", x[:, i : i + ho, j : j + wo, :], g))
        return dx, jnp.stack(dw).reshape(kh, kw, c, o)

    return bwd


correlate_buggy = jax.custom_vjp(_correlate)
correlate_buggy.defvjp(lambda x, w: (_correlate(x, w), (x, w)), _tap_backward(lambda kh, kw: kh))
correlate_right = jax.custom_vjp(_correlate)
correlate_right.defvjp(lambda x, w: (_correlate(x, w), (x, w)), _tap_backward(lambda kh, kw: kw))


# --- custom_vjp ------------------------------------------------------------------------------


def _dense_args(seed=0):
    rng = _rng(seed)
    return rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)


def test_right_custom_vjp_passes_every_check_against_its_own_primal():
    report = check_rule(make_dense(), *_dense_args())
    assert report.passed, str(report)
    assert report.title == "check_rule" and report.oracle.startswith("autodiff of the primal")
    assert {c.kind for c in report.checks} == {"forward", "vjp", "finite-diff", "second-order", "jit"}
    # Names come from the primal's signature: no `names=` needed.
    assert {c.argument for c in report.checks if c.kind == "vjp"} == {"x", "w", "b"}
    assert report.worst("vjp") <= 1e-14


def test_planted_custom_vjp_bug_is_caught_on_its_argument_with_index_and_values():
    report = check_rule(make_dense("db_mean"), *_dense_args())
    assert ("vjp", "b") in _failed(report) and ("finite-diff", "b") in _failed(report)
    assert not any(arg in ("x", "w") for kind, arg in _failed(report) if kind in ("vjp", "finite-diff"))
    worst = next(c for c in report.failures if c.kind == "vjp")
    # g.mean(0) is g.sum(0) / 4: the rule's value is a quarter of autodiff's.
    assert worst.actual == pytest.approx(worst.expected / 4)
    with pytest.raises(
        AssertionError,
        match=r"vjp: argument b: relative error 7\.500e-01 > 1e-12 \(max abs error "
        r"\S+ at index \(\d,\); rule gives \S+, autodiff gives \S+\)",
    ):
        report.assert_ok()


def test_custom_vjp_with_nondiff_argnums():
    x = _rng(1).uniform(0.5, 1.5, (3, 4))
    report = check_rule(make_power(), x, 3)
    assert report.passed, str(report)
    assert {c.argument for c in report.checks if c.kind == "vjp"} == {"x"}
    assert "held fixed (nondiff_argnums): n" in report.notes
    bad = check_rule(make_power("forgot n"), x, 3, **FAST)
    assert ("vjp", "x") in _failed(bad) and ("finite-diff", "x") in _failed(bad)
    # n as a keyword, bound to its position as JAX does.
    assert check_rule(make_power(), x, kwargs={"n": 2}, **FAST).passed


def test_pytrees_in_and_out_integer_and_boolean_leaves_held_fixed():
    rng = _rng(2)
    batch = {"x": rng.standard_normal((5, 3)), "scale": rng.standard_normal(3), "mask": np.array([True, False, True])}
    report = check_rule(make_moments(), batch, residuals=False)
    assert report.passed, str(report)
    assert {c.argument for c in report.checks if c.kind == "forward"} == {
        "output[0].mean",
        "output[0].var",
        "output[1]",
    }
    assert {c.argument for c in report.checks if c.kind == "vjp"} == {"batch['x']", "batch['scale']"}
    bad = check_rule(make_moments("scale"), batch, **FAST)
    assert ("vjp", "batch['scale']") in _failed(bad)
    assert ("vjp", "batch['x']") not in _failed(bad)
    with pytest.raises(AssertionError, match=r"vjp: argument batch\['scale'\]: relative error 1\.000e-04"):
        assert_report_ok(bad)


def test_several_outputs_bug_in_one_branch_names_the_argument():
    rng = _rng(3)
    x, y = rng.uniform(0.5, 2.0, 6), rng.uniform(-2.0, 2.0, 6)
    assert check_rule(make_polar(), x, y, **FAST).passed
    bad = check_rule(make_polar("sign"), x, y, **FAST)
    assert ("vjp", "x") in _failed(bad) and ("vjp", "y") not in _failed(bad)


def test_a_bwd_that_raises_is_a_failed_check_not_a_crash():
    @jax.custom_vjp
    def twice(x, y):
        return 2 * x + y

    twice.defvjp(lambda x, y: (2 * x + y, None), lambda _, g: (2 * g,))  # one cotangent for two arguments
    report = check_rule(twice, np.ones(3), np.ones(3), **FAST)
    assert not report.passed
    assert {c.argument for c in report.failures if c.kind == "vjp"} == {"x", "y"}
    assert all("TypeError" in c.error for c in report.failures if c.kind == "vjp")
    with pytest.raises(AssertionError, match=r"vjp: argument x: the rule raised TypeError: Custom VJP bwd rule"):
        report.assert_ok()


# --- custom_jvp ------------------------------------------------------------------------------


def test_right_custom_jvp_passes_jvp_and_transposed_vjp():
    rng = _rng(4)
    x, beta = rng.standard_normal((3, 4)), rng.uniform(0.5, 2.0, (3, 4))
    report = check_rule(make_scaled_softplus(), x, beta, residuals=False)
    assert report.passed, str(report)
    kinds = {c.kind for c in report.checks}
    assert {"jvp", "vjp", "finite-diff", "finite-diff-jvp", "second-order", "jit"} <= kinds
    assert {c.argument for c in report.checks if c.kind == "jvp"} == {"x", "beta"}


def test_planted_custom_jvp_bug_is_caught_in_forward_and_reverse_mode():
    rng = _rng(4)
    x, beta = rng.standard_normal((3, 4)), rng.uniform(0.5, 2.0, (3, 4))
    report = check_rule(make_scaled_softplus("beta"), x, beta, **FAST)
    failed = _failed(report)
    for kind in ("jvp", "vjp", "finite-diff", "finite-diff-jvp"):
        assert (kind, "beta") in failed
        assert (kind, "x") not in failed
    with pytest.raises(
        AssertionError,
        match=r"jvp: argument beta: relative error .* at index \(\d, \d\); "
        r"rule gives \S+, autodiff gives \S+\)",
    ):
        assert_report_ok(report)


def test_custom_jvp_with_nondiff_argnums():
    x = _rng(5).standard_normal(7) * 3
    assert check_rule(make_soft_clip(), x, 2.5, residuals=False).passed
    bad = check_rule(make_soft_clip("forgot 1/limit"), x, 2.5, **FAST)
    assert ("jvp", "x") in _failed(bad) and ("vjp", "x") in _failed(bad)
    # The same bug is invisible at limit = 1: the check is about the rule, not a test of luck.
    assert check_rule(make_soft_clip("forgot 1/limit"), x, 1.0, **FAST).passed


# --- fallbacks and errors -------------------------------------------------------------------


def test_primal_that_cannot_be_differentiated_falls_back_to_finite_differences():
    x = _rng(6).standard_normal((2, 3))
    report = check_rule(make_host_sin(), x, second_order=False, residuals=False)
    assert report.passed, str(report)
    assert report.oracle.startswith("finite differences only")
    assert any("Pure callbacks do not support JVP" in n for n in report.notes)
    assert not any(c.kind == "vjp" for c in report.checks)  # no autodiff to compare with
    assert all(c.note.startswith("the only oracle") for c in report.checks if c.kind == "finite-diff")
    bad = check_rule(make_host_sin("1%"), x, second_order=False, residuals=False, finite_differences=False)
    assert ("finite-diff", "x") in _failed(bad)  # ran although switched off: the only oracle
    assert "finite differences ran although finite_differences=False" in str(bad)


def test_second_order_without_a_differentiable_primal_uses_finite_differences_of_the_vjp():
    """The primal calls the host, but fwd and bwd are jax: grad-of-grad of the rule runs, against central
    differences."""

    def make(derivative):
        @jax.custom_vjp
        def host_sin(x):
            return _host_sin(x)

        host_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (derivative(x) * g,))
        return host_sin

    x = _rng(6).standard_normal(5)
    report = check_rule(make(jnp.cos), x, residuals=False)
    assert report.passed, str(report)
    (second,) = [c for c in report.checks if c.kind == "second-order"]
    assert second.against == "finite differences" and second.note == "oracle: finite differences of the VJP"
    # Right first derivatives, but differentiating the backward gives 0: only the second-order row sees it.
    frozen = check_rule(make(lambda x: lax.stop_gradient(jnp.cos(x))), x, residuals=False)
    assert {(c.kind, c.argument) for c in frozen.failures} == {("second-order", "x")}


def test_custom_jvp_whose_primal_only_has_forward_mode_keeps_autodiff_for_the_jvp():
    """Newton's iteration in a while_loop: JAX differentiates it forward, not in reverse."""

    @jax.custom_jvp
    def newton_sqrt(a):
        def step(carry):
            y, i = carry
            return 0.5 * (y + a / y), i + 1

        return lax.while_loop(lambda c: c[1] < 40, step, (a, 0))[0]

    newton_sqrt.defjvp(lambda p, t: (newton_sqrt(p[0]), t[0] / (2 * newton_sqrt(p[0]))))
    a = _rng(14).uniform(0.5, 4.0, 5)
    report = check_rule(newton_sqrt, a, second_order=False, residuals=False)
    assert report.passed, str(report)
    assert report.oracle.startswith("autodiff of the primal (f.fun) for the JVP, finite differences for the VJP")
    assert {c.kind for c in report.checks} == {"forward", "jvp", "finite-diff", "finite-diff-jvp", "jit"}
    assert any("Reverse-mode differentiation does not work for lax.while_loop" in n for n in report.notes)


def test_a_rule_that_cannot_be_differentiated_twice_says_so():
    report = check_rule(make_host_sin(), _rng(6).standard_normal(3), residuals=False)
    (second,) = [c for c in report.checks if c.kind == "second-order"]
    assert not second.passed and "Pure callbacks" in second.error and "second_order=False" in second.error


def test_plain_function_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"plain function.*check_vjp\(f, ref, \*args\)"):
        check_rule(jnp.tanh, np.ones(3))
    with pytest.raises(TypeError, match="no rule defined yet"):
        check_rule(jax.custom_vjp(lambda x: x), np.ones(3))
    with pytest.raises(ValueError, match="floating-point array"):
        check_rule(make_power(), np.arange(3), 2)


def test_jitted_and_partial_rules_are_unwrapped():
    x = _rng(7).uniform(0.5, 1.5, 4)
    assert check_rule(jax.jit(make_power(), static_argnums=1), x, 2, **FAST).passed
    report = check_rule(partial(make_power("forgot n"), n=3), x, **FAST)
    assert ("vjp", "x") in _failed(report)


def test_jit_row_catches_a_rule_that_only_works_eagerly():
    @jax.custom_vjp
    def positive_part(x):
        return jnp.maximum(x, 0.0)

    def bwd(x, g):
        if bool(jnp.all(x > 0)):  # a Python branch on values: concrete eagerly, an error under jit
            return (g,)
        return (jnp.where(x > 0, g, 0.0),)

    positive_part.defvjp(lambda x: (jnp.maximum(x, 0.0), x), bwd)
    x = np.array([-1.5, -0.5, 0.5, 2.0])
    report = check_rule(positive_part, x, jit=False, second_order=False, residuals=False)
    assert {c.kind for c in report.failures} == {"jit"}
    assert "ConcretizationTypeError" in report.failures[0].error or "Tracer" in report.failures[0].error


# --- residual audit -------------------------------------------------------------------------


def test_residual_audit_lists_bytes_and_flags_a_rule_that_saves_more():
    @jax.custom_vjp
    def hoarding_tanh(x):
        return jnp.tanh(x)

    def fwd(x):
        y = jnp.tanh(x)
        return y, (x, y, jnp.cosh(x))  # x and cosh(x) are not needed: 1 - y**2 is the derivative

    hoarding_tanh.defvjp(fwd, lambda res, g: (g * (1 - res[1] ** 2),))
    x = _rng(8).standard_normal((4, 5))
    report = check_rule(hoarding_tanh, x, second_order=False)
    assert report.passed  # flagged, not failed, without a budget
    audit = report.residuals
    assert [r.nbytes for r in audit.rule] == [4 * 5 * 8] * 3
    # Autodiff of tanh saves two arrays (tanh(x) and 1 - tanh(x)), the rule three.
    assert audit.rule_bytes == 480 and audit.autodiff_bytes == 320 and len(audit.autodiff) == 2
    assert audit.saves_more and audit.ratio == 1.5
    assert any("from the argument x" == r.source for r in audit.rule)
    assert (
        "FLAG: the rule saves 480 B in 3 residuals, autodiff of the primal 320 B in 2: the rule saves 1.50x as much"
    ) in str(report)
    strict = check_rule(hoarding_tanh, x, second_order=False, max_residual_ratio=1.0)
    assert not strict.passed and strict.failures == []
    with pytest.raises(AssertionError, match=r"residuals: FLAG.*over the budget of 1x"):
        strict.assert_ok()


def test_residual_audit_of_a_lean_rule():
    report = check_rule(make_power(), _rng(9).uniform(0.5, 1.5, (8, 8)), 3, **{**FAST, "residuals": True})
    audit = report.residuals
    assert audit.rule_bytes == 8 * 8 * 8 and not audit.saves_more and audit.passed
    assert "FLAG" not in str(report)


# --- low precision --------------------------------------------------------------------------


def make_logistic(bug=None):
    """``sigmoid`` with a custom VJP; ``bug`` writes the derivative as e^x / (1 + e^x)^2: inf/inf in float32."""

    @jax.custom_vjp
    def logistic(x):
        return jax.nn.sigmoid(x)

    def bwd(x, g):
        if bug:
            e = jnp.exp(x)
            return (g * e / (1 + e) ** 2,)
        s = jax.nn.sigmoid(x)
        return (g * s * (1 - s),)

    logistic.defvjp(lambda x: (jax.nn.sigmoid(x), x), bwd)
    return logistic


def test_float32_and_bfloat16_checks_against_float64_evaluation_of_the_rule():
    x = np.linspace(-100, 100, 41)
    for dtype in (jnp.float32, jnp.bfloat16):
        report = check_rule(make_logistic(), x, dtype=dtype, **FAST)
        assert report.passed, str(report)
        name = jnp.dtype(dtype).name
        assert {f"{name} forward", f"{name} vjp"} <= {c.kind for c in report.checks}
        assert all(c.tol == low_precision_tolerance(dtype, 1) for c in report.checks if c.kind.startswith(name))
    # Overflow only in float32: the float64 checks pass, the float32 one fails with the values.
    bad = check_rule(make_logistic("exp"), x, dtype=jnp.float32, **FAST)
    assert {c.kind for c in bad.failures} == {"float32 vjp"}
    with pytest.raises(
        AssertionError,
        match=r"float32 vjp: argument x: relative error inf .*rule gives nan, "
        r"float64 gives",
    ):
        bad.assert_ok()


def test_low_precision_tolerance_scales_with_dtype_and_reduction_size():
    eps32 = float(jnp.finfo(jnp.float32).eps)
    assert low_precision_tolerance(jnp.float32) == pytest.approx(4 * eps32)
    assert low_precision_tolerance(jnp.float32, 1024) == pytest.approx(24 * eps32)
    assert low_precision_tolerance(jnp.bfloat16, 1024) == pytest.approx(24 * 2.0**-7)
    x, w = np.ones((2, 5, 5, 3)), np.ones((3, 2, 3, 4))
    assert reduction_size(_correlate, x, w) == 3 * 2 * 3
    assert reduction_size(lambda a, b: a @ b, np.ones((4, 7)), np.ones((7, 2))) == 7
    assert reduction_size(lambda a: a.sum(axis=(0, 2)), np.ones((3, 4, 5))) == 15
    assert reduction_size(jnp.tanh, np.ones(9)) == 1


def test_float32_tolerance_uses_the_rule_reduction_size():
    rng = _rng(10)
    x, w = rng.standard_normal((2, 6, 6, 4)), rng.standard_normal((3, 3, 4, 2))
    report = check_rule(correlate_right, x, w, dtype=jnp.float32, **FAST)
    assert report.passed, str(report)
    # The longest sum is the forward's, over KH * KW * C = 36 terms (dw's einsums sum N * Ho * Wo = 32).
    assert any("reduction size 36" in n for n in report.notes)
    tol = low_precision_tolerance(jnp.float32, 36)
    assert all(c.tol == tol and c.rel < tol for c in report.checks if c.kind.startswith("float32"))


def make_shifted(fwd_formula):
    """The identity, as a rule whose fwd computes ``fwd_formula(x)``; the primal computes ``(x + 100) - 100``."""

    @jax.custom_vjp
    def shifted(x):
        return (x + 100.0) - 100.0

    shifted.defvjp(lambda x: (fwd_formula(x), None), lambda _, g: (g,))
    return shifted


def test_low_precision_rows_do_not_blame_a_rule_for_the_primal_own_ill_conditioning():
    x = _rng(12).uniform(-1, 1, 16)
    # (x + 100) - 100 keeps no correct digit of x in bfloat16, in the rule and in autodiff alike: passes, with a note.
    same = check_rule(make_shifted(lambda x: (x + 100.0) - 100.0), x, dtype=jnp.bfloat16, **FAST)
    (row,) = [c for c in same.checks if c.kind == "bfloat16 forward"]
    assert same.passed and row.rel > low_precision_tolerance(jnp.bfloat16, 1)
    assert row.note.startswith("ill-conditioned here: autodiff of the primal in bfloat16 is off by")

    # A rule whose own fwd loses what the primal keeps is blamed.
    @jax.custom_vjp
    def exact(x):
        return x

    exact.defvjp(lambda x: ((x + 100.0) - 100.0, None), lambda _, g: (g,))
    worse = check_rule(exact, x, dtype=jnp.bfloat16, **FAST)
    assert {(c.kind, c.argument) for c in worse.failures} == {("bfloat16 forward", "output")}
    assert worse.failures[0].note == ""


def test_finite_differences_resolve_a_tiny_derivative_of_a_large_function():
    @jax.custom_vjp
    def nearly_constant(x):
        return 1e4 + 1e-4 * jnp.sin(x)

    nearly_constant.defvjp(lambda x: (nearly_constant(x), x), lambda x, g: (1e-4 * jnp.cos(x) * g,))
    x = _rng(13).standard_normal(6)
    report = check_rule(nearly_constant, x, **FAST)
    (fd,) = [c for c in report.checks if c.kind == "finite-diff"]
    # The central difference's own rounding noise (~eps * 1e4 / 1e-6 = 2e-6) is 1% of this derivative (~1e-4):
    # a plain relative comparison would fail a right rule; below the noise floor it passes.
    assert fd.max_abs > 1e-6 * max(abs(fd.actual), abs(fd.expected)) and fd.passed
    assert report.passed, str(report)


# --- pytest helpers ------------------------------------------------------------------------


def test_assert_rule_ok_runs_in_float64_without_the_test_enabling_it():
    with jax.enable_x64(False):  # as in a user's test suite that never turns x64 on
        x = np.asarray(_rng(11).standard_normal((3, 2)), np.float32)
        report = assert_rule_ok(make_dense(), x, np.ones((2, 2), np.float32), np.zeros(2, np.float32), **FAST)
        assert not jax.config.jax_enable_x64
    assert all(c.tol == 1e-12 for c in report.checks if c.kind in ("forward", "vjp"))
    assert report.worst("vjp") < 1e-14  # float64 accuracy, not float32's


def test_assert_rule_ok_is_one_readable_assertion():
    x, w, b = _dense_args()
    with pytest.raises(AssertionError) as info:
        assert_rule_ok(make_dense("db_mean"), x, w, b, **FAST)
    lines = str(info.value).splitlines()
    assert lines[0] == "check_rule(dense) failed:"
    assert lines[1].startswith("  vjp: argument b: relative error 7.500e-01 > 1e-12 (max abs error ")
    assert "at index (" in lines[1] and "rule gives" in lines[1] and "autodiff gives" in lines[1]


# --- sweeps ------------------------------------------------------------------------------------

CONV_DIMS = {"N": (1, 2), "H": (1, 4), "W": (1, 4), "C": (1, 2), "KH": (1, 3), "KW": (1, 3), "O": (1, 2)}
CONV_ARGS = {"x": array("N H W C"), "w": array("KH KW C O")}


def _fits(d):
    return d["KH"] <= d["H"] and d["KW"] <= d["W"]


def test_sweep_shrinks_a_non_square_kernel_bug_to_a_minimal_reproducer():
    out = io.StringIO()
    result = sweep(
        correlate_buggy, CONV_ARGS, dims=CONV_DIMS, where=_fits, examples=12, finite_differences=False, stream=out
    )
    assert not result.passed
    d = result.config.dims
    # Smallest: one image, one channel in and out, the image no larger than the kernel, KH != KW.
    assert d["KH"] != d["KW"] and (d["N"], d["C"], d["O"]) == (1, 1, 1)
    assert (d["H"], d["W"]) == (d["KH"], d["KW"])
    assert result.config.seed == 0
    assert ("vjp", "x") in _failed(result.report)
    printed = out.getvalue()
    assert "from tests.test_check_rule import correlate_buggy" in printed
    assert f"x = sample({result.config.shapes['x']!r}, 'normal', seed=0)" in printed
    # The reproducer is real code that fails the same way.
    with pytest.raises(AssertionError, match="vjp: argument x"):
        exec(result.reproducer, {})
    # And the same kernel made square passes: the bug is the shape's.
    square = {**result.config.arguments(), "w": sample((2, 2, 1, 1), seed=1)}
    x_square = sample((1, 2, 2, 1), seed=0)
    assert check_rule(correlate_buggy, x_square, square["w"], **FAST).passed


def test_sweep_passes_a_right_rule_and_counts_examples():
    result = sweep(
        correlate_right, CONV_ARGS, dims=CONV_DIMS, where=_fits, examples=4, finite_differences=False, stream=None
    )
    assert result.passed and result.examples == 4
    assert str(result) == "sweep(correlate_right): 4 configurations passed"
    result.assert_ok()


def test_sweep_with_a_reference_checks_a_plain_function():
    def ref(x, w):
        return _correlate(x, w)

    def mine(x, w):  # a plain function with a wrong flip: no custom rule, so a reference is needed
        return _correlate(x, w[::-1])

    result = sweep(
        mine, CONV_ARGS, dims=CONV_DIMS, where=_fits, ref=ref, examples=8, finite_differences=False, stream=None
    )
    assert not result.passed and result.config.dims["KH"] == 2 and result.report.title == "check_vjp"
    assert "check_vjp(mine, ref, x, w" in result.reproducer


def test_arguments_strategy_shares_named_dimensions_and_respects_where():
    from hypothesis import given, settings

    seen = []

    @settings(max_examples=25, database=None)
    @given(
        arguments(
            {"x": array("N H W C"), "w": array("K K C 4"), "b": shapes(rank=1, min=2, max=3), "stride": 2},
            dims={"N": 1, "H": (2, 6), "W": (2, 6), "C": (1, 3), "K": (1, 3)},
            where=lambda d: d["K"] <= min(d["H"], d["W"]),
        )
    )
    def check(config):
        args = config.arguments()
        assert args["x"].shape[-1] == args["w"].shape[2] and args["x"].shape[0] == 1
        assert args["w"].shape[0] == args["w"].shape[1] <= min(args["x"].shape[1:3])
        assert args["w"].shape[3] == 4 and 2 <= args["b"].shape[0] <= 3 and args["stride"] == 2
        assert args["x"].dtype == np.float64
        seen.append(args["w"].shape[0])

    check()
    assert len(set(seen)) > 1
    with pytest.raises(ValueError, match=r"dimension\(s\) \['C'\] have no size"):
        arguments({"x": array("N C")}, dims={"N": 2})


def test_sample_values_are_deterministic_and_of_their_kind():
    assert np.array_equal(sample((3, 4), seed=5), sample((3, 4), seed=5))
    assert not np.array_equal(sample((3, 4), seed=5), sample((3, 4), seed=6))
    p = sample((4, 6), "permutation")
    assert len(np.unique(p)) == 24 and np.all(p != 0) and np.all(np.abs(p) < 1)
    assert np.all(sample((50,), "positive") >= 0.1)
    labels = sample((30,), ("int", 2, 5))
    assert labels.dtype == np.int32 and labels.min() >= 2 and labels.max() < 5
    assert sample((5,), "bool").dtype == bool
    assert sample((2, 3), lambda rng, shape, dims: np.full(shape, dims["D"]), dims={"D": 7}).max() == 7
    with pytest.raises(ValueError, match="unknown `values`"):
        sample((2,), "gaussian")


def test_missing_hypothesis_says_which_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxconv\[test\]'"):
        sweep(correlate_right, CONV_ARGS, dims=CONV_DIMS)
    # Everything else in jaxconv.verify works without it.
    assert_rule_ok(make_power(), np.array([1.0, 2.0]), 2, **FAST)


def test_sweep_passes_a_static_argument_unchanged_and_needs_no_named_dimensions():
    """A non-array entry of the description (``n``: 3) reaches the rule as given, every example; array
    shapes need no ``dims``.  A right rule passes with nothing to report; the same description
    catches the rule that forgets ``n``, and its failing configuration carries ``n``."""
    description = {"x": shapes(rank=1, min=1, max=3, values="positive"), "n": 3}
    result = sweep(make_power(), description, examples=2, stream=None)
    assert result.passed and result.examples == 2
    assert result.report is None and result.config is None
    bad = sweep(make_power("forgot n"), description, examples=2, stream=None)
    assert not bad.passed and ("vjp", "x") in _failed(bad.report)
    assert bad.config.arguments()["n"] == 3 and bad.config.arguments()["x"].ndim == 1


def test_sweep_takes_a_users_own_strategy_and_spells_out_the_arrays():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    elements = st.floats(0.5, 2.0, allow_nan=False, width=64)
    strategy = st.integers(1, 4).flatmap(
        lambda n: st.fixed_dictionaries(
            {"x": hnp.arrays(np.float64, (n,), elements=elements), "n": st.sampled_from([2, 3])}
        )
    )
    assert sweep(make_power(), strategy, examples=4, stream=None).passed
    buggy = make_power("forgot n")
    result = sweep(buggy, strategy, examples=4, stream=None)
    assert not result.passed and result.config.literal
    assert result.config.static["n"] == 2 and result.config.shapes == {"x": (1,)}
    assert "x = np.array([" in result.reproducer and "dtype='float64')" in result.reproducer
    assert "# power: define or import it here" in result.reproducer  # a local function: not importable
    with pytest.raises(AssertionError, match="vjp: argument x"):
        exec(result.reproducer, {"power": buggy})
