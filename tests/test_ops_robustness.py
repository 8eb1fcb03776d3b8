"""Every public op on bad input: NaN in is NaN out (eager and under jit), a
non-array is a TypeError naming the argument, an absurd size a ValueError at
trace time (never an abort of the process), and log_loss's probabilities are
checked when concrete."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import reference
from jaxconv._core import args as _args
from jaxconv.ops.local_response import window_extent

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.standard_normal(shape)


def _with_nan(a, *indices):
    a = np.array(a, dtype=np.float64)
    for index in indices:
        a[index] = np.nan
    return a


def _window_reads(marked, window, stride=None, padding="VALID"):
    """Which pooling windows read a marked pixel: an average of the 0/1 marks above 0."""
    return (
        np.asarray(reference.avg_pool2d(jnp.asarray(marked, jnp.float64), window, stride=stride, padding=padding)) > 0
    )


# --- 1. NaN in, NaN out -------------------------------------------------------------
#
# Each case: the op as a function of its arrays, the arrays with a NaN placed in
# one of them, the outputs that NaN must reach (a boolean mask of the output's
# shape), and private switches to force (module, attribute, value).  Shapes are
# large enough for XLA's vectorised CPU code (where max reductions drop NaN).

X16 = _with_nan(_normal(8, 16, 16, 8), (0, 3, 4, 1), (2, 5, 5, slice(None)), (7, 15, 15, 7))
X7 = _with_nan(_normal(2, 7, 7, 3), (0, 3, 2, 1))
W_NAN = _with_nan(_normal(3, 3, 3, 4), (1, 1, 2, 3))
X_QUIRK = np.zeros((1, 2048, 2, 1))
X_QUIRK[0, 1::2, 1, 0] = np.nan  # every 2x2 window is [0, 0, 0, nan]: the documented CPU quirk
P = np.full((3, 4), 0.25)
LABELS = np.array([0, 3, 1])


def _nan_cases():
    x7_marks = np.isnan(X7).astype(float)
    conv_reach = np.asarray(reference.conv2d(jnp.asarray(x7_marks), jnp.ones((3, 3, 3, 4)), padding=1)) > 0
    w_reach = np.zeros((2, 5, 5, 4), bool)
    w_reach[..., 3] = True
    lrn_x = _with_nan(_normal(2, 4, 4, 6), (1, 2, 3, 2))
    below, above = window_extent(3)
    lrn_reach = np.zeros(lrn_x.shape, bool)
    lrn_reach[1, 2, 3, [k for k in range(6) if k - below <= 2 <= k + above]] = True
    x16_marks = np.isnan(X16)
    conv16 = _with_nan(_normal(16, 16, 16, 8), (5, 7, 7, 2))
    conv16_reach = (
        np.asarray(reference.conv2d(jnp.asarray(np.isnan(conv16).astype(float)), jnp.ones((3, 3, 8, 32)), padding=1))
        > 0
    )
    w_lin = _with_nan(_normal(5, 3), (2, 1))
    row = np.zeros((4, 3), bool)
    row[1] = True
    column = np.zeros((4, 3), bool)
    column[:, 1] = True
    softmax_row = np.zeros((4, 6), bool)
    softmax_row[2] = True
    p_labelled = _with_nan(P, (1, 3))  # LABELS[1] == 3: read by the loss
    p_unlabelled = _with_nan(P, (1, 2))  # never read: the loss stays finite
    cases = [
        ("relu", jaxconv.relu, (X16,), np.isnan(X16), {}),
        ("conv2d x", lambda x, w: jaxconv.conv2d(x, w, padding=1), (X7, _normal(3, 3, 3, 4)), conv_reach, {}),
        ("conv2d w", lambda x, w: jaxconv.conv2d(x, w), (_normal(2, 7, 7, 3), W_NAN), w_reach, {}),
        (
            "conv2d b",
            lambda x, w, b: jaxconv.conv2d(x, w, b),
            (_normal(2, 7, 7, 3), _normal(3, 3, 3, 4), _with_nan(_normal(4), 3)),
            w_reach,
            {},
        ),
        (
            "conv2d im2row forward",
            lambda x, w: jaxconv.conv2d(x, w, padding=1),
            (conv16, _normal(3, 3, 8, 32)),
            conv16_reach,
            {"conv_forward": "im2row_blocked"},
        ),
        ("avg_pool2d 2x2", lambda x: jaxconv.avg_pool2d(x, 2), (X16,), _window_reads(x16_marks, 2), {}),
        (
            "avg_pool2d 3x3/2 pad 1",
            lambda x: jaxconv.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
            (X16,),
            _window_reads(x16_marks, 3, 2, 1),
            {},
        ),
        (
            "max_pool2d 2x2 reshape",
            lambda x: jaxconv.max_pool2d(x, 2),
            (X16,),
            _window_reads(x16_marks, 2),
            {"pool": "reshape"},
        ),
        (
            "max_pool2d 2x2 slices",
            lambda x: jaxconv.max_pool2d(x, 2),
            (X16,),
            _window_reads(x16_marks, 2),
            {"pool": "slices"},
        ),
        (
            "max_pool2d 3x3/2 SAME",
            lambda x: jaxconv.max_pool2d(x, 3, stride=2, padding="SAME"),
            (X16,),
            _window_reads(x16_marks, 3, 2, "SAME"),
            {},
        ),
        (
            "max_pool2d [0, 0, 0, nan] windows",
            lambda x: jaxconv.max_pool2d(x, 2),
            (X_QUIRK,),
            np.ones((1, 1024, 1, 1), bool),
            {},
        ),
        ("reference.max_pool2d", lambda x: reference.max_pool2d(x, 2), (X_QUIRK,), np.ones((1, 1024, 1, 1), bool), {}),
        ("lrn", lambda x: jaxconv.lrn(x, size=3), (lrn_x,), lrn_reach, {}),
        ("linear x", jaxconv.linear, (_with_nan(_normal(4, 5), (1, 2)), _normal(5, 3), _normal(3)), row, {}),
        ("linear w", jaxconv.linear, (_normal(4, 5), w_lin, _normal(3)), column, {}),
        ("linear b", jaxconv.linear, (_normal(4, 5), _normal(5, 3), _with_nan(_normal(3), 1)), column, {}),
        ("flatten", jaxconv.flatten, (X7,), np.isnan(X7).reshape(2, -1), {}),
        ("softmax", jaxconv.softmax, (_with_nan(_normal(4, 6), (2, 3)),), softmax_row, {}),
        (
            "softmax_cross_entropy",
            lambda s: jaxconv.softmax_cross_entropy(s, LABELS),
            (_with_nan(_normal(3, 4), (2, 0)),),
            np.array(True),
            {},
        ),  # not the label: the normaliser reads it
        ("log_loss labelled", lambda p: jaxconv.log_loss(p, LABELS), (p_labelled,), np.array(True), {}),
        ("log_loss unlabelled", lambda p: jaxconv.log_loss(p, LABELS), (p_unlabelled,), np.array(False), {}),
        (
            "l2_penalty",
            lambda a, b: jaxconv.l2_penalty({"a": a, "b": b}, 0.1),
            (_normal(3, 2), _with_nan(_normal(4), 0)),
            np.array(True),
            {},
        ),
    ]
    return cases


NAN_CASES = _nan_cases()


@pytest.mark.parametrize("name,op,arrays,reached,force", NAN_CASES, ids=[case[0] for case in NAN_CASES])
def test_nan_reaches_exactly_the_outputs_that_read_it(forms, name, op, arrays, reached, force):
    """Eager, jitted, and jitted into a sum (where XLA fuses the op into a reduction):
    NaN in every output that reads the NaN input, and nowhere else."""
    forms(**force)
    arrays = tuple(jnp.asarray(a) for a in arrays)
    for how, f in [("eager", op), ("jit", jax.jit(op))]:
        y = np.asarray(f(*arrays))
        assert y.shape == reached.shape
        np.testing.assert_array_equal(np.isnan(y), reached, err_msg=f"{name} ({how})")
    total = jax.jit(lambda *a: jnp.sum(op(*a)))(*arrays)
    assert bool(jnp.isnan(total)) == bool(reached.any()), f"{name}: a NaN lost when fused into a sum"


# --- 2. not an array ------------------------------------------------------------------

NOT_ARRAYS = [None, "abc", {"a": 1.0}, object()]

X4, W4 = np.ones((1, 6, 6, 2)), np.ones((3, 3, 2, 4))
ARRAY_ARGUMENTS = [
    # op, its arguments as a function of the one under test, that argument's name
    ("conv2d", lambda v: jaxconv.conv2d(v, W4), "x"),
    ("conv2d", lambda v: jaxconv.conv2d(X4, v), "w"),
    ("conv2d", lambda v: jaxconv.conv2d(X4, W4, v), "b"),
    ("avg_pool2d", lambda v: jaxconv.avg_pool2d(v, 2), "x"),
    ("max_pool2d", lambda v: jaxconv.max_pool2d(v, 2), "x"),
    ("lrn", lambda v: jaxconv.lrn(v), "x"),
    ("relu", lambda v: jaxconv.relu(v), "x"),
    ("linear", lambda v: jaxconv.linear(v, np.ones((3, 2))), "x"),
    ("linear", lambda v: jaxconv.linear(np.ones((4, 3)), v), "w"),
    ("linear", lambda v: jaxconv.linear(np.ones((4, 3)), np.ones((3, 2)), v), "b"),
    ("flatten", lambda v: jaxconv.flatten(v), "x"),
    ("softmax", lambda v: jaxconv.softmax(v), "s"),
    ("log_loss", lambda v: jaxconv.log_loss(v, LABELS), "p"),
    ("log_loss", lambda v: jaxconv.log_loss(P, v), "labels"),
    ("softmax_cross_entropy", lambda v: jaxconv.softmax_cross_entropy(v, LABELS), "logits"),
    ("softmax_cross_entropy", lambda v: jaxconv.softmax_cross_entropy(P, v), "labels"),
    ("l2_penalty", lambda v: jaxconv.l2_penalty({"w": v}, 0.1), "params['w']"),
]


def _not_array_cases():
    cases = []
    for op_name, call, argument in ARRAY_ARGUMENTS:
        for bad in NOT_ARRAYS:
            if bad is None and argument == "b":
                continue  # None is "no bias"
            if argument == "params['w']" and (bad is None or isinstance(bad, dict)):
                continue  # pytree structure, not a leaf: None is no leaf, a dict of floats is leaves
            cases.append(pytest.param(call, argument, bad, id=f"{op_name}-{argument}-{type(bad).__name__}"))
    return cases


@pytest.mark.parametrize("call,argument,bad", _not_array_cases())
def test_a_non_array_is_a_type_error_naming_the_argument(call, argument, bad):
    expected = rf"`{argument}` must be an array .*got {type(bad).__name__}\b"
    with pytest.raises(TypeError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        call(bad)


def test_nested_lists_of_numbers_are_still_arrays():
    np.testing.assert_array_equal(np.asarray(jaxconv.relu([[-1.0, 2.0]])), [[0.0, 2.0]])
    with pytest.raises(TypeError, match=r"`x` must be an array of a floating dtype, got a list that is not one"):
        jaxconv.relu([[1.0, 2.0], [3.0]])  # ragged
    with pytest.raises(ValueError, match=r"`x` must have a floating dtype, got dtype int"):
        jaxconv.relu([1, 2])  # an array, of the wrong dtype: as before, a ValueError


# --- 3. absurd sizes ----------------------------------------------------------------------
#
# Before these limits, several of these aborted the whole process (XLA: "overflow
# in static extent product", SIGABRT), raised OverflowError or an MLIR TypeError,
# ran out of memory (RESOURCE_EXHAUSTED, 80 GB), or hung (lrn with a
# 2**40-channel reduction window).  They run in a child process, so that a
# regression fails these tests instead of killing pytest, and are only compiled,
# never run: without the checks nothing huge is allocated either.

ABSURD = {
    "conv2d padding=2**40": (
        "jaxconv.conv2d(jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1)), padding=2**40)",
        r"`padding` \(=1099511627776\) must be <= 2147483647",
    ),
    "conv2d stride=2**70": (
        "jaxconv.conv2d(jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1)), stride=2**70)",
        r"`stride` \(=1180591620717411303424\) must be <= 2147483647",
    ),
    "conv2d dilation=2**40, padding=2**41": (
        "jaxconv.conv2d(jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1)), dilation=2**40, padding=2**41)",
        r"`dilation` \(=1099511627776\) must be <= 2147483647",
    ),
    "conv2d padded height past 2**31 - 1": (
        "jaxconv.conv2d(jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1)), padding=((2**30, 2**30), (0, 0)))",
        r"`padding` \(1073741824, 1073741824\) makes the padded height 6 \+ 1073741824 \+ 1073741824 = "
        r"2147483654, more than 2147483647",
    ),
    "conv2d padding=10**4 with 64 output channels": (
        "jaxconv.conv2d(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 64)), padding=10**4)",
        r"make the output of shape \(1, 20004, 20004, 64\): 25610241024 elements, more than 2147483647",
    ),
    "reference.conv2d padding=2**40": (
        "reference.conv2d(jnp.ones((1, 6, 6, 1)), jnp.ones((3, 3, 1, 1)), padding=2**40)",
        r"`padding` \(=1099511627776\) must be <= 2147483647",
    ),
    "max_pool2d padding=2**40": (
        "jaxconv.max_pool2d(jnp.ones((1, 6, 6, 1)), 2, padding=2**40)",
        r"`padding` \(=1099511627776\) must be <= 2147483647",
    ),
    "max_pool2d padding=10**4": (
        "jaxconv.max_pool2d(jnp.ones((1, 6, 6, 1)), 2, padding=10**4)",
        r"`padding` \(=10000\) puts 10000 on the top, more than half the window",
    ),
    "max_pool2d window=2**40": (
        "jaxconv.max_pool2d(jnp.ones((1, 6, 6, 1)), 2**40, padding=2**39)",
        r"`window` \(=1099511627776\) must be <= 2147483647",
    ),
    "max_pool2d window=10**5, padding=5*10**4": (
        "jaxconv.max_pool2d(jnp.ones((1, 6, 6, 1)), 10**5, padding=5 * 10**4)",
        r"make the padded input of shape \(1, 100006, 100006, 1\): 10001200036 elements, more than 2147483647",
    ),
    "avg_pool2d window=2**40": (
        "jaxconv.avg_pool2d(jnp.ones((1, 6, 6, 1)), 2**40, padding=2**39)",
        r"`window` \(=1099511627776\) must be <= 2147483647",
    ),
    "avg_pool2d stride=2**70": (
        "jaxconv.avg_pool2d(jnp.ones((1, 6, 6, 1)), 2, stride=2**70)",
        r"`stride` \(=1180591620717411303424\) must be <= 2147483647",
    ),
    "linear output of 10**10 elements": (
        "jaxconv.linear(jnp.ones((10**5, 1)), jnp.ones((1, 10**5)))",
        r"`x.shape\[0\]` and `w.shape\[1\]` make the output of shape \(100000, 100000\): 10000000000 elements",
    ),
    "lrn size=2**40": ("jnp.abs(jaxconv.lrn(x6, size=2**40) - jaxconv.lrn(x6, size=11)).max()", None),
    "lrn size=2**70": ("jnp.abs(jaxconv.lrn(x6, size=2**70) - jaxconv.lrn(x6, size=11)).max()", None),
}

_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    import jaxconv
    from jaxconv import reference
    x6 = jnp.asarray([[[[1.0, -2.0, 3.0, 0.5, 4.0, -1.0]]]])
    for name, (code, mode) in json.loads(sys.argv[1]).items():
        print(json.dumps({"case": name, "started": True}), flush=True)
        try:
            if mode == "compile":  # trace, lower and compile (where XLA aborted), never run
                jax.jit(lambda: eval(code)).lower().compile()
                result = {"case": name, "error": None}
            else:
                result = {"case": name, "error": None, "value": float(eval(code))}
        except Exception as error:
            result = {"case": name, "error": type(error).__name__, "message": str(error).splitlines()[0]}
        print(json.dumps(result), flush=True)
""")


def _run_child(cases: dict) -> tuple[dict, str | None]:
    """Run ``cases`` in order in a child process; its results, and the case it died
    in (an abort, or past the time limit), if it did."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(jaxconv.__file__)), os.environ.get("PYTHONPATH", "")]
        ),
    )
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=120, env=env
        )
        out, how = child.stdout, f"rc {child.returncode}"
    except subprocess.TimeoutExpired as timeout:
        out, how = (timeout.stdout or b"").decode(), "still running after 120 s"
    results, current = {}, None
    for line in out.splitlines():
        record = json.loads(line)
        if "started" in record:
            current = record["case"]
        else:
            results[current] = record
            current = None
    if current is not None:
        results[current] = {"died": f"the child process ended ({how}) during this case"}
    return results, current


@pytest.fixture(scope="module")
def absurd_results():
    """Every ABSURD case in a child process ({case: its result}); after a case that kills
    the child, a new child runs the cases left."""
    left = {name: (code, "value" if match is None else "compile") for name, (code, match) in ABSURD.items()}
    results = {}
    while left:
        done, died_in = _run_child(left)
        results.update(done)
        names = list(left)
        if died_in is None:
            break
        left = {name: left[name] for name in names[names.index(died_in) + 1 :]}
    return results


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_sizes_are_value_errors_at_trace_time(absurd_results, case):
    result = absurd_results.get(case, {"died": "the child process ended before this case"})
    assert "died" not in result, f"{case}: {result['died']}"
    match = ABSURD[case][1]
    if match is None:  # lrn: a window past the channels is clipped; any size works and equals 2C - 1
        assert result["error"] is None, result
        assert result["value"] == 0.0
        return
    assert result["error"] == "ValueError", result
    assert re.search(match, result["message"]), result["message"]


def test_the_limits_are_inclusive_and_need_no_computation():
    """A padded width of exactly MAX_DIM (2**31 - 1 elements, MAX_ELEMENTS) traces;
    one more is rejected.  eval_shape: nothing is allocated."""
    x, w = jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1, 1))
    at_limit = ((0, 0), (0, _args.MAX_DIM - 1))
    assert jax.eval_shape(lambda x: jaxconv.conv2d(x, w, padding=at_limit), x).shape == (1, 1, _args.MAX_DIM, 1)
    with pytest.raises(ValueError, match=r"makes the padded width 1 \+ 0 \+ 2147483647 = 2147483648"):
        jax.eval_shape(lambda x: jaxconv.conv2d(x, w, padding=((0, 0), (0, _args.MAX_DIM))), x)
    with pytest.raises(ValueError, match=r"make the padded input of shape \(2, 1, 2147483647, 1\): 4294967294"):
        jax.eval_shape(lambda x: jaxconv.conv2d(x, w, padding=at_limit), jnp.ones((2, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"`stride` \(=\(1, 2147483648\)\) must be <= 2147483647"):
        jaxconv.conv2d(x, w, stride=(1, 2**31))
    assert jaxconv.conv2d(x, w, stride=(1, _args.MAX_DIM)).shape == (1, 1, 1, 1)


def test_conv_padding_is_bounded_by_size_only():
    """conv2d keeps any padding the sizes allow (FCN's pad=100; outputs reading only
    padding are the bias): padding=10**4 on a 6x6 one-channel input is a 20004 x 20004
    output, 4e8 elements, within MAX_ELEMENTS (shape only: 3.2 GB were it computed)."""
    shape = jax.eval_shape(lambda x: jaxconv.conv2d(x, jnp.ones((3, 3, 1, 1)), padding=10**4), jnp.ones((1, 6, 6, 1)))
    assert shape.shape == (1, 20004, 20004, 1)
    y = jaxconv.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), jnp.full((1,), 0.5), padding=100)
    assert y.shape == (1, 200, 200, 1) and float(y[0, 0, 0, 0]) == 0.5 and float(y[0, 99, 99, 0]) == 4.5


# --- 4. log_loss's probabilities ---------------------------------------------------------


@pytest.mark.parametrize(
    "p,match",
    [
        (
            np.array([[0.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.4], [0.1, 0.9, 0.0, 0.0]]),
            r"`p` \(=0.0 at index \(0, 0\), the labelled class of example 0\) must be in \(0, 1\]: its -log is inf",
        ),
        (
            np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, -0.2, 0.4], [0.1, 0.9, 0.0, 0.0]]),
            r"`p` \(=-0.2 at index \(1, 2\)\) must be a probability in \[0, 1\]",
        ),
        (
            np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.4], [0.1, 1.5, 0.0, 0.0]]),
            r"`p` \(=1.5 at index \(2, 1\)\) must be a probability in \[0, 1\]",
        ),
        (
            np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.4], [0.1, np.inf, 0.0, 0.0]]),
            r"`p` \(=inf at index \(2, 1\)\)",
        ),
    ],
    ids=["labelled zero", "negative", "above one", "inf"],
)
def test_log_loss_rejects_concrete_probabilities_outside_the_range(p, match):
    with pytest.raises(ValueError, match=match):
        jaxconv.log_loss(p, LABELS)
    with pytest.raises(ValueError, match=match):
        jaxconv.log_loss(jnp.asarray(p), jnp.asarray(LABELS))


def test_log_loss_accepts_unlabelled_zeros_and_nan():
    """0 is a probability (a softmax underflows to it); only a labelled 0 is an infinite loss.
    NaN is not range-checked: NaN in, NaN out (test 1)."""
    p = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    assert float(jaxconv.log_loss(p, LABELS)) == pytest.approx(np.log(2) / 3, rel=1e-15)


def test_log_loss_under_jit_checks_nothing_and_gives_what_the_docstring_says():
    loss, grad = jax.jit(jaxconv.log_loss), jax.jit(jax.grad(jaxconv.log_loss))
    labels = jnp.array([0, 1])
    base = np.array([[0.5, 0.5], [0.5, 0.5]])

    def at(index, value):
        p = base.copy()
        p[index] = value
        return jnp.asarray(p)

    assert float(loss(at((0, 0), 0.0), labels)) == np.inf  # labelled 0: +inf ...
    assert float(grad(at((0, 0), 0.0), labels)[0, 0]) == -np.inf  # ... and a -inf gradient there
    assert np.isnan(float(loss(at((0, 0), -0.5), labels)))  # labelled negative: NaN ...
    assert np.isfinite(np.asarray(grad(at((0, 0), -0.5), labels))).all()  # ... with a finite gradient
    assert float(loss(at((0, 0), 4.0), labels)) == pytest.approx((-np.log(4.0) + np.log(2.0)) / 2)  # above 1
    for value in (-3.0, 7.0, np.inf):  # unlabelled: never read
        assert float(loss(at((0, 1), value), labels)) == pytest.approx(np.log(2.0))
        assert float(grad(at((0, 1), value), labels)[0, 1]) == 0.0
    # The same values eagerly: the check runs.
    with pytest.raises(ValueError, match=r"`p` \(=-3.0 at index \(0, 1\)\)"):
        jaxconv.log_loss(at((0, 1), -3.0), labels)


# --- the public signatures ---------------------------------------------------------


_ARRAY_PARAMETERS = {"x", "w", "b", "y", "s", "p", "labels", "logits", "scale", "offset", "params", "lam"}


@pytest.mark.parametrize("name", sorted(jaxconv.ops.__all__))
def test_every_public_op_is_typed_and_takes_its_configuration_by_keyword(name):
    """Arrays (and a pool's window) positional; everything after them keyword-only; every parameter and the
    return annotated (the package ships py.typed)."""
    op = getattr(jaxconv.ops, name)
    signature = inspect.signature(op)
    hints = typing.get_type_hints(op)
    assert "return" in hints, name
    for parameter in signature.parameters.values():
        assert parameter.name in hints, (name, parameter.name)
        if name.startswith("lrn_params_from_"):  # converters of another framework's positional signature
            continue
        positional = parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        allowed = parameter.name in _ARRAY_PARAMETERS or (parameter.name == "window" and "pool" in name)
        assert positional == allowed, (name, parameter.name, parameter.kind)
    if hasattr(op, "is_hand_rule"):
        assert hints["return"] is jax.Array, name


def test_the_package_ships_py_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(jaxconv.__file__), "py.typed"))


@pytest.mark.parametrize("form", ["conv", "im2row_blocked", "winograd2", "winograd4"])
def test_a_nan_weight_with_same_padding_reaches_what_the_docstring_says(forms, form):
    """conv2d's docstring: a NaN in ``w[t, c, o]`` makes NaN every output of channel ``o`` whose window reads an
    input entry at offset ``t`` (outputs where ``t`` falls on padding: the form decides), no other channel; a
    NaN in ``b[o]`` makes all of channel ``o`` NaN, padding or not."""
    forms(conv_forward=form)
    x, w, b = _normal(2, 7, 7, 3), _normal(3, 3, 3, 4), _normal(4)
    w[0, 0, 2, 3] = np.nan  # the top-left tap: on padding for the first row and column of outputs
    for how, f in (("eager", jaxconv.conv2d), ("jit", jax.jit(jaxconv.conv2d, static_argnames="padding"))):
        y = np.asarray(f(x, w, b, padding="SAME"))
        assert np.isnan(y[:, 1:, 1:, 3]).all(), (form, how)  # offset (0, 0) reads an input entry there
        assert not np.isnan(y[..., :3]).any(), (form, how)  # the other channels: untouched
        b_nan = b.copy()
        b_nan[1] = np.nan
        y = np.asarray(f(x, np.nan_to_num(w), b_nan, padding="SAME"))
        assert np.isnan(y[..., 1]).all() and not np.isnan(y[..., [0, 2, 3]]).any(), (form, how)
