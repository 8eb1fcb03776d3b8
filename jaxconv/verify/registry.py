"""The conformance registry: every op with a hand rule, registered once.

Each :class:`OpSpec` names the op, its plain-``lax`` reference, a small grid of
configurations, how to build a float64 :class:`Case` (the arguments) from a
configuration, a hypothesis strategy drawing configurations, and the forms
(``jaxconv.plan.forms`` arguments) worth running it under.  Everything that
checks the rules draws from :data:`REGISTRY`:

* ``tests/test_conformance.py``: float64 VJP / finite differences / second
  order per grid configuration and form, float32, jit, vmap, a hypothesis
  test and the slow (``-m slow``) sweep, per op;
* ``python -m jaxconv verify`` (:data:`SUITES`, the grids);
* ``python -m jaxconv train --check-grads`` (:func:`reference_ops`, the
  references the network is rebuilt from).

Draw a case's inputs from a generator other than ``default_rng(s)`` for the
seed ``s`` the checker draws its cotangents with (``check_vjp(seed=0)``), e.g.
``default_rng([s, 1])``: the same stream would make the first cotangent equal
the first input's draws, which for ``batch_norm`` (``x = 2 z + 0.5``) makes it
an affine function of ``x``, and ``dL/dx`` vanish to rounding.

Inputs are float64 and, for piecewise-linear ops, tie- and kink-free (a
shuffled permutation, as in MatConvNet's tests) so finite differences are exact
up to rounding.  Adding an op: write it, its reference, and one entry here.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax as _jax_lax

from .. import lax as droplax
from .. import reference
from .._core import window as _window
from ..ops import conv, layers, losses, norm, pool
from ..ops.local_response import lrn

__all__ = ["Case", "OpSpec", "REGISTRY", "SUITES", "reference_ops"]


@dataclasses.dataclass
class Case:
    op: str
    label: str
    f: Callable
    ref: Callable
    args: tuple
    names: tuple[str, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op of the conformance harness."""

    name: str
    op: Callable
    ref: Callable
    grid: tuple  # configurations: plain dicts
    make: Callable[[np.random.Generator, dict], Case]  # float64 arguments for one configuration
    strategy: Callable[[], Any]  # () -> a hypothesis strategy of configurations (hypothesis imported lazily)
    forms: tuple[dict, ...] = ({},)  # jaxconv.plan.forms(**f) to run under; {} is the planner's choice
    vmap_args: tuple[int, ...] = (0,)  # the arguments a vmap test maps over an extra leading axis
    smooth: bool = True  # False for ops with kinks (max, ReLU): finite differences need kink-free inputs

    def cases(self, rng: np.random.Generator) -> list[Case]:
        return [self.make(rng, config) for config in self.grid]


# --- inputs ------------------------------------------------------------------------


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _permutation(rng, *shape):
    """Distinct values, none 0 (as tests/strategies.permutation_input): max pooling without ties."""
    size = int(np.prod(shape))
    return ((2.0 * (rng.permutation(size) + 1) - (size + 1) + 1.0 / 3.0) / (size + 1)).reshape(shape)


def _away_from_zero(rng, *shape):
    """Normal draws pushed at least 0.1 from 0: no ReLU kink within a finite-difference step."""
    z = rng.standard_normal(shape)
    return np.sign(z) * (0.1 + np.abs(z))


def _probabilities(rng, n, d):
    e = np.exp(rng.standard_normal((n, d)))
    return e / e.sum(axis=1, keepdims=True)


def _label(options):
    return " ".join(f"{k}={v}" for k, v in options.items())


def _bound(fn, *leading, **options):
    """``fn`` with the static arguments bound: ``(*arrays) -> fn(*arrays, *leading, **options)``."""

    def bound(*arrays):
        return fn(*arrays, *leading, **options)

    return bound


# --- convolution (1, 2, 3 dims) and transposed convolution --------------------------------

_CONV_GRIDS: dict[int, list[tuple[Any, ...]]] = {
    # (x spatial, kernel, C, O, stride, padding, dilation, groups)
    1: [
        ((9,), (3,), 3, 4, 1, "VALID", 1, 1),
        ((11,), (3,), 4, 6, 2, ((2, 1),), 2, 2),
        ((10,), (4,), 2, 3, 3, "SAME", 1, 1),
    ],  # stride remainder
    2: [
        ((6, 6), (3, 3), 3, 4, 1, "VALID", 1, 1),
        ((7, 8), (3, 3), 4, 6, 2, 1, 1, 2),
        ((9, 9), (3, 2), 3, 2, 3, "SAME", 2, 1),
        ((6, 5), (3, 3), 6, 6, 1, ((2, 0), (1, 3)), 1, 6),  # depthwise, asymmetric padding
        ((12, 11), (5, 5), 2, 3, 3, "VALID", 1, 1),  # stride remainder
        ((5, 7), (2, 3), 2, 4, (2, 1), ((0, 2), (3, 1)), (3, 1), 2),
        ((1, 1), (1, 1), 2, 3, 1, "VALID", 1, 1),
        ((6, 5), (3, 3), 3, 6, 1, 1, 1, 3),  # depthwise, two filters per channel
        ((4, 4), (4, 4), 1, 1, 2, "SAME", 1, 1),
    ],  # even kernel under SAME: padding (1, 2)
    3: [
        ((4, 5, 4), (2, 3, 2), 2, 3, 1, "VALID", 1, 1),
        ((5, 6, 5), (3, 2, 3), 4, 4, (2, 1, 2), "SAME", (1, 2, 1), 2),
        ((4, 4, 6), (2, 2, 3), 2, 2, (1, 2, 3), ((1, 0), (0, 1), (2, 1)), 1, 1),
    ],
}


def _conv_config(x_spatial, kernel, c, o, stride, padding, dilation, groups, n=2, bias=True):
    return dict(
        x_shape=(n, *x_spatial, c),
        w_shape=(*kernel, c // groups, o),
        bias=bias,
        options=dict(stride=stride, padding=padding, dilation=dilation, groups=groups),
    )


def _conv_maker(name, op, ref):
    def make(rng, config):
        x = _normal(rng, *config["x_shape"])
        w = _normal(rng, *config["w_shape"])
        b = _normal(rng, config["w_shape"][-1]) if config["bias"] else None
        options = config["options"]
        label = f"x{config['x_shape']} w{config['w_shape']} {_label(options)}"
        return Case(name, label, _bound(op, **options), _bound(ref, **options), (x, w, b), ("x", "w", "b"))

    return make


def _conv_strategy(ndim: int):
    def strategy():
        from hypothesis import assume
        from hypothesis import strategies as st

        def per_dim(low, high):
            return st.one_of(st.integers(low, high), st.tuples(*[st.integers(low, high)] * ndim))

        side = st.integers(0, 3)
        padding = st.one_of(
            st.sampled_from(["VALID", "SAME"]),
            side,
            st.tuples(*[side] * ndim),
            st.tuples(*[st.tuples(side, side)] * ndim),
        )

        @st.composite
        def configs(draw):
            groups = draw(st.integers(1, 3))
            c = groups * draw(st.integers(1, 2))
            o = groups * draw(st.integers(1, 2))
            size = 10 if ndim < 3 else 5
            spatial = tuple(draw(st.integers(1, size)) for _ in range(ndim))
            kernel = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
            stride, dilation, pad = draw(per_dim(1, 3)), draw(per_dim(1, 2)), draw(padding)
            try:
                _window.parse(spatial, kernel, stride, pad, dilation)
            except ValueError:
                assume(False)
            return _conv_config(
                spatial,
                kernel,
                c,
                o,
                stride,
                pad,
                dilation,
                groups,
                n=draw(st.integers(1, 2)),
                bias=draw(st.booleans()),
            )

        return configs()

    return strategy


def _transpose_config(conv_config):
    """The transposed convolution of a convolution configuration: y has the conv's output shape, and
    the output the conv's input shape (``output_padding`` is the conv's stride remainder)."""
    x_shape, w_shape, options = conv_config["x_shape"], conv_config["w_shape"], conv_config["options"]
    window = _window.parse(x_shape[1:-1], w_shape[:-2], options["stride"], options["padding"], options["dilation"])
    output_padding = window.remainder
    y_shape = (x_shape[0], *window.out_size, w_shape[-1])
    return dict(
        y_shape=y_shape,
        w_shape=w_shape,
        bias=conv_config["bias"],
        options=dict(
            stride=window.stride,
            padding=window.padding,
            output_padding=output_padding,
            dilation=window.dilation,
            groups=options["groups"],
        ),
    )


def _transpose_maker(name, op, ref):
    def make(rng, config):
        y = _normal(rng, *config["y_shape"])
        w = _normal(rng, *config["w_shape"])
        b = _normal(rng, config["w_shape"][-2] * config["options"]["groups"]) if config["bias"] else None
        options = config["options"]
        label = f"y{config['y_shape']} w{config['w_shape']} {_label(options)}"
        return Case(name, label, _bound(op, **options), _bound(ref, **options), (y, w, b), ("y", "w", "b"))

    return make


def _transpose_strategy(ndim: int):
    def strategy():
        return _conv_strategy(ndim)().map(_transpose_config)

    return strategy


# Every conv form, each on the grid's first configuration; the rest under the planner.
_CONV_FORMS: tuple[dict[str, str], ...] = (
    {},
    dict(conv_forward="conv", conv_backward="conv"),
    dict(conv_forward="im2row_blocked", conv_backward="im2row"),
    dict(conv_forward="im2row_blocked", conv_backward="im2row_blocked"),
    dict(conv_forward="conv", conv_backward="mixed"),
    dict(conv_forward="winograd2", conv_backward="winograd2"),
    dict(conv_forward="winograd4", conv_backward="winograd4"),
)


def _conv_specs() -> list[OpSpec]:
    specs = []
    for ndim, grid in _CONV_GRIDS.items():
        name = f"conv{ndim}d"
        op, ref = getattr(conv, name), getattr(reference, name)
        configs = tuple(_conv_config(*row) for row in grid)
        specs.append(
            OpSpec(
                name, op, ref, configs, _conv_maker(name, op, ref), _conv_strategy(ndim), _CONV_FORMS, vmap_args=(0, 1)
            )
        )
    for ndim, grid in _CONV_GRIDS.items():
        name = f"conv_transpose{ndim}d"
        op, ref = getattr(conv, name), getattr(reference, name)
        configs = tuple(_transpose_config(_conv_config(*row)) for row in grid)
        specs.append(
            OpSpec(
                name,
                op,
                ref,
                configs,
                _transpose_maker(name, op, ref),
                _transpose_strategy(ndim),
                _CONV_FORMS,
                vmap_args=(0, 1),
            )
        )
    return specs


# --- pooling (1, 2, 3 dims) ------------------------------------------------------------------

# Window, stride, padding: non-overlapping (the reshape form), overlapping
# (the slices form, windows add), SAME, asymmetric padding, a stride
# remainder (entries no window reads) and a global pool (docs/pooling.md §3).
_POOL_GRIDS: dict[int, list[tuple[Any, ...]]] = {
    1: [((2, 8, 3), 2, None, "VALID"), ((2, 9, 2), 3, 2, "SAME"), ((1, 7, 2), 3, 3, ((1, 0),))],
    2: [
        ((2, 6, 6, 3), 2, None, "VALID"),
        ((2, 7, 8, 2), 3, 2, 1),
        ((1, 9, 8, 2), (3, 2), (2, 1), "SAME"),
        ((2, 5, 7, 3), 2, None, ((1, 0), (0, 1))),
        ((1, 8, 7, 2), 3, 3, "VALID"),
        ((2, 4, 4, 5), 4, None, "VALID"),
    ],
    3: [
        ((2, 4, 4, 6, 2), 2, None, "VALID"),
        ((1, 5, 6, 4, 2), 3, 2, 1),
        ((1, 4, 5, 5, 1), (2, 3, 1), (1, 2, 2), ((1, 0), (1, 1), (0, 0))),
    ],
}


def _pool_maker(name, op, ref):
    def make(rng, config):
        options = dict(stride=config["stride"], padding=config["padding"], **config.get("extra", {}))
        window = config["window"]
        label = f"x{config['x_shape']} window={window} {_label(options)}"
        return Case(
            name,
            label,
            _bound(op, window, **options),
            _bound(ref, window, **options),
            (_permutation(rng, *config["x_shape"]),),
            ("x",),
        )

    return make


def _pool_strategy(ndim: int, extra: bool):
    def strategy():
        from hypothesis import assume
        from hypothesis import strategies as st

        @st.composite
        def configs(draw):
            window = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
            stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 3)] * ndim)))
            sides = [st.tuples(st.integers(0, k // 2), st.integers(0, k // 2)) for k in window]
            padding = draw(st.one_of(st.sampled_from(["VALID", "SAME"]), st.tuples(*sides)))
            spatial = tuple(draw(st.integers(1, 9 if ndim < 3 else 5)) for _ in range(ndim))
            try:
                _window.parse(spatial, window, window if stride is None else stride, padding, pool=True)
            except ValueError:
                assume(False)
            config = dict(
                x_shape=(draw(st.integers(1, 2)), *spatial, draw(st.integers(1, 3))),
                window=window,
                stride=stride,
                padding=padding,
            )
            if extra:
                config["extra"] = dict(count_include_pad=draw(st.booleans()))
            return config

        return configs()

    return strategy


def _pool_specs() -> list[OpSpec]:
    specs = []
    for kind in ("avg", "max"):
        for ndim, grid in _POOL_GRIDS.items():
            name = f"{kind}_pool{ndim}d"
            op, ref = getattr(pool, name), getattr(reference, name)
            configs = [dict(x_shape=s, window=k, stride=st, padding=p) for s, k, st, p in grid]
            if kind == "avg":  # both divisors on every configuration
                configs = [dict(c, extra=dict(count_include_pad=inc)) for c in configs for inc in (True, False)]
            specs.append(
                OpSpec(
                    name,
                    op,
                    ref,
                    tuple(configs),
                    _pool_maker(name, op, ref),
                    _pool_strategy(ndim, kind == "avg"),
                    ({}, dict(pool="slices"), dict(pool="reshape")),
                    smooth=kind == "avg",
                )
            )
    return specs


# --- the lax drop-ins (jaxconv.lax): jax.lax's own ops, and Flax's pools in plain lax, as references ---------

# (lhs shape, rhs shape, options): default (channels-first) layouts, channels-last, a ConvDimensionNumbers and mixed
# layouts; SAME, SAME_LOWER, negative (cropping) padding, lhs dilation (with a stride and padding past the kernel
# extent), rhs dilation and groups, in 1, 2 and 3 dimensions.
_LAX_CONV_GRID = (
    ((2, 3, 7, 6), (4, 3, 3, 3), dict(window_strides=(1, 1), padding="SAME")),
    (
        (2, 7, 6, 4),
        (3, 2, 2, 6),
        dict(
            window_strides=(2, 1),
            padding="SAME_LOWER",
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        ),
    ),
    (
        (2, 4, 9),
        (6, 2, 3),
        dict(window_strides=(2,), padding=((4, -1),), lhs_dilation=(3,), rhs_dilation=(2,), feature_group_count=2),
    ),
    (
        (1, 6, 5, 3),
        (3, 2, 3, 4),
        dict(
            window_strides=(1, 2),
            padding=((-1, 2), (1, -2)),
            dimension_numbers=_jax_lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
        ),
    ),
    (
        (2, 4, 5, 6, 3),
        (2, 2, 3, 2, 2),
        dict(
            window_strides=(1, 2, 1),
            padding=((1, 1), (0, 2), (-1, 1)),
            lhs_dilation=(2, 1, 2),
            rhs_dilation=(1, 2, 1),
            dimension_numbers=("NCDHW", "DHWIO", "NDHWC"),
            feature_group_count=2,
        ),
    ),
)

# (lhs shape, rhs shape, options) of jax.lax.conv_transpose: default layouts, string and pair padding, both
# readings of pairs, Keras' transposed kernel.
_LAX_TRANSPOSE_GRID = (
    ((2, 5, 5, 4), (3, 3, 4, 2), dict(strides=(2, 2), padding="SAME")),
    ((2, 4, 3), (3, 3, 2), dict(strides=(3,), padding="VALID", rhs_dilation=(2,))),
    ((1, 4, 3, 2), (2, 3, 3, 2), dict(strides=(2, 1), padding=((1, 2), (0, 1)), transpose_kernel=True)),
    (
        (1, 3, 2, 3, 2),
        (2, 2, 3, 2, 3),
        dict(strides=(1, 2, 2), padding=((1, 0), (0, 1), (1, 1)), use_consistent_padding=True),
    ),
)

# (inputs shape, window_shape, strides, padding, extra): Flax's conventions: stride 1 by default, no batch dim
# or two, string and pair padding.
_FLAX_POOL_GRID = (
    ((2, 6, 6, 3), (2, 2), (2, 2), "VALID"),
    ((7, 8, 2), (3, 3), None, "SAME"),
    ((2, 2, 9, 2), (3,), (2,), ((1, 1),)),
    ((1, 5, 4, 4, 2), (2, 3, 2), (1, 2, 2), ((1, 0), (1, 1), (0, 1))),
)


def _lax_conv_make(name, op, ref):
    def make(rng, config):
        lhs, rhs = _normal(rng, *config["lhs_shape"]), _normal(rng, *config["rhs_shape"])
        options = config["options"]
        label = f"lhs{config['lhs_shape']} rhs{config['rhs_shape']} {_label(options)}"
        return Case(name, label, _bound(op, **options), _bound(ref, **options), (lhs, rhs), ("lhs", "rhs"))

    return make


def _lax_conv_strategy(transpose: bool = False):
    """Layouts (a random order of every axis), padding of every kind, strides, both dilations, groups, 1-3 dims;
    only configurations jax.lax accepts with a non-empty output."""

    def strategy():
        from hypothesis import assume
        from hypothesis import strategies as st

        @st.composite
        def configs(draw):
            ndim = draw(st.integers(1, 3))
            letters = "DHW"[3 - ndim :]
            groups = 1 if transpose else draw(st.integers(1, 2))
            c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
            n = draw(st.integers(1, 2))
            spatial = dict(zip(letters, (draw(st.integers(1, 7 if ndim < 3 else 4)) for _ in letters)))
            kernel = dict(zip(letters, (draw(st.integers(1, 3)) for _ in letters)))
            specs = [
                draw(st.permutations("NC" + letters)),
                draw(st.permutations("OI" + letters)),
                draw(st.permutations("NC" + letters)),
            ]
            specs = tuple("".join(spec) for spec in specs)
            sizes = dict(spatial, N=n, C=c)
            lhs_shape = tuple(sizes[a] for a in specs[0])
            rhs_shape = tuple(dict(kernel, O=o, I=c // groups)[a] for a in specs[1])
            form = draw(st.sampled_from(["strings", "ConvDimensionNumbers", "None"]))
            if form == "ConvDimensionNumbers":
                dn = _jax_lax.conv_dimension_numbers(lhs_shape, rhs_shape, specs)
            else:
                dn = specs if form == "strings" else None
            if dn is None:
                lhs_shape = (n, c, *spatial.values())
                rhs_shape = (o, c // groups, *kernel.values()) if not transpose else rhs_shape
            ints = st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim).map(tuple)
            pairs = st.lists(st.tuples(st.integers(-2, 3), st.integers(-2, 3)), min_size=ndim, max_size=ndim).map(tuple)
            if transpose:
                if dn is None:
                    lhs_shape = (n, *spatial.values(), c)
                    rhs_shape = (*kernel.values(), c, o)
                options = dict(
                    strides=draw(ints),
                    padding=draw(st.one_of(st.sampled_from(["SAME", "VALID"]), pairs)),
                    rhs_dilation=draw(st.one_of(st.none(), ints)),
                    dimension_numbers=dn,
                    transpose_kernel=draw(st.booleans()),
                    use_consistent_padding=draw(st.booleans()),
                )
                if options["transpose_kernel"]:  # the kernel's I and O axes swap
                    i_axis, o_axis = (specs[1].index("I"), specs[1].index("O")) if dn else (ndim, ndim + 1)
                    shape = list(rhs_shape)
                    shape[i_axis], shape[o_axis] = shape[o_axis], shape[i_axis]
                    rhs_shape = tuple(shape)
                fn = _jax_lax.conv_transpose
            else:
                lhs_dilation = draw(st.one_of(st.none(), ints))
                dilated = lhs_dilation is not None and max(lhs_dilation) > 1
                padding = draw(pairs if dilated else st.one_of(st.sampled_from(["SAME", "SAME_LOWER", "VALID"]), pairs))
                options = dict(
                    window_strides=draw(ints),
                    padding=padding,
                    lhs_dilation=lhs_dilation,
                    rhs_dilation=draw(st.one_of(st.none(), ints)),
                    dimension_numbers=dn,
                    feature_group_count=groups,
                )
                fn = _jax_lax.conv_general_dilated
            try:
                shape = jax.eval_shape(lambda a, b: fn(a, b, **options), np.zeros(lhs_shape), np.zeros(rhs_shape)).shape
            except (ValueError, TypeError):
                assume(False)
            assume(min(shape) > 0)
            return dict(lhs_shape=lhs_shape, rhs_shape=rhs_shape, options=options)

        return configs()

    return strategy


def _flax_pool_make(name, op, ref):
    def make(rng, config):
        options = dict(strides=config["strides"], padding=config["padding"], **config.get("extra", {}))
        window = config["window"]
        label = f"inputs{config['shape']} window_shape={window} {_label(options)}"
        return Case(
            name,
            label,
            _bound(op, window, **options),
            _bound(ref, window, **options),
            (_permutation(rng, *config["shape"]),),
            ("inputs",),
        )

    return make


def _flax_pool_strategy(extra: bool):
    """jaxconv's pool configurations (1-3 dims) read with Flax's conventions: no batch dim, one or two, and
    ``strides=None`` meaning 1 (not the window)."""

    def strategy():
        from hypothesis import strategies as st

        def flax_config(config, batch):
            return dict(config, shape=(*batch, *config["x_shape"][1:]), strides=config["stride"])

        return (
            st.integers(1, 3)
            .flatmap(lambda ndim: _pool_strategy(ndim, extra)())
            .flatmap(
                lambda config: st.lists(st.integers(1, 2), max_size=2).map(lambda batch: flax_config(config, batch))
            )
        )

    return strategy


def _lax_specs() -> list[OpSpec]:
    specs = []
    for name, grid, strategy in (
        ("conv_general_dilated", _LAX_CONV_GRID, _lax_conv_strategy()),
        ("conv_transpose", _LAX_TRANSPOSE_GRID, _lax_conv_strategy(transpose=True)),
    ):
        op, ref = getattr(droplax, name), getattr(_jax_lax, name)
        configs = tuple(dict(lhs_shape=a, rhs_shape=b, options=o) for a, b, o in grid)
        specs.append(
            OpSpec(f"lax.{name}", op, ref, configs, _lax_conv_make(f"lax.{name}", op, ref), strategy, vmap_args=(0, 1))
        )
    for kind in ("max", "avg"):
        name = f"lax.{kind}_pool"
        op, ref = getattr(droplax, f"{kind}_pool"), getattr(reference, f"flax_{kind}_pool")
        pool_configs: list[dict[str, Any]] = [
            dict(shape=s, window=k, strides=st, padding=p) for s, k, st, p in _FLAX_POOL_GRID
        ]
        if kind == "avg":
            pool_configs = [dict(c, extra=dict(count_include_pad=inc)) for c in pool_configs for inc in (True, False)]
        specs.append(
            OpSpec(
                name,
                op,
                ref,
                tuple(pool_configs),
                _flax_pool_make(name, op, ref),
                _flax_pool_strategy(kind == "avg"),
                ({}, dict(pool="slices")),
                smooth=kind == "avg",
            )
        )
    return specs


# --- LRN, layers and losses ---------------------------------------------------------------


def _lrn_make(rng, config):
    options = config["options"]
    return Case(
        "lrn",
        f"x{config['x_shape']} {_label(options)}",
        _bound(lrn, **options),
        _bound(reference.lrn, **options),
        (_normal(rng, *config["x_shape"]),),
        ("x",),
    )


def _lrn_strategy():
    from hypothesis import strategies as st

    return st.builds(
        lambda n, h, c, size, kappa, alpha, beta: dict(
            x_shape=(n, h, 2, c), options=dict(size=size, kappa=kappa, alpha=alpha, beta=beta)
        ),
        st.integers(1, 2),
        st.integers(1, 3),
        st.integers(1, 9),
        st.integers(1, 10),
        st.floats(0.5, 3.0),
        st.floats(1e-4, 1.0),
        st.floats(0.1, 1.5),
    )


_LRN_GRID = (
    # odd, even (the window leans the other way), size 1, size > C, AlexNet's numbers
    dict(x_shape=(2, 3, 3, 7), options=dict(size=5, kappa=1.0, alpha=0.3, beta=0.75)),
    dict(x_shape=(2, 2, 3, 6), options=dict(size=4, kappa=2.0, alpha=0.5, beta=0.6)),
    dict(x_shape=(1, 2, 2, 5), options=dict(size=1, kappa=0.5, alpha=1.0, beta=1.3)),
    dict(x_shape=(2, 2, 2, 3), options=dict(size=8, kappa=1.0, alpha=0.7, beta=0.9)),
    dict(x_shape=(1, 4, 4, 16), options=dict(size=5, kappa=2.0, alpha=1e-4, beta=0.75)),
)


def _shape_strategy(min_dims=1, max_dims=4):
    def strategy():
        from hypothesis import strategies as st

        return st.lists(st.integers(1, 5), min_size=min_dims, max_size=max_dims).map(lambda s: dict(shape=tuple(s)))

    return strategy


def _batch_norm_make(rng, config):
    shape, eps = config["shape"], config["eps"]
    c = shape[-1]
    args = (_normal(rng, *shape) * 2 + 0.5, 1 + 0.5 * _normal(rng, c), _normal(rng, c))
    return Case(
        "batch_norm",
        f"x{shape} eps={eps}",
        _bound(norm.batch_norm, eps=eps),
        _bound(reference.batch_norm, eps=eps),
        args,
        ("x", "scale", "offset"),
    )


def _batch_norm_strategy():
    from hypothesis import strategies as st

    # At least 3 entries per channel: with 2, dL/dx is analytically of the size of eps
    # (g minus its projections on 1 and xhat leaves nothing in R^2) and is computed by
    # cancelling O(1) terms, so a relative comparison measures rounding, not the rule
    # (tests/test_norm.py checks that case against the size of the cancelled terms).
    return st.fixed_dictionaries(
        dict(
            shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(
                lambda lead: st.integers(1, 4).map(lambda c: (max(3, lead[0]), *lead[1:], c))
            ),
            eps=st.sampled_from([1e-5, 1e-3, 0.1]),
        )
    )


def _relu_make(rng, config):
    # layers.relu looked up per call: a rule patched in its module is the one checked.
    return Case(
        "relu",
        f"x{config['shape']}",
        lambda x: layers.relu(x),
        reference.relu,
        (_away_from_zero(rng, *config["shape"]),),
        ("x",),
    )


def _flatten_make(rng, config):
    return Case(
        "flatten", f"x{config['shape']}", layers.flatten, reference.flatten, (_normal(rng, *config["shape"]),), ("x",)
    )


def _softmax_make(rng, config):
    return Case(
        "softmax",
        f"s{config['shape']}",
        losses.softmax,
        reference.softmax,
        (2 * _normal(rng, *config["shape"]),),
        ("s",),
    )


def _linear_make(rng, config):
    n, d_in, d_out, bias = config["n"], config["d_in"], config["d_out"], config["bias"]
    args = (_normal(rng, n, d_in), _normal(rng, d_in, d_out), _normal(rng, d_out) if bias else None)
    return Case(
        "linear", f"x{(n, d_in)} w{(d_in, d_out)} bias={bias}", layers.linear, reference.linear, args, ("x", "w", "b")
    )


def _linear_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(n=st.integers(1, 6), d_in=st.integers(1, 8), d_out=st.integers(1, 6), bias=st.booleans())
    )


def _classes_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(dict(n=st.integers(1, 8), d=st.integers(1, 12)))


def _log_loss_make(rng, config):
    n, d = config["n"], config["d"]
    return Case(
        "log_loss",
        f"p{(n, d)}",
        losses.log_loss,
        reference.log_loss,
        (_probabilities(rng, n, d), rng.integers(0, d, n)),
        ("p", "labels"),
    )


def _cross_entropy_make(rng, config):
    n, d = config["n"], config["d"]
    return Case(
        "softmax_cross_entropy",
        f"logits{(n, d)}",
        losses.softmax_cross_entropy,
        reference.softmax_cross_entropy,
        (2 * _normal(rng, n, d), rng.integers(0, d, n)),
        ("logits", "labels"),
    )


def _l2_make(rng, config):
    if config["tree"]:
        params = {"conv": {"w": _normal(rng, 3, 3, 2, 4), "b": _normal(rng, 4)}, "dense": [_normal(rng, 5, 3)]}
        return Case(
            "l2_penalty",
            "pytree, lam differentiated",
            losses.l2_penalty,
            reference.l2_penalty,
            (params, np.float64(config["lam"])),
            ("params", "lam"),
        )
    return Case(
        "l2_penalty",
        f"one leaf {config['shape']}, lam a Python float",
        losses.l2_penalty,
        reference.l2_penalty,
        (_normal(rng, *config["shape"]), float(config["lam"])),
        ("params", "lam"),
    )


def _l2_strategy():
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            tree=st.booleans(),
            lam=st.floats(1e-4, 2.0),
            shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
        )
    )


def _other_specs() -> list[OpSpec]:
    return [
        OpSpec("lrn", lrn, reference.lrn, _LRN_GRID, _lrn_make, _lrn_strategy),
        OpSpec(
            "batch_norm",
            norm.batch_norm,
            reference.batch_norm,
            tuple(
                dict(shape=s, eps=e)
                for s, e in [((6, 3), 1e-5), ((2, 3, 3, 4), 1e-5), ((1, 3, 3, 2), 1e-3), ((3, 2, 2, 2, 2), 0.1)]
            ),
            _batch_norm_make,
            _batch_norm_strategy,
        ),
        OpSpec(
            "relu",
            layers.relu,
            reference.relu,
            tuple(dict(shape=s) for s in [(7,), (4, 5), (2, 4, 3, 3)]),
            _relu_make,
            _shape_strategy(),
            smooth=False,
        ),
        OpSpec(
            "linear",
            layers.linear,
            reference.linear,
            tuple(
                dict(n=n, d_in=i, d_out=o, bias=b)
                for n, i, o, b in [(4, 5, 3, True), (1, 7, 1, False), (8, 18, 10, True)]
            ),
            _linear_make,
            _linear_strategy,
            vmap_args=(0, 1),
        ),
        OpSpec(
            "flatten",
            layers.flatten,
            reference.flatten,
            tuple(dict(shape=s) for s in [(3, 4), (2, 3, 4, 5), (2, 1, 3, 1, 2)]),
            _flatten_make,
            _shape_strategy(2, 5),
        ),
        OpSpec(
            "softmax",
            losses.softmax,
            reference.softmax,
            tuple(dict(shape=s) for s in [(5,), (4, 6), (2, 3, 4)]),
            _softmax_make,
            _shape_strategy(),
        ),
        OpSpec(
            "log_loss",
            losses.log_loss,
            reference.log_loss,
            tuple(dict(n=n, d=d) for n, d in [(4, 5), (1, 1), (6, 10)]),
            _log_loss_make,
            _classes_strategy,
            vmap_args=(0, 1),
        ),
        OpSpec(
            "softmax_cross_entropy",
            losses.softmax_cross_entropy,
            reference.softmax_cross_entropy,
            tuple(dict(n=n, d=d) for n, d in [(4, 5), (1, 2), (16, 10)]),
            _cross_entropy_make,
            _classes_strategy,
            vmap_args=(0, 1),
        ),
        OpSpec(
            "l2_penalty",
            losses.l2_penalty,
            reference.l2_penalty,
            (dict(tree=True, lam=0.3, shape=()), dict(tree=False, lam=1e-3, shape=(4, 4))),
            _l2_make,
            _l2_strategy,
            vmap_args=(),
        ),
    ]


#: Every op with a hand rule, by name.
REGISTRY: dict[str, OpSpec] = {
    spec.name: spec for spec in [*_conv_specs(), *_pool_specs(), *_other_specs(), *_lax_specs()]
}

#: ``op -> (rng -> [Case])``: the grids, as ``python -m jaxconv verify`` runs them.
SUITES: dict[str, Callable[[np.random.Generator], list[Case]]] = {name: spec.cases for name, spec in REGISTRY.items()}


def reference_ops() -> types.SimpleNamespace:
    """The references of every registered op (the ``jaxconv.lax`` drop-ins aside), by the op's name: the
    ``ops=`` namespace that rebuilds a :mod:`jaxconv.nn` network in plain ``lax`` (``train --check-grads``)."""
    return types.SimpleNamespace(**{name: spec.ref for name, spec in REGISTRY.items() if "." not in name})
