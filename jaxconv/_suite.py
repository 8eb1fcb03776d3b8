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


# --- lrn cases ------------------------------------------------------------------


# --- layer and loss cases -----------------------------------------------------


SUITES: dict[str, Callable[[np.random.Generator], list[Case]]] = {
    "conv2d": conv2d_cases,
    # pooling entries
    # lrn entries
    # layer and loss entries
}
