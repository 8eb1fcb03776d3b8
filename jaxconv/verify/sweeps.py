"""Test helpers for derivative rules: one readable assertion per check, and shape sweeps.

Assertions (no hypothesis needed; float64 is switched on inside, so a test never
flips ``jax_enable_x64`` itself)::

    from jaxconv.verify import assert_rule_ok

    def test_my_rule():
        assert_rule_ok(my_rule, x, w, kwargs={"stride": 2})

A failure is one ``AssertionError`` whose first lines say which check, which
argument, which index and the two values, e.g.::

    check_rule(my_rule) failed:
      vjp: argument w: relative error 1.000e-03 > 1e-12 (max abs error 2.1e-03 at index (1, 0, 2, 3);
      rule gives 2.1034, autodiff gives 2.1013)

Sweeps (need hypothesis: ``pip install 'jaxconv[test]'``): describe the
arguments with named dimensions, and :func:`sweep` draws shapes and values,
checks each configuration, and shrinks a failure to the smallest one, printed as
a reproducer::

    result = sweep(conv, {"x": array("N H W C"), "w": array("KH KW C O"), "stride": 1},
                   dims={"N": (1, 2), "H": (3, 6), "W": (3, 6), "C": (1, 3), "KH": (1, 3), "KW": (1, 3),
                         "O": (1, 3)},
                   where=lambda d: d["KH"] <= d["H"] and d["KW"] <= d["W"])
    result.assert_ok()
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .rules import Report, check_rule, check_vjp

__all__ = [
    "Array",
    "Config",
    "SweepResult",
    "array",
    "arguments",
    "assert_report_ok",
    "assert_rule_ok",
    "assert_vjp_ok",
    "sample",
    "shapes",
    "sweep",
]

_INSTALL_HINT = (
    "jaxconv's sweeps need hypothesis, a test extra: pip install 'jaxconv[test]' (or pip install hypothesis)"
)


def _hypothesis():
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(_INSTALL_HINT) from exc
    return hypothesis, strategies


# --- assertions -------------------------------------------------------------------------


def assert_report_ok(report: Report) -> Report:
    """Raise one readable ``AssertionError`` if ``report`` failed; return it otherwise.

    The message lists each failed check on one line (the check, the argument,
    the index of the worst entry, the rule's value and the oracle's), then the
    notes and the full table.  Inside pytest the traceback stops at the caller.
    """
    __tracebackhide__ = True
    if not report.passed:
        raise AssertionError(report.failure_message())
    return report


def assert_rule_ok(f: Callable, *args: Any, **options: Any) -> Report:
    """:func:`jaxconv.verify.check_rule` and :func:`assert_report_ok` in one call; returns the report."""
    __tracebackhide__ = True
    return assert_report_ok(check_rule(f, *args, **options))


def assert_vjp_ok(f: Callable, ref: Callable, *args: Any, **options: Any) -> Report:
    """:func:`jaxconv.verify.check_vjp` (float64 by default) and :func:`assert_report_ok` in one call."""
    __tracebackhide__ = True
    return assert_report_ok(check_vjp(f, ref, *args, **options))


# --- describing arguments -----------------------------------------------------------------

_KINDS = ("normal", "uniform", "positive", "permutation", "int", "bool")


def sample(
    shape: Sequence[int],
    values: Any = "normal",
    dtype: Any = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> np.ndarray:
    """A deterministic array: the values a sweep draws, also what its reproducers call.

    ``values``:
      * ``"normal"``: standard normal (default);
      * ``"uniform"`` or ``("uniform", low, high)``: uniform in [-1, 1) or [low, high);
      * ``"positive"``: ``0.1 + |normal|``, away from 0 (logs, square roots, divisions);
      * ``"permutation"``: distinct values in (-1, 1), none 0: no ties for max/argmax
        and no ReLU kink within a finite-difference step;
      * ``("int", low, high)``: integers in [low, high) (int32), e.g. labels;
        ``"int"`` alone is [0, 10);
      * ``"bool"``: a random mask;
      * a callable ``values(rng, shape, dims) -> array``.
    ``dtype`` defaults to float64 for the float kinds.  The same
    ``(shape, values, seed)`` gives the same array.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in shape)
    if callable(values):
        out = np.asarray(values(rng, shape, dict(dims or {})))
        if out.shape != shape:
            raise ValueError(f"`values` callable returned shape {out.shape}, expected {shape}.")
        return out if dtype is None else out.astype(dtype)
    kind, params = (values[0], tuple(values[1:])) if isinstance(values, tuple) else (values, ())
    if kind == "normal":
        out = rng.standard_normal(shape)
    elif kind == "uniform":
        low, high = params if params else (-1.0, 1.0)
        out = rng.uniform(low, high, shape)
    elif kind == "positive":
        out = 0.1 + np.abs(rng.standard_normal(shape))
    elif kind == "permutation":
        size = int(np.prod(shape, dtype=np.int64))
        out = ((2.0 * (rng.permutation(size) + 1) - (size + 1) + 1.0 / 3.0) / (size + 1)).reshape(shape)
    elif kind == "int":
        low, high = params if params else (0, 10)
        return rng.integers(low, high, shape).astype(dtype or np.int32)
    elif kind == "bool":
        return rng.random(shape) < 0.5
    else:
        raise ValueError(f"unknown `values` {values!r}: expected one of {_KINDS}, a tuple or a callable.")
    return out.astype(dtype or np.float64)


@dataclasses.dataclass(frozen=True)
class Array:
    """An array argument of a sweep: its shape (named, fixed or ranged dims), values and dtype.

    ``shape`` entries: an ``int`` (fixed), a ``str`` naming a dimension shared
    with other arrays (its range given by ``dims=`` of :func:`sweep`), or a
    ``(low, high)`` pair drawn independently (inclusive).
    """

    shape: tuple
    values: Any = "normal"
    dtype: Any = None

    def __post_init__(self):
        for d in self.shape:
            ok = (
                (isinstance(d, (int, np.integer)) and d >= 0)
                or (isinstance(d, str) and d.isidentifier())
                or (
                    isinstance(d, tuple)
                    and len(d) == 2
                    and all(isinstance(v, (int, np.integer)) for v in d)
                    and 0 <= d[0] <= d[1]
                )
            )
            if not ok:
                raise ValueError(
                    f"shape entry {d!r} of {self.shape!r}: expected a size >= 0, a dimension name or "
                    "a (low, high) range with 0 <= low <= high."
                )

    @property
    def names(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]


def array(shape: str | Sequence, values: Any = "normal", dtype: Any = None) -> Array:
    """An :class:`Array` from ``"N H W C"`` (names, or ints, separated by spaces or commas) or a sequence.

    Names shared between arrays are one dimension (``x: "N H W C"``,
    ``w: "KH KW C O"`` share ``C``).  ``values`` and ``dtype`` as in :func:`sample`.
    """
    if isinstance(shape, str):
        tokens = shape.replace(",", " ").split()
        shape = tuple(int(t) if t.lstrip("-").isdigit() else t for t in tokens)
    return Array(tuple(tuple(d) if isinstance(d, list) else d for d in shape), values, dtype)


def shapes(rank: int, min: int = 1, max: int = 8, values: Any = "normal", dtype: Any = None) -> Array:  # noqa: A002
    """An array of ``rank`` independent dimensions, each in ``[min, max]``."""
    if rank < 0 or min < 0 or max < min:
        raise ValueError(f"shapes(rank={rank}, min={min}, max={max}): need rank >= 0 and 0 <= min <= max.")
    return Array(tuple((min, max) for _ in range(rank)), values, dtype)


@dataclasses.dataclass(frozen=True)
class Config:
    """One drawn configuration: named dimension sizes, array shapes, the other arguments, a value seed."""

    dims: dict
    shapes: dict
    static: dict
    seed: int
    specs: dict = dataclasses.field(repr=False)
    order: tuple = dataclasses.field(repr=False, default=())
    literal: bool = dataclasses.field(repr=False, default=False)  # drawn by a user's strategy: values in `static`

    @classmethod
    def of_values(cls, values: Mapping[str, Any]) -> Config:
        """A configuration holding the drawn argument values themselves (a user's strategy of dicts)."""
        if not isinstance(values, Mapping):
            raise TypeError(f"a sweep strategy must draw dicts of arguments by name, drew {type(values).__name__}")
        shapes_ = {n: tuple(np.shape(v)) for n, v in values.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
        return cls({}, shapes_, dict(values), 0, {}, tuple(values), literal=True)

    def arguments(self) -> dict[str, Any]:
        """The arguments by name, arrays filled deterministically (:func:`sample` with seed ``seed + k``)."""
        if self.literal:
            return dict(self.static)
        out = {}
        for k, name in enumerate(self.order):
            if name in self.shapes:
                spec = self.specs[name]
                out[name] = sample(self.shapes[name], spec.values, spec.dtype, self.seed + k, self.dims)
            else:
                out[name] = self.static[name]
        return out

    def label(self) -> str:
        parts = [f"{n}{list(s)}" for n, s in self.shapes.items()]
        parts += [f"{n}={v!r}" for n, v in self.static.items() if n not in self.shapes]
        return " ".join(parts)

    def __str__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        seed = "" if self.literal else f"; seed {self.seed}"
        return (f"dims: {dims}; " if dims else "") + self.label() + seed


def _dim_strategy(st, name, spec):
    if isinstance(spec, (int, np.integer)):
        return st.just(int(spec))
    if isinstance(spec, tuple) and len(spec) == 2:
        return st.integers(int(spec[0]), int(spec[1]))
    if hasattr(spec, "example") and hasattr(spec, "map"):  # a hypothesis strategy
        return spec
    raise ValueError(f"dims[{name!r}] = {spec!r}: expected a size, a (low, high) pair or a hypothesis strategy.")


def arguments(
    description: Mapping[str, Any], dims: Mapping[str, Any] | None = None, where: Callable[[dict], bool] | None = None
):
    """A hypothesis strategy of :class:`Config` from a description of each argument.

    ``description`` maps argument names to an :class:`Array` (:func:`array`,
    :func:`shapes`), a hypothesis strategy (drawn, e.g. ``st.sampled_from([1, 2])``
    for a stride) or any other value (passed as is).  ``dims`` gives each named
    dimension a size, an inclusive ``(low, high)`` range or a strategy; a name
    with no entry is an error.  ``where(d)`` (``d``: dimension sizes and drawn
    non-array arguments by name) rejects configurations the function does not
    accept, e.g. ``lambda d: d["KH"] <= d["H"]``.  Integers shrink toward the low
    end of their range and the value seed toward 0.
    """
    hypothesis, st = _hypothesis()
    dims = dict(dims or {})
    order = tuple(description)
    names: list[str] = []
    for spec in description.values():
        if isinstance(spec, Array):
            names += [n for n in spec.names if n not in names]
    missing = [n for n in names if n not in dims]
    if missing:
        raise ValueError(
            f"dimension(s) {missing} have no size: pass dims={{{', '.join(repr(n) + ': (1, 4)' for n in missing)}}}."
        )
    dim_strategies = {n: _dim_strategy(st, n, dims[n]) for n in names}

    @st.composite
    def configs(draw):
        sizes = {n: draw(s) for n, s in dim_strategies.items()}
        drawn_shapes, static, specs = {}, {}, {}
        for name, spec in description.items():
            if isinstance(spec, Array):
                specs[name] = spec
                drawn_shapes[name] = tuple(
                    sizes[d]
                    if isinstance(d, str)
                    else draw(st.integers(d[0], d[1]))
                    if isinstance(d, tuple)
                    else int(d)
                    for d in spec.shape
                )
            elif hasattr(spec, "example") and hasattr(spec, "map"):
                static[name] = draw(spec)
            else:
                static[name] = spec
        if where is not None:
            hypothesis.assume(where({**sizes, **static}))
        seed = draw(st.integers(0, 2**16 - 1))
        return Config(sizes, drawn_shapes, static, seed, specs, order)

    return configs()


# --- sweeps -----------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    """What :func:`sweep` found: ``passed``, how many ``examples`` ran, and the shrunk failure.

    On failure ``config`` is the smallest failing :class:`Config` hypothesis
    found, ``report`` its :class:`~jaxconv.verify.Report` (``None`` if the call
    raised: then ``error``), and ``reproducer`` a Python snippet that re-runs it.
    """

    name: str
    passed: bool
    examples: int
    config: Config | None = None
    report: Report | None = None
    error: str | None = None
    reproducer: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        if self.passed:
            return f"sweep({self.name}): {self.examples} configurations passed"
        lines = [
            f"sweep({self.name}): FAILED; the smallest failing configuration hypothesis found in "
            f"{self.examples} calls: {self.config}"
        ]
        if self.report is not None:
            lines.append(self.report.failure_message(table=False))
        if self.error is not None:
            lines.append(f"the call raised {self.error}")
        lines += ["reproducer:", self.reproducer]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        __tracebackhide__ = True
        if not self.passed:
            raise AssertionError(str(self))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "passed": self.passed,
            "examples": self.examples,
            "config": None
            if self.config is None
            else {
                "dims": self.config.dims,
                "shapes": {k: list(v) for k, v in self.config.shapes.items()},
                "static": {k: repr(v) for k, v in self.config.static.items()},
                "seed": self.config.seed,
            },
            "report": None if self.report is None else self.report.to_dict(),
            "error": self.error,
            "reproducer": self.reproducer,
        }


#: What a sweep runs per configuration unless told otherwise: the first-order
#: checks (forward, VJP, JVP, finite differences).  Pass the option to override.
SWEEP_DEFAULTS = dict(second_order=False, jit_consistency=False, residuals=False, num_cotangents=1)


def _import_line(f) -> tuple[str, str]:
    """``(import statement or comment, the name to call)`` for a reproducer.

    The name is the module-level name bound to ``f`` itself (``rule =
    jax.custom_vjp(_primal)`` is imported as ``rule``, not ``_primal``).
    """
    fn = getattr(f, "fun", f)
    module = getattr(f, "__module__", None) or getattr(fn, "__module__", None)
    name = str(getattr(f, "__name__", None) or getattr(fn, "__name__", "f"))
    mod = sys.modules.get(module) if module else None
    if mod is not None and module != "__main__":
        if getattr(mod, name, None) is f:
            return f"from {module} import {name}", name
        for attr, value in vars(mod).items():
            if value is f and not attr.startswith("__"):
                return f"from {module} import {attr}", attr
    return f"# {name}: define or import it here (it is {module}.{getattr(fn, '__qualname__', name)})", name


def _reproducer(f, ref, config: Config, options: dict) -> str:
    imports, call = _import_line(f)
    lines = ["import numpy as np", "from jaxconv.verify import sample"]
    lines.append("from jaxconv.verify import check_vjp" if ref is not None else "from jaxconv.verify import check_rule")
    lines.append(imports)
    if ref is not None:
        ref_import, ref_call = _import_line(ref)
        if ref_import != imports:
            lines.append(ref_import)
    for k, name in enumerate(config.order):
        if config.literal and name in config.shapes:
            value = np.asarray(config.static[name])
            lines.append(f"{name} = np.array({value.tolist()!r}, dtype={value.dtype.name!r})")
        elif name in config.shapes:
            spec = config.specs[name]
            values = f"<{getattr(spec.values, '__name__', 'callable')}>" if callable(spec.values) else repr(spec.values)
            dtype = "" if spec.dtype is None else f", dtype={np.dtype(spec.dtype).name!r}"
            dims = f", dims={config.dims!r}" if callable(spec.values) else ""
            lines.append(f"{name} = sample({config.shapes[name]!r}, {values}{dtype}, seed={config.seed + k}{dims})")
        else:
            lines.append(f"{name} = {config.static[name]!r}")
    opts = "".join(f", {k}={_literal(v)}" for k, v in options.items())
    if ref is not None:
        args = ", ".join(config.order)
        lines.append(f"report = check_vjp({call}, {ref_call}, {args}, names={list(config.order)!r}{opts})")
    else:
        kwargs = "{" + ", ".join(f"{n!r}: {n}" for n in config.order) + "}"
        lines.append(f"report = check_rule({call}, kwargs={kwargs}{opts})")
    lines += ["print(report)", "report.assert_ok()"]
    return "\n".join(lines)


def _literal(value) -> str:
    """``repr`` for a reproducer; dtypes (``jnp.float32``, ``np.dtype``) as their names."""
    if isinstance(value, (type, np.dtype)) or type(value).__name__ == "_ScalarMeta":
        try:
            return repr(np.dtype(value).name)
        except TypeError:
            pass
    return repr(value)


def _positional(fn, named: dict) -> tuple:
    sig = inspect.signature(fn)
    bound = sig.bind(**named)
    bound.apply_defaults()
    return tuple(bound.args)


def sweep(
    f: Callable,
    description: Any,
    *,
    dims: Mapping[str, Any] | None = None,
    where: Callable[[dict], bool] | None = None,
    ref: Callable | None = None,
    examples: int = 20,
    seed: int = 0,
    stream: Any = "stdout",
    **check_options: Any,
) -> SweepResult:
    """Check ``f`` on many drawn configurations; shrink a failure to the smallest and print a reproducer.

    Args:
      f: a ``jax.custom_vjp``/``jax.custom_jvp`` function (checked with
        :func:`~jaxconv.verify.check_rule`), or any function with ``ref`` given
        (checked with :func:`~jaxconv.verify.check_vjp`).
      description, dims, where: the arguments by name, as :func:`arguments` takes
        them; or, as ``description``, your own hypothesis strategy drawing dicts
        of arguments by name (e.g. built with ``hypothesis.extra.numpy``): the
        reproducer then spells the arrays out.
      ref: a reference for :func:`~jaxconv.verify.check_vjp`; arguments are
        passed to ``f`` and ``ref`` in the order of ``ref``'s signature.
      examples: how many configurations to draw (shrinking runs more).
      seed: hypothesis's seed; the same seed draws the same configurations.
      stream: where to print the reproducer of a failure (``"stdout"`` is
        ``sys.stdout`` at the time of the call; ``None``: print nothing).
      **check_options: options of the checker, over :data:`SWEEP_DEFAULTS`
        (first-order checks per configuration; pass ``second_order=True`` etc.).

    Returns:
      A :class:`SweepResult`; ``result.assert_ok()`` raises with the report of
      the smallest failing configuration and its reproducer.

    Hypothesis is a test extra: ``pip install 'jaxconv[test]'``.
    """
    hypothesis, st = _hypothesis()
    from hypothesis import HealthCheck, Phase, Verbosity
    from hypothesis.errors import Unsatisfiable

    if hasattr(description, "example") and hasattr(description, "map"):  # the user's own strategy of dicts
        if dims or where:
            raise ValueError("sweep: `dims` and `where` describe a description dict; with a strategy, filter it.")
        strategy = description.map(Config.of_values)
    else:
        strategy = arguments(description, dims, where)
    options = {**(SWEEP_DEFAULTS if ref is None else {"second_order": False}), **check_options}
    label = check_options.get("name") or _import_line(f)[1]
    options.pop("name", None)
    count = 0
    failure: tuple[Config, Report | None, str | None] | None = None

    class _Falsified(Exception):
        pass

    def check(config: Config) -> Report:
        named = config.arguments()
        if ref is None:
            return check_rule(f, kwargs=named, name=f"{label} {config.label()}", **options)
        args = _positional(ref, named)
        order = list(inspect.signature(ref).parameters)[: len(args)]
        return check_vjp(f, ref, *args, names=order, name=f"{label} {config.label()}", **options)

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
        verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    )
    @hypothesis.seed(seed)
    @hypothesis.given(strategy)
    def run(config: Config) -> None:
        nonlocal count, failure
        count += 1
        report: Report | None
        error: str | None
        try:
            report, error = check(config), None
        except Exception as exc:  # noqa: BLE001 - a configuration the function rejects is a failure to report
            report, error = (
                None,
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            )
        if report is None or not report.passed:
            failure = (config, report, error)
            raise _Falsified()

    try:
        run()
    except _Falsified:
        pass
    except Unsatisfiable as exc:
        raise ValueError(f"sweep({label}): `where` rejected every configuration drawn; widen `dims`.") from exc
    if failure is None:
        return SweepResult(label, True, count)
    config, report, error = failure
    shown = {k: v for k, v in options.items() if k not in SWEEP_DEFAULTS or SWEEP_DEFAULTS[k] != v}
    result = SweepResult(label, False, count, config, report, error, _reproducer(f, ref, config, shown))
    out = sys.stdout if stream == "stdout" else stream
    if out is not None:
        print(str(result), file=out)
    return result
