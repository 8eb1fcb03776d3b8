"""The configurations `python -m jaxconv verify` checks, one list per op.

Each op contributes a function ``rng -> list[Case]`` registered in ``SUITES``.
Inputs are float64 and, for piecewise-linear ops, tie- and kink-free (a
shuffled permutation, as in MatConvNet's tests) so finite differences are exact
up to rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from . import reference
from .conv import conv2d
from .layers import flatten, linear, relu
from .losses import l2_penalty, log_loss, softmax, softmax_cross_entropy
from .lrn import lrn
from .pool import avg_pool2d, max_pool2d


@dataclasses.dataclass
class Case:
    op: str
    label: str
    f: Callable
    ref: Callable
    args: tuple
    names: tuple[str, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def conv2d_cases(rng) -> list[Case]:
    grid = [
        # (N, H, W, C, KH, KW, O, stride, padding, dilation, groups)
        (2, 6, 6, 3, 3, 3, 4, 1, "VALID", 1, 1),
        (2, 7, 8, 4, 3, 3, 6, 2, 1, 1, 2),
        (1, 9, 9, 3, 3, 2, 2, 3, "SAME", 2, 1),
        (2, 6, 5, 6, 3, 3, 6, 1, ((2, 0), (1, 3)), 1, 6),  # depthwise, asymmetric padding
        (2, 12, 11, 2, 5, 5, 3, 3, "VALID", 1, 1),  # stride remainder
        (1, 5, 7, 2, 2, 3, 4, (2, 1), ((0, 2), (3, 1)), (3, 1), 2),
        (3, 1, 1, 2, 1, 1, 3, 1, "VALID", 1, 1),
    ]
    cases = []
    for n, h, w, c, kh, kw, o, s, p, d, g in grid:
        options = dict(stride=s, padding=p, dilation=d, groups=g)

        def f(x, k, b, options=options):
            return conv2d(x, k, b, **options)

        def ref(x, k, b, options=options):
            return reference.conv2d(x, k, b, **options)

        args = (_normal(rng, n, h, w, c), _normal(rng, kh, kw, c // g, o), _normal(rng, o))
        label = f"x{(n, h, w, c)} w{(kh, kw, c // g, o)} s={s} p={p} d={d} g={g}"
        cases.append(Case("conv2d", label, f, ref, args, ("x", "w", "b")))
    return cases


# --- pooling cases ------------------------------------------------------------

# Window, stride, padding: non-overlapping (the reshape strategy), overlapping
# (the slices strategy, windows add), SAME, asymmetric padding, a stride
# remainder (pixels no window reads) and a global pool (docs/pooling.md §3).
_POOL_GRID = [
    # x shape, window, stride, padding
    ((2, 6, 6, 3), 2, None, "VALID"),
    ((2, 7, 8, 2), 3, 2, 1),
    ((1, 9, 8, 2), (3, 2), (2, 1), "SAME"),
    ((2, 5, 7, 3), 2, None, ((1, 0), (0, 1))),
    ((1, 8, 7, 2), 3, 3, "VALID"),
    ((2, 4, 4, 5), 4, None, "VALID"),
]


def _permutation(rng, *shape):
    """Distinct values, none 0 (as tests/strategies.permutation_input): max pooling without ties."""
    size = int(np.prod(shape))
    return ((2.0 * (rng.permutation(size) + 1) - (size + 1) + 1.0 / 3.0) / (size + 1)).reshape(shape)


def _pool_cases(rng, op: str, f_op, ref_op, extra: dict) -> list[Case]:
    cases = []
    for shape, window, stride, padding in _POOL_GRID:
        options = dict(stride=stride, padding=padding, **extra)

        def f(x, window=window, options=options):
            return f_op(x, window, **options)

        def ref(x, window=window, options=options):
            return ref_op(x, window, **options)

        extras = "".join(f" {k}={v}" for k, v in extra.items())
        label = f"x{shape} window={window} s={stride} p={padding}{extras}"
        cases.append(Case(op, label, f, ref, (_permutation(rng, *shape),), ("x",)))
    return cases


def avg_pool2d_cases(rng) -> list[Case]:
    return [
        case
        for include in (True, False)
        for case in _pool_cases(rng, "avg_pool2d", avg_pool2d, reference.avg_pool2d, dict(count_include_pad=include))
    ]


def max_pool2d_cases(rng) -> list[Case]:
    return _pool_cases(rng, "max_pool2d", max_pool2d, reference.max_pool2d, {})



# --- lrn cases ------------------------------------------------------------------

def lrn_cases(rng) -> list[Case]:
    grid = [
        # x shape, lrn options: odd, even (the transposed window leans the other way),
        # size 1, size > C, AlexNet's numbers
        ((2, 3, 3, 7), dict(size=5, kappa=1.0, alpha=0.3, beta=0.75)),
        ((2, 2, 3, 6), dict(size=4, kappa=2.0, alpha=0.5, beta=0.6)),
        ((1, 2, 2, 5), dict(size=1, kappa=0.5, alpha=1.0, beta=1.3)),
        ((2, 2, 2, 3), dict(size=8, kappa=1.0, alpha=0.7, beta=0.9)),
        ((1, 4, 4, 16), dict(size=5, kappa=2.0, alpha=1e-4, beta=0.75)),
    ]
    cases = []
    for shape, options in grid:

        def f(x, options=options):
            return lrn(x, **options)

        def ref(x, options=options):
            return reference.lrn(x, **options)

        label = f"x{shape} " + " ".join(f"{k}={v}" for k, v in options.items())
        cases.append(Case("lrn", label, f, ref, (_normal(rng, *shape),), ("x",)))
    return cases



# --- layer and loss cases -----------------------------------------------------

def _away_from_zero(rng, *shape):
    """Normal draws pushed at least 0.1 from 0: no ReLU kink within a finite-difference step."""
    z = rng.standard_normal(shape)
    return np.sign(z) * (0.1 + np.abs(z))


def _probabilities(rng, n, d):
    e = np.exp(rng.standard_normal((n, d)))
    return e / e.sum(axis=1, keepdims=True)


def relu_cases(rng) -> list[Case]:
    return [
        Case("relu", f"x{shape}", relu, reference.relu, (_away_from_zero(rng, *shape),), ("x",))
        for shape in [(7,), (4, 5), (2, 4, 3, 3)]
    ]


def linear_cases(rng) -> list[Case]:
    cases = []
    for n, d_in, d_out, bias in [(4, 5, 3, True), (1, 7, 1, False), (8, 18, 10, True)]:
        b = _normal(rng, d_out) if bias else None
        args = (_normal(rng, n, d_in), _normal(rng, d_in, d_out), b)
        cases.append(Case("linear", f"x{(n, d_in)} w{(d_in, d_out)} bias={bias}", linear, reference.linear, args,
                          ("x", "w", "b")))
    return cases


def flatten_cases(rng) -> list[Case]:
    return [
        Case("flatten", f"x{shape}", flatten, reference.flatten, (_normal(rng, *shape),), ("x",))
        for shape in [(3, 4), (2, 3, 4, 5), (2, 1, 3, 1, 2)]
    ]


def softmax_cases(rng) -> list[Case]:
    return [
        Case("softmax", f"s{shape}", softmax, reference.softmax, (2 * _normal(rng, *shape),), ("s",))
        for shape in [(5,), (4, 6), (2, 3, 4)]
    ]


def log_loss_cases(rng) -> list[Case]:
    return [
        Case("log_loss", f"p{(n, d)}", log_loss, reference.log_loss,
             (_probabilities(rng, n, d), rng.integers(0, d, n)), ("p", "labels"))
        for n, d in [(4, 5), (1, 1), (6, 10)]
    ]


def softmax_cross_entropy_cases(rng) -> list[Case]:
    return [
        Case("softmax_cross_entropy", f"logits{(n, d)}", softmax_cross_entropy, reference.softmax_cross_entropy,
             (2 * _normal(rng, n, d), rng.integers(0, d, n)), ("logits", "labels"))
        for n, d in [(4, 5), (1, 2), (16, 10)]
    ]


def l2_penalty_cases(rng) -> list[Case]:
    params = {"conv": {"w": _normal(rng, 3, 3, 2, 4), "b": _normal(rng, 4)}, "dense": [_normal(rng, 5, 3)]}
    return [
        Case("l2_penalty", "pytree, lam differentiated", l2_penalty, reference.l2_penalty,
             (params, np.float64(0.3)), ("params", "lam")),
        Case("l2_penalty", "one leaf, lam a Python float", l2_penalty, reference.l2_penalty,
             (_normal(rng, 4, 4), 1e-3), ("params", "lam")),
    ]



SUITES: dict[str, Callable[[np.random.Generator], list[Case]]] = {
    "conv2d": conv2d_cases,
    "avg_pool2d": avg_pool2d_cases,
    "max_pool2d": max_pool2d_cases,
    # pooling entries
    "lrn": lrn_cases,
    # lrn entries
    "relu": relu_cases,
    "linear": linear_cases,
    "flatten": flatten_cases,
    "softmax": softmax_cases,
    "log_loss": log_loss_cases,
    "softmax_cross_entropy": softmax_cross_entropy_cases,
    "l2_penalty": l2_penalty_cases,
    # layer and loss entries
}
