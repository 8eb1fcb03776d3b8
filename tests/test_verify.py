"""check_vjp: passes right rules, catches planted wrong ones, names the culprit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import reference
from jaxconv.ops import conv as conv_module
from jaxconv.verify import assert_vjp_ok, check_vjp, relative_error

OPTIONS = dict(stride=2, padding=1)


def _conv_args(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 7, 7, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)


def _conv(x, w, b):
    return jaxconv.conv2d(x, w, b, **OPTIONS)


def _ref(x, w, b):
    return reference.conv2d(x, w, b, **OPTIONS)


def test_right_rule_passes():
    report = check_vjp(_conv, _ref, *_conv_args(), names=("x", "w", "b"))
    assert report.passed, str(report)
    kinds = {c.kind for c in report.checks}
    assert kinds == {"forward", "vjp", "finite-diff", "second-order"}
    assert "second-order" in str(report) and "vjp" in str(report)


def _dw_scaled_rule():
    """The reference's convolution with a hand rule whose dL/dw is off by a factor 1.001."""

    @jax.custom_vjp
    def scaled(x, w, b):
        return _ref(x, w, b)

    def fwd(x, w, b):
        return _ref(x, w, b), (x, w, b)

    def bwd(res, g):
        dx, dw, db = jax.vjp(_ref, *res)[1](g)
        return dx, dw * 1.001, db

    scaled.defvjp(fwd, bwd)
    return scaled


def test_planted_scale_is_caught():
    """A gradient off by a factor 1.001 fails the VJP check for that argument only."""
    report = check_vjp(_dw_scaled_rule(), _ref, *_conv_args(), names=("x", "w", "b"))
    assert not report.passed
    failed = {(c.kind, c.argument) for c in report.failures}
    assert ("vjp", "w") in failed
    assert not any(arg in ("x", "b") for kind, arg in failed if kind == "vjp")
    with pytest.raises(AssertionError, match=r"vjp: argument w: relative error 1\.000e-03"):
        report.assert_ok()


def test_assert_vjp_ok_passes_a_right_rule_and_fails_a_planted_wrong_one():
    """The pytest one-liner: check_vjp's report back when every check passes; one AssertionError
    naming the failed check, argument and error when one fails (here dL/dw off by 1.001)."""
    fast = dict(names=("x", "w", "b"), finite_differences=False, second_order=False)
    report = assert_vjp_ok(_conv, _ref, *_conv_args(), **fast)
    assert report.passed and report.worst("vjp") <= 1e-12
    with pytest.raises(AssertionError) as info:
        assert_vjp_ok(_dw_scaled_rule(), _ref, *_conv_args(), **fast)
    lines = str(info.value).splitlines()
    assert lines[0] == "check_vjp(scaled) failed:"
    failures = [line.strip() for line in lines[1:] if line.startswith("  ")]
    assert failures and all(line.startswith("vjp: argument w: relative error 1.000e-03") for line in failures)


def test_planted_missing_flip_is_caught(monkeypatch):
    """Forgetting Rot180 in dL/dx (channel swap kept) is caught on x."""

    original = conv_module.rot180_swap
    monkeypatch.setattr(conv_module, "rot180_swap", lambda w, groups: original(w[::-1, ::-1], groups))
    report = check_vjp(_conv, _ref, *_conv_args(), names=("x", "w", "b"))
    assert ("vjp", "x") in {(c.kind, c.argument) for c in report.failures}
    with pytest.raises(AssertionError, match="argument x"):
        report.assert_ok()


def test_planted_padding_off_by_one_is_caught(monkeypatch):
    """dL/dx computed with the padding shifted by one row and column is caught."""
    original = conv_module._input_grad_conv

    def shifted(config, w, g):
        (t, b_), (l, r) = config.window.padding
        window = config.window._replace(padding=((t + 1, b_ - 1), (l + 1, r - 1)))
        return original(config._replace(window=window), w, g)

    monkeypatch.setattr(conv_module, "_input_grad_conv", shifted)
    report = check_vjp(_conv, _ref, *_conv_args(), names=("x", "w", "b"))
    assert ("vjp", "x") in {(c.kind, c.argument) for c in report.failures}
    assert ("finite-diff", "x") in {(c.kind, c.argument) for c in report.failures}


def test_wrong_rule_caught_by_finite_differences_alone():
    """With a wrong reference, the finite-difference oracle still flags the rule."""

    @jax.custom_vjp
    def cube(x):
        return x**3

    cube.defvjp(lambda x: (x**3, x), lambda x, g: (2.0 * x**2 * g,))
    x = np.linspace(0.5, 1.5, 7)
    report = check_vjp(cube, cube, x, second_order=False)
    assert report.worst("vjp") == 0.0  # compared with itself: blind
    assert not report.passed and report.failures[0].kind == "finite-diff"


def test_users_own_rule_with_pytree_and_integer_args():
    """A user's rule: softplus with a custom VJP, a dict argument and int labels held fixed."""

    @jax.custom_vjp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defvjp(lambda x: (jnp.logaddexp(x, 0.0), x), lambda x, g: (g * jax.nn.sigmoid(x),))

    def f(params, labels):
        z = softplus(params["a"] * params["b"])
        return jnp.take_along_axis(z, labels[:, None], axis=1)

    def ref(params, labels):
        z = jnp.logaddexp(params["a"] * params["b"], 0.0)
        return jnp.take_along_axis(z, labels[:, None], axis=1)

    rng = np.random.default_rng(1)
    params = {"a": rng.standard_normal((4, 3)), "b": rng.standard_normal((4, 3))}
    labels = np.array([0, 2, 1, 1], dtype=np.int32)
    report = check_vjp(f, ref, params, labels, names=("params", "labels"))
    report.assert_ok()
    assert {c.argument for c in report.checks if c.kind == "vjp"} == {"params['a']", "params['b']"}


def test_float32_mode_uses_float32_tolerance():
    report = check_vjp(_conv, _ref, *_conv_args(), dtype=jnp.float32, finite_differences=False, second_order=False)
    assert all(c.tol == 1e-5 for c in report.checks)
    report.assert_ok()


def test_checker_rejects_bad_arguments():
    with pytest.raises(ValueError, match="floating-point array"):
        check_vjp(lambda n: n, lambda n: n, np.arange(3))
    with pytest.raises(ValueError, match="`dtype`"):
        check_vjp(_conv, _ref, *_conv_args(), dtype=jnp.int32)
    with pytest.raises(ValueError, match="`names`"):
        check_vjp(_conv, _ref, *_conv_args(), names=("x",))


def test_relative_error_handles_zeros_nans_and_shapes():
    assert relative_error(np.zeros(3), np.zeros(3))[:2] == (0.0, 0.0)
    assert relative_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))[1] == 0.0
    assert relative_error(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))[1] == np.inf
    assert relative_error(np.ones(2), np.ones(3))[1] == np.inf
    max_abs, rel, where = relative_error(np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    assert (max_abs, rel, where) == (0.5, 0.25, (1,))


def test_failure_message_gives_the_index_and_both_values():
    """check_vjp's assertion names the worst entry's index and the rule's and the reference's values there."""

    @jax.custom_vjp
    def cube(x):
        return x**3

    cube.defvjp(lambda x: (x**3, x), lambda x, g: (2.0 * x**2 * g,))
    x = np.linspace(0.5, 1.5, 7)
    report = check_vjp(cube, lambda x: x**3, x, names=("x",), second_order=False)
    worst = next(c for c in report.failures if c.kind == "vjp")
    assert worst.where is not None and worst.actual == pytest.approx(2 / 3 * worst.expected)
    with pytest.raises(
        AssertionError,
        match=r"vjp: argument x: relative error 3\.333e-01 > 1e-12 \(max abs error "
        r"\S+ at index \(\d,\); rule gives \S+, reference gives \S+\)",
    ):
        report.assert_ok()
    record = report.to_dict()
    assert record["passed"] is False and record["title"] == "check_vjp"
    assert record["failures"][0].startswith("vjp: argument x")


def test_integer_outputs_get_float0_cotangents():
    """A function returning values and an argmax: the integer output is compared, not differentiated."""

    def f(x):
        return jnp.sort(x), jnp.argmax(x)

    report = check_vjp(f, f, np.array([0.3, -1.2, 2.5, 0.7]), names=("x",))
    report.assert_ok()
    assert {c.argument for c in report.checks if c.kind == "forward"} == {"output[0]", "output[1]"}
