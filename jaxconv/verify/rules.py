"""Checkers for hand-written derivative rules, ours and yours.

Two entry points share one set of checks:

* :func:`check_vjp` ``(f, ref, *args)`` compares ``f`` (typically a
  ``jax.custom_vjp``) with a reference ``ref`` differentiated by autodiff.
* :func:`check_rule` ``(f, *args)`` needs no reference: ``f`` is a
  ``jax.custom_vjp`` or ``jax.custom_jvp`` function, and the oracle is autodiff
  of its own undecorated primal (``f.fun``).  Where the primal cannot be
  differentiated (a callback, a ``while_loop`` in reverse mode...), the report
  says so and the rule is checked against finite differences alone.

The checks, one row per argument (pytree leaves are named by their path):

1. ``forward``: the rule's primal output (from ``fwd`` under ``jax.vjp``) equals
   the reference's output, per output leaf.
2. ``vjp``: for random cotangents ``u``, every argument's ``vjp_f(u)`` equals the
   oracle's (max abs error and relative error).
3. ``jvp`` (``custom_jvp`` rules): for a random direction in one argument at a
   time, the rule's JVP equals the oracle's.  The ``vjp`` rows then check the
   transposed (reverse-mode) rule JAX derives from it.
4. ``finite-diff``: a central difference in a random direction ``v`` of the
   scalar ``<u, f(x)>`` equals ``<vjp_f(u), v>``; an oracle independent of any
   reference.  ``finite-diff-jvp`` (``custom_jvp`` rules): the central difference
   of the whole output equals the JVP, elementwise.
5. ``second-order``: the gradient of ``<vjp_f(u), r>`` (random ``r``) equals the
   oracle's: grad-of-grad through the rule (against finite differences of the
   rule's VJP when there is no differentiable oracle).
6. ``jit`` (:func:`check_rule`): the rule's VJP is the same traced under
   ``jax.jit`` and run eagerly, op by op.
7. ``<dtype> forward`` / ``<dtype> vjp`` / ``<dtype> jvp`` (:func:`check_rule`
   with ``dtype=jnp.float32``, ``bfloat16``...): the rule run in that dtype
   against a float64 evaluation of the same rule on the same (rounded) inputs, to
   the tolerance of :func:`low_precision_tolerance`.

:func:`check_rule` also audits residual memory: what the rule's forward saves
for its backward (bytes per residual, from the jaxpr, as
``jax.ad_checkpoint.print_saved_residuals`` shows it) beside what autodiff of
the primal saves, flagging a rule that saves more (:class:`ResidualAudit`).

Only floating-point array arguments are differentiated; integer and boolean
arrays (labels, masks), Python values and ``nondiff_argnums`` arguments are held
fixed.  The float64 checks switch ``jax_enable_x64`` on for their duration: no
test needs to flip it.

Example::

    report = check_rule(my_softplus, x)      # a jax.custom_vjp; no reference needed
    print(report)          # a table, notes and the residual audit
    report.assert_ok()     # AssertionError: which check, argument, index, both values

For tests, :mod:`jaxconv.verify` turns a report into one readable assertion
(``assert_rule_ok``) and sweeps shapes with hypothesis (``sweep``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_jvp, custom_vjp
from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints
from jax.extend import core as jex_core

from .._core.jsonsafe import json_safe

__all__ = [
    "Check",
    "Report",
    "Residual",
    "ResidualAudit",
    "check_rule",
    "check_vjp",
    "low_precision_tolerance",
    "reduction_size",
    "relative_error",
]


# --- results ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: ``kind`` of check, which ``argument``, its errors and verdict.

    ``where`` is the index of the worst entry, ``actual`` the rule's value there
    and ``expected`` the oracle's (``against`` names the oracle: the reference,
    autodiff of the primal, finite differences, float64...).  ``output`` names the
    output leaf for checks that compare outputs (``jvp``).  ``error`` is set when
    the rule raised instead of returning a value: the check failed.
    """

    kind: str
    argument: str
    max_abs: float
    rel: float
    tol: float
    where: tuple[int, ...] | None = None
    actual: float | None = None
    expected: float | None = None
    output: str | None = None
    against: str = ""
    note: str = ""
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(np.isfinite(self.rel)) and self.rel <= self.tol

    def describe(self) -> str:
        """One line: which check, which argument, which index, the two values."""
        subject = self.argument if self.argument.startswith("output") else f"argument {self.argument}"
        if self.error is not None:
            return f"{self.kind}: {subject}: the rule raised {self.error}"
        where = f" at index {self.where}" if self.where is not None else ""
        if self.output is not None:
            where += f" of {self.output}"
        line = (
            f"{self.kind}: {subject}: relative error {self.rel:.3e} > {self.tol:.2g} "
            f"(max abs error {self.max_abs:.3e}{where}"
        )
        if self.actual is not None and self.expected is not None:
            line += f"; rule gives {self.actual:.10g}, {self.against or 'reference'} gives {self.expected:.10g}"
        line += ")"
        if self.note:
            line += f" [{self.note}]"
        return line

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["where"] = list(self.where) if self.where is not None else None
        d["passed"] = self.passed
        return json_safe(d)


@dataclasses.dataclass(frozen=True)
class Residual:
    """One array a forward pass saves for the backward: its shape, dtype, bytes and source."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    source: str


@dataclasses.dataclass
class ResidualAudit:
    """What the rule saves for its backward, beside what autodiff of the primal saves.

    ``rule`` and ``autodiff`` list the residuals as JAX's
    ``jax.ad_checkpoint.print_saved_residuals`` finds them in the jaxpr of
    ``jax.vjp`` (``autodiff`` is ``None`` where the primal cannot be
    differentiated).  ``saves_more`` flags a rule that saves more bytes than
    autodiff.  With ``max_ratio`` set, ``passed`` is false when the rule saves
    more than ``max_ratio`` times autodiff's bytes (and the report fails).
    Sizes are at the dtype of the check (float64 unless said otherwise).
    """

    rule: list[Residual]
    autodiff: list[Residual] | None
    max_ratio: float | None = None
    note: str = ""

    @property
    def rule_bytes(self) -> int:
        return sum(r.nbytes for r in self.rule)

    @property
    def autodiff_bytes(self) -> int | None:
        return None if self.autodiff is None else sum(r.nbytes for r in self.autodiff)

    @property
    def ratio(self) -> float | None:
        """Rule bytes over autodiff bytes (``inf`` if autodiff saves nothing and the rule something)."""
        ad = self.autodiff_bytes
        if ad is None:
            return None
        if ad == 0:
            return 1.0 if self.rule_bytes == 0 else math.inf
        return self.rule_bytes / ad

    @property
    def saves_more(self) -> bool:
        ad = self.autodiff_bytes
        return ad is not None and self.rule_bytes > ad

    @property
    def passed(self) -> bool:
        return self.max_ratio is None or self.ratio is None or self.ratio <= self.max_ratio

    def summary(self) -> str:
        ad = self.autodiff_bytes
        if self.autodiff is None or ad is None:
            return f"the rule saves {_bytes(self.rule_bytes)} in {len(self.rule)} residuals (no autodiff to compare)"
        line = (
            f"the rule saves {_bytes(self.rule_bytes)} in {len(self.rule)} residuals, autodiff of the primal "
            f"{_bytes(ad)} in {len(self.autodiff)}"
        )
        if self.saves_more:
            line = "FLAG: " + line + f": the rule saves {self.ratio:.2f}x as much"
        if not self.passed:
            line += f", over the budget of {self.max_ratio:g}x"
        return line

    def __str__(self) -> str:
        lines = ["residuals: " + self.summary()]
        rows = [
            (who, f"{r.dtype}{list(r.shape)}", _bytes(r.nbytes), r.source)
            for who, residuals in (("rule", self.rule), ("autodiff", self.autodiff))
            for r in residuals or []
        ]
        width = max((len(row[1]) for row in rows), default=0)
        for who, array, size, source in rows:
            lines.append(f"  {who:<8}  {array:<{width}}  {size:>9}  {source}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "rule": [dataclasses.asdict(r) for r in self.rule],
                "autodiff": None if self.autodiff is None else [dataclasses.asdict(r) for r in self.autodiff],
                "rule_bytes": self.rule_bytes,
                "autodiff_bytes": self.autodiff_bytes,
                "ratio": self.ratio,
                "saves_more": self.saves_more,
                "max_ratio": self.max_ratio,
                "passed": self.passed,
                "note": self.note,
            }
        )


@dataclasses.dataclass
class Report:
    """All checks of one :func:`check_vjp` or :func:`check_rule` call.  ``bool(report)`` is ``report.passed``.

    ``title`` is the checker (``"check_vjp"`` or ``"check_rule"``), ``oracle``
    what the rule was compared with, ``notes`` anything the reader must know
    (a fallback to finite differences, the low-precision tolerance used) and
    ``residuals`` the :class:`ResidualAudit` (``check_rule`` only).
    """

    name: str
    checks: list[Check]
    title: str = "check_vjp"
    oracle: str = "reference"
    notes: list[str] = dataclasses.field(default_factory=list)
    residuals: ResidualAudit | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.residuals is None or self.residuals.passed)

    def __bool__(self) -> bool:
        return self.passed

    def worst(self, kind: str) -> float:
        """Largest relative error among checks of ``kind`` (0.0 if none ran)."""
        errors = [c.rel for c in self.checks if c.kind == kind]
        return max(errors, default=0.0)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        header = ("check", "argument", "max abs err", "rel err", "tol", "ok")
        rows = [
            (
                c.kind,
                c.argument,
                f"{c.max_abs:.2e}",
                "raised" if c.error else f"{c.rel:.2e}",
                f"{c.tol:.2g}",
                "yes" if c.passed else "NO",
            )
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"{self.title}: {self.name}", fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        if self.title != "check_vjp" or self.oracle != "reference":
            lines.append(f"oracle: {self.oracle}")
        lines += [f"note: {n}" for n in self.notes]
        if self.residuals is not None:
            lines.append(str(self.residuals))
        return "\n".join(lines)

    def failure_message(self, table: bool = True) -> str:
        """Every failed check on its own line (check, argument, index, both values), then the table."""
        lines = [f"{self.title}({self.name}) failed:"]
        lines += ["  " + c.describe() for c in self.failures]
        if self.residuals is not None and not self.residuals.passed:
            lines.append("  residuals: " + self.residuals.summary())
        lines += [f"  note: {n}" for n in self.notes]
        if table:
            lines.append(str(self))
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` describing every failed check."""
        if not self.passed:
            raise AssertionError(self.failure_message())

    def to_dict(self) -> dict:
        """A strict-JSON-able dict (non-finite numbers become ``None``)."""
        return {
            "title": self.title,
            "name": self.name,
            "passed": self.passed,
            "oracle": self.oracle,
            "notes": list(self.notes),
            "checks": [c.to_dict() for c in self.checks],
            "failures": [c.describe() for c in self.failures],
            "residuals": None if self.residuals is None else self.residuals.to_dict(),
        }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# --- comparisons ----------------------------------------------------------------------


def relative_error(actual, expected) -> tuple[float, float, tuple[int, ...] | None]:
    """``(max |a - e|, max |a - e| / max |e|, index of the worst entry)``.

    The relative error is normalised by the largest reference entry, so it is
    meaningful for arrays containing zeros; if ``expected`` is all zero the
    absolute error is returned as the relative one.  NaNs in the same places
    count as equal; a NaN in only one of them is an infinite error.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf"), float("inf"), None
    if a.size == 0:
        return 0.0, 0.0, None
    both_nan = np.isnan(a) & np.isnan(e)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN here, handled below
        diff = np.where(both_nan, 0.0, np.abs(a - e))
    diff = np.where(np.isnan(diff), np.inf, diff)
    same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    diff = np.where(same_inf, 0.0, diff)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    max_abs = float(diff[idx])
    finite = e[np.isfinite(e)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    return max_abs, rel, tuple(int(i) for i in idx)


def _compare(kind, argument, actual, expected, tol, against, floor=0.0, **extra) -> Check:
    """A :class:`Check` of two arrays, with the two values at the worst index.

    ``floor`` is an absolute error the oracle cannot resolve (finite
    differences' rounding noise): errors below it pass however small the entries.
    """
    max_abs, rel, where = relative_error(actual, expected)
    a_val = e_val = None
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if where is not None and a.shape == e.shape:
        a_val, e_val = float(a[where]), float(e[where])
    if floor > 0 and math.isfinite(max_abs) and tol > 0:
        finite = e[np.isfinite(e)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        rel = max_abs / max(scale, floor / tol)
    return Check(kind, argument, max_abs, rel, tol, where, a_val, e_val, against=against, **extra)


def _scalar_check(kind, argument, actual, expected, tol, against, note="", floor=0.0) -> Check:
    """Relative error of two scalars, normalised by the larger of the two (and ``floor / tol``: :func:`_compare`)."""
    actual, expected = float(actual), float(expected)
    err = abs(actual - expected)
    if not math.isfinite(err):
        err = math.inf if not (math.isnan(actual) and math.isnan(expected)) else 0.0
    scale = max(
        abs(actual) if math.isfinite(actual) else 0.0,
        abs(expected) if math.isfinite(expected) else 0.0,
        floor / tol if tol > 0 else 0.0,
        1e-300,
    )
    return Check(kind, argument, err, err / scale, tol, None, actual, expected, against=against, note=note)


#: Central differences cannot resolve derivatives below their rounding noise,
#: about eps * |f| / step: errors under FD_NOISE times that pass (a derivative
#: tiny next to the function's value, e.g. a saturated normalisation).
FD_NOISE = 32


def _fd_floor(values, eps_step: float, dtype) -> float:
    """Rounding-noise floor of a central difference of ``values`` (arrays or sums of |terms|) with step ``eps_step``."""
    eps = float(jnp.finfo(dtype).eps)
    return FD_NOISE * eps * float(values) / eps_step


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = " ".join(line.strip() for line in text[:3])
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# --- trees ------------------------------------------------------------------------------


def _is_float_array(leaf) -> bool:
    return hasattr(leaf, "dtype") and hasattr(leaf, "shape") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _vdot(a, b):
    """``<a, b>`` over the floating leaves of two trees of the same structure."""
    pairs = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if _is_float_array(x)]
    if not pairs:
        return jnp.zeros(())
    return sum((jnp.vdot(x, y) for x, y in pairs[1:]), jnp.vdot(*pairs[0]))


def _np_vdot(a, b, absolute: bool = False) -> float:
    """``<a, b>`` (``<|a|, |b|>`` if ``absolute``) in float64 numpy over the floating leaves (no XLA compile)."""
    f = np.abs if absolute else (lambda v: v)
    return float(
        sum(
            np.vdot(f(np.asarray(x, np.float64)), f(np.asarray(y, np.float64)))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
            if _is_float_array(x)
        )
    )


def _random_like(rng: np.random.Generator, tree):
    """Standard normal floating leaves (numpy draws: no compile per shape); zero ``float0`` for the others."""
    leaves, treedef = jax.tree.flatten(tree)
    out: list[jax.Array | np.ndarray] = []
    for leaf in leaves:
        if _is_float_array(leaf):
            out.append(jnp.asarray(rng.standard_normal(tuple(leaf.shape)), leaf.dtype))
        else:
            out.append(np.zeros(np.shape(leaf), jax.dtypes.float0))
    return jax.tree.unflatten(treedef, out)


def _value_and_pullback(fn, primals, u):
    y, pull = jax.vjp(fn, *primals)
    return y, pull(u)


def _output_names(tree) -> list[str]:
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if len(paths) == 1 and not paths[0]:
        return ["output"]
    return ["output" + jax.tree_util.keystr(p) for p in paths]


class _Problem:
    """The arguments, split into the differentiated leaves (``primals``) and the fixed rest.

    ``fixed`` are positions of arguments held fixed whatever their dtype
    (``nondiff_argnums``); floating array leaves elsewhere are differentiated and
    cast to ``dtype``; all other leaves are held fixed as given.
    """

    def __init__(self, args, arg_names, dtype, fixed=frozenset(), what="check_vjp"):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(args, is_leaf=lambda v: v is None)
        self.diff_idx = [i for i, (path, leaf) in enumerate(flat) if _is_float_array(leaf) and path[0].idx not in fixed]
        if not self.diff_idx:
            raise ValueError(f"{what} needs at least one floating-point array argument to differentiate.")
        self.leaves = [jnp.asarray(leaf, dtype) if i in self.diff_idx else leaf for i, (_, leaf) in enumerate(flat)]
        self.names = []
        for i in self.diff_idx:
            path = flat[i][0]
            self.names.append(arg_names[path[0].idx] + jax.tree_util.keystr(path[1:]))
        self.primals = [self.leaves[i] for i in self.diff_idx]

    def lift(self, fn):
        """``fn`` as a function of the differentiated leaves alone."""

        def on_leaves(*diff_leaves):
            full = list(self.leaves)
            for i, v in zip(self.diff_idx, diff_leaves):
                full[i] = v
            return fn(*self.treedef.unflatten(full))

        return on_leaves


# --- the checks --------------------------------------------------------------------------


@dataclasses.dataclass
class _Options:
    seed: int = 0
    num_cotangents: int = 2
    rtol: float = 1e-12
    fd_eps: float = 1e-6
    fd_rtol: float = 1e-6
    second_order: bool = True
    finite_differences: bool = True
    jit: bool = True
    # check_rule only:
    rule_kind: str | None = None  # None (check_vjp), "custom_vjp" or "custom_jvp"
    jit_consistency: bool = False


class _Runner:
    """Runs the checks of one call; in rule mode an exception of the rule is a failed check, not a crash."""

    def __init__(self, prob: _Problem, f, ref, o: _Options):
        self.prob, self.o = prob, o
        self.f_l, self.ref_l = prob.lift(f), prob.lift(ref)
        self.maybe_jit = jax.jit if o.jit else (lambda fn: fn)
        self.rule_mode = o.rule_kind is not None
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.oracle = "reference" if not self.rule_mode else "autodiff of the primal (f.fun)"
        self.ref_vjp_ok = True
        self.ref_jvp_ok = None  # custom_jvp rules: whether autodiff of the primal gave the JVP rows an oracle
        self.against = "reference" if not self.rule_mode else "autodiff"

    # Rule errors: captured in rule mode, raised by check_vjp (as it always did).
    def attempt(self, kind, subjects, fn, hint=""):
        if not self.rule_mode:
            return fn()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any exception of the rule is its failure
            text = _error_text(exc) + (f" ({hint})" if hint else "")
            for s in subjects:
                self.checks.append(Check(kind, s, math.inf, math.inf, self.o.rtol, error=text))
            return None

    def oracle_attempt(self, what, fn, instead):
        """Differentiate the primal; ``None`` (with a note saying what is done ``instead``) where autodiff cannot."""
        if not self.rule_mode:
            return fn()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            self.notes.append(f"autodiff of the primal f.fun cannot compute its {what} ({_error_text(exc)}); {instead}")
            return None

    def run(self) -> tuple[list[Check], list[str]]:
        o, prob, maybe_jit = self.o, self.prob, self.maybe_jit
        primals, names = prob.primals, prob.names
        f_l, ref_l = self.f_l, self.ref_l
        rng = np.random.default_rng(o.seed)

        # The reference's output structure (an exception here means the
        # arguments are wrong: it propagates), then random cotangents for it.
        y_shape = jax.eval_shape(ref_l, *primals)
        out_names = _output_names(y_shape)
        cotangents = [_random_like(rng, y_shape) for _ in range(o.num_cotangents)]
        u = cotangents[0] if cotangents else _random_like(rng, y_shape)

        # One compiled program per side: the primal output as differentiation
        # produces it (fwd for a custom_vjp) and the pullback of a cotangent.
        vjp_f = maybe_jit(lambda p, u: _value_and_pullback(f_l, p, u))
        vjp_r = maybe_jit(lambda p, u: _value_and_pullback(ref_l, p, u))
        first_r = self.oracle_attempt(
            "VJP", lambda: vjp_r(primals, u), "the rule is checked against finite differences alone"
        )
        ref_vjp_ok = self.ref_vjp_ok = first_r is not None
        y_r = first_r[0] if ref_vjp_ok else maybe_jit(ref_l)(*primals)
        first_f = self._rule_vjp(vjp_f, u, out_names)

        if first_f is not None:
            y_f = first_f[0]
            # jaxlib ships no type stub for PyTreeDef (jax's annotations name an unresolved type).
            if jax.tree.structure(y_f) != jax.tree.structure(y_r):  # type: ignore[operator]
                message = (
                    f"`f` and `ref` return different structures: {jax.tree.structure(y_f)} vs "
                    f"{jax.tree.structure(y_r)}."
                )
                if not self.rule_mode:
                    raise ValueError(message)
                self.checks.append(Check("forward", "output", math.inf, math.inf, o.rtol, error=message))
            else:
                against = "f.fun" if self.rule_mode else "reference"
                for out, a, e in zip(out_names, jax.tree.leaves(y_f), jax.tree.leaves(y_r)):
                    self.checks.append(_compare("forward", out, a, e, o.rtol, against))

        grads_f = first_f[1] if first_f is not None else None
        if first_f is not None and ref_vjp_ok:
            for k, uk in enumerate(cotangents):
                a = first_f[1] if k == 0 else vjp_f(primals, uk)[1]
                e = first_r[1] if k == 0 else vjp_r(primals, uk)[1]
                for leaf_name, ai, ei in zip(names, a, e):
                    self.checks.append(_compare("vjp", leaf_name, ai, ei, o.rtol, self.against))

        directions = _random_like(rng, primals)
        fd_needed = o.finite_differences or not ref_vjp_ok
        if not ref_vjp_ok and not o.finite_differences:
            self.notes.append("finite differences ran although finite_differences=False: they are the only oracle")

        jvps_f = None
        if o.rule_kind == "custom_jvp":
            jvps_f = self._jvp_checks(directions)

        if fd_needed:
            self._finite_differences(u, grads_f, directions, jvps_f, only_oracle=not ref_vjp_ok)

        if o.second_order:
            self._second_order(u, _random_like(rng, primals), directions)

        if o.jit_consistency:
            self._jit_consistency(u, grads_f)
        return self.checks, self.notes

    def _rule_vjp(self, vjp_f, u, out_names):
        """``(y, grads)`` of the rule, or ``None`` with the failure attributed to its forward or its backward."""
        if not self.rule_mode:
            return vjp_f(self.prob.primals, u)
        try:
            return vjp_f(self.prob.primals, u)
        except Exception as exc:  # noqa: BLE001 - the rule's failure is the report's
            forward = self.maybe_jit(lambda p: jax.vjp(self.f_l, *p)[0])
            if self.attempt("forward", out_names, lambda: forward(self.prob.primals)) is not None:
                text = _error_text(exc)
                for s in self.prob.names:
                    self.checks.append(Check("vjp", s, math.inf, math.inf, self.o.rtol, error=text))
            return None

    def _jvp_checks(self, directions):
        """``jvp`` rows: one argument's direction at a time; the rule against autodiff of the primal."""
        o, prob, maybe_jit = self.o, self.prob, self.maybe_jit
        primals, names = prob.primals, prob.names
        push_f = maybe_jit(lambda p, t: jax.jvp(self.f_l, tuple(p), tuple(t))[1])
        push_r = maybe_jit(lambda p, t: jax.jvp(self.ref_l, tuple(p), tuple(t))[1])

        def tangents(j):
            return [directions[j] if i == j else jnp.zeros_like(p) for i, p in enumerate(primals)]

        ref_ok = (
            self.oracle_attempt(
                "JVP", lambda: push_r(primals, tangents(0)), "its JVP is checked against finite differences alone"
            )
            is not None
        )
        self.ref_jvp_ok = ref_ok
        jvps_f = []
        for j, leaf_name in enumerate(names):
            a = self.attempt("jvp", [leaf_name], lambda j=j: push_f(primals, tangents(j)))
            jvps_f.append(a)
            if a is not None and ref_ok:
                e = push_r(primals, tangents(j))
                self.checks.append(self._worst_output("jvp", leaf_name, a, e, o.rtol, self.against))
        return jvps_f

    @staticmethod
    def _worst_output(
        kind, argument, actual_tree, expected_tree, tol, against, note="", floors=None, tols=None
    ) -> Check:
        """The worst floating output leaf's comparison, naming the leaf when there are several."""
        names = _output_names(expected_tree)
        n = len(names)
        floors = floors or [0.0] * n
        tols = tols or [(tol, note)] * n
        rows = [
            _compare(kind, argument, a, e, t, against, floor=fl, output=name if n > 1 else None, note=nt)
            for name, a, e, fl, (t, nt) in zip(
                names, jax.tree.leaves(actual_tree), jax.tree.leaves(expected_tree), floors, tols
            )
            if _is_float_array(e)
        ]
        if not rows:
            return Check(kind, argument, 0.0, 0.0, tol, against=against, note="no floating outputs")
        return max(rows, key=lambda c: (not c.passed, c.rel))

    def _finite_differences(self, u, grads_f, directions, jvps_f, only_oracle=False):
        """Central differences of f along one argument's direction at a time: the reference-free oracle."""
        o, prob = self.o, self.prob
        primals, names = prob.primals, prob.names
        f_jit = self.maybe_jit(self.f_l)
        note = "the only oracle: autodiff of the primal failed" if only_oracle else ""
        for j, leaf_name in enumerate(names):
            v = directions[j]

            def at(t, j=j, v=v):
                moved = list(primals)
                moved[j] = primals[j] + t * v
                return f_jit(*moved)

            y_plus = self.attempt("finite-diff", [leaf_name], lambda: at(o.fd_eps))
            if y_plus is None:
                continue
            y_minus = at(-o.fd_eps)
            dtype = primals[j].dtype
            if grads_f is not None:
                fd = (_np_vdot(u, y_plus) - _np_vdot(u, y_minus)) / (2 * o.fd_eps)
                analytic = _np_vdot(grads_f[j], v)
                floor = _fd_floor(_np_vdot(u, y_plus, absolute=True), o.fd_eps, dtype)
                self.checks.append(
                    _scalar_check(
                        "finite-diff", leaf_name, analytic, fd, o.fd_rtol, "finite differences", note=note, floor=floor
                    )
                )
            if jvps_f is not None and jvps_f[j] is not None:
                fd_tree = jax.tree.map(
                    lambda p, m: (
                        (np.asarray(p, np.float64) - np.asarray(m, np.float64)) / (2 * o.fd_eps)
                        if _is_float_array(p)
                        else p
                    ),
                    y_plus,
                    y_minus,
                )
                floors = [
                    _fd_floor(np.max(np.abs(np.asarray(p, np.float64)), initial=0.0), o.fd_eps, dtype)
                    if _is_float_array(p)
                    else 0.0
                    for p in jax.tree.leaves(y_plus)
                ]
                self.checks.append(
                    self._worst_output(
                        "finite-diff-jvp",
                        leaf_name,
                        jvps_f[j],
                        fd_tree,
                        o.fd_rtol,
                        "finite differences",
                        note=note,
                        floors=floors,
                    )
                )

    def _second_order(self, u, r, directions):
        o, prob, maybe_jit = self.o, self.prob, self.maybe_jit
        primals, names = prob.primals, prob.names
        argnums = tuple(range(len(primals)))

        def scalar(fn):
            def s(*p):
                _, vjp = jax.vjp(fn, *p)
                return _vdot(vjp(u), r)

            return s

        second_f = maybe_jit(jax.grad(scalar(self.f_l), argnums=argnums))
        second_r = maybe_jit(jax.grad(scalar(self.ref_l), argnums=argnums))
        a = self.attempt(
            "second-order",
            names,
            lambda: second_f(*primals),
            hint="pass second_order=False if the rule need not be differentiated twice",
        )
        if a is None:
            return
        e = self.oracle_attempt(
            "second derivatives",
            lambda: second_r(*primals),
            "second-order rows use central differences of the rule's own VJP",
        )
        if e is not None:
            for leaf_name, ai, ei in zip(names, a, e):
                self.checks.append(_compare("second-order", leaf_name, ai, ei, o.rtol, self.against))
            return
        # No differentiable oracle: central differences of the rule's own VJP.
        first = maybe_jit(scalar(self.f_l))
        for j, leaf_name in enumerate(names):
            v = directions[j]

            def at(t, j=j, v=v):
                moved = list(primals)
                moved[j] = primals[j] + t * v
                return first(*moved)

            s_plus, s_minus = float(at(o.fd_eps)), float(at(-o.fd_eps))
            fd = (s_plus - s_minus) / (2 * o.fd_eps)
            floor = _fd_floor(max(abs(s_plus), abs(s_minus)), o.fd_eps, primals[j].dtype)
            self.checks.append(
                _scalar_check(
                    "second-order",
                    leaf_name,
                    _np_vdot(a[j], v),
                    fd,
                    o.fd_rtol,
                    "finite differences",
                    note="oracle: finite differences of the VJP",
                    floor=floor,
                )
            )

    def _jit_consistency(self, u, grads_f):
        """The rule's VJP traced under jit against the same run eagerly (or the other way round)."""
        primals, names = self.prob.primals, self.prob.names
        other = (
            (lambda p, u: jax.vjp(self.f_l, *p)[1](u))
            if self.o.jit
            else jax.jit(lambda p, u: jax.vjp(self.f_l, *p)[1](u))
        )
        against = "eager" if self.o.jit else "jit"
        b = self.attempt("jit", names, lambda: other(primals, u))
        if b is None or grads_f is None:
            return
        for leaf_name, ai, bi in zip(names, grads_f, b):
            self.checks.append(_compare("jit", leaf_name, ai, bi, self.o.rtol, against))


# --- check_vjp ---------------------------------------------------------------------------


def check_vjp(
    f: Callable,
    ref: Callable,
    *args: Any,
    names: Sequence[str] | None = None,
    seed: int = 0,
    num_cotangents: int = 2,
    dtype=jnp.float64,
    rtol: float | None = None,
    fd_eps: float = 1e-6,
    fd_rtol: float = 1e-6,
    second_order: bool = True,
    finite_differences: bool = True,
    jit: bool = True,
    name: str | None = None,
) -> Report:
    """Compare the VJP of ``f`` with the VJP of ``ref`` at ``args``.

    For a ``jax.custom_vjp`` / ``jax.custom_jvp`` function whose own primal is
    the reference, :func:`check_rule` needs no second copy.

    Args:
      f: the function under test, ``f(*args) -> pytree of arrays``.
      ref: a reference with the same signature, differentiated by autodiff.
      *args: arguments; floating arrays (leaves of pytrees too) are differentiated
        and cast to ``dtype``; everything else is held fixed.
      names: a name per positional argument for the report (default ``arg0``...).
      seed: seed of the random cotangents and directions.
      num_cotangents: how many random cotangents to compare the VJPs on.
      dtype: the floating dtype of the check; float64 enables ``jax_enable_x64``
        for the duration of the call.
      rtol: tolerance of the forward, VJP and second-order comparisons
        (default 1e-12 in float64, 1e-5 in float32).
      fd_eps, fd_rtol: step and tolerance of the central difference (float64;
        use tie- and kink-free inputs for piecewise-linear ops).
      second_order: run the grad-of-grad comparison.
      finite_differences: run the central-difference check.
      jit: run every computation under ``jax.jit`` (one compile per check instead
        of op-by-op dispatch); ``False`` checks the rule eagerly.
      name: a label for the report.

    Returns:
      A :class:`Report`; ``print`` it for a table, ``report.assert_ok()`` to fail
      with the argument and index of the worst entry.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` (={dtype}) must be a floating dtype.")
    if rtol is None:
        rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    if names is not None and len(names) != len(args):
        raise ValueError(f"`names` (={list(names)!r}) must name each of the {len(args)} arguments.")
    label = name or str(getattr(f, "__name__", "f"))
    arg_names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    options = _Options(seed, num_cotangents, rtol, fd_eps, fd_rtol, second_order, finite_differences, jit)
    with jax.enable_x64(dtype == jnp.float64 or bool(jax.config.read("jax_enable_x64"))):
        prob = _Problem(args, arg_names, dtype)
        checks, notes = _Runner(prob, f, ref, options).run()
    return Report(label, checks, notes=notes)


# --- check_rule ---------------------------------------------------------------------------


def _custom_kind(f) -> str | None:

    if isinstance(f, custom_vjp):
        return "custom_vjp"
    if isinstance(f, custom_jvp):
        return "custom_jvp"
    return None


def _unwrap_rule(f, args: tuple, kwargs: dict):
    """The ``custom_vjp``/``custom_jvp`` object behind ``f`` (through ``jax.jit`` and ``functools.partial``)."""
    seen = 0
    while _custom_kind(f) is None and seen < 20:
        seen += 1
        if isinstance(f, functools.partial):
            args = tuple(f.args) + tuple(args)
            kwargs = {**f.keywords, **kwargs}
            f = f.func
        elif hasattr(f, "__wrapped__"):
            f = f.__wrapped__
        else:
            break
    kind = _custom_kind(f)
    if kind is None:
        label = getattr(f, "__name__", repr(f))
        raise TypeError(
            f"check_rule({label}): {label} is a plain function, not a jax.custom_vjp or jax.custom_jvp, so it has "
            f"no rule of its own to check and no primal to check it against. Decorate it with @jax.custom_vjp "
            f"(and f.defvjp(fwd, bwd)) or @jax.custom_jvp, or compare it with a reference you write: "
            f"check_vjp(f, ref, *args)."
        )
    missing = (kind == "custom_vjp" and getattr(f, "fwd", None) is None) or (
        kind == "custom_jvp" and getattr(f, "jvp", None) is None
    )
    if missing:
        how = "f.defvjp(fwd, bwd)" if kind == "custom_vjp" else "f.defjvp(jvp)"
        raise TypeError(f"check_rule({f.__name__}): the {kind} has no rule defined yet; call {how} first.")
    return f, kind, args, kwargs


def _bind(primal, args: tuple, kwargs: dict) -> tuple[tuple, list[str] | None]:
    """Positional arguments (keywords bound to their positions, as JAX does) and their parameter names."""
    try:
        sig = inspect.signature(primal)
    except (TypeError, ValueError):
        sig = None
    if sig is None:
        if kwargs:
            raise TypeError("check_rule: keyword arguments need a primal with an inspectable signature.")
        return tuple(args), None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"check_rule: the arguments do not fit {primal.__name__}{sig}: {exc}") from None
    bound.apply_defaults()
    if bound.kwargs:
        raise TypeError(
            f"check_rule: keyword-only arguments {sorted(bound.kwargs)} of {primal.__name__} cannot be "
            "passed to a custom_vjp/custom_jvp function (JAX resolves arguments to positions)."
        )
    positional = tuple(bound.args)
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            names += [f"{p.name}[{i}]" for i in range(len(positional) - len(names))]
            break
    return positional, names[: len(positional)] if len(names) >= len(positional) else None


def check_rule(
    f: Callable,
    *args: Any,
    kwargs: dict | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
    num_cotangents: int = 2,
    dtype=jnp.float64,
    rtol: float = 1e-12,
    fd_eps: float = 1e-6,
    fd_rtol: float = 1e-6,
    second_order: bool = True,
    finite_differences: bool = True,
    jit: bool = True,
    jit_consistency: bool = True,
    residuals: bool = True,
    max_residual_ratio: float | None = None,
    low_rtol: float | None = None,
    reduction: int | None = None,
    name: str | None = None,
) -> Report:
    """Check a ``jax.custom_vjp`` or ``jax.custom_jvp`` rule against autodiff of its own primal.

    The oracle is the undecorated primal JAX keeps as ``f.fun``, differentiated
    by autodiff: no second copy of the function is needed.  Where autodiff of
    the primal fails (it calls a callback or an op without a derivative rule),
    the report notes why and checks the rule against central differences alone
    (``report.oracle`` says which oracle was used).

    Checks (see the module docstring): ``forward``, ``vjp`` per argument and
    cotangent, ``finite-diff``, ``second-order``, ``jit``; for ``custom_jvp``
    rules also ``jvp`` and ``finite-diff-jvp`` per argument (the ``vjp`` rows
    then check the transposed rule).  An exception raised by the rule (a wrong
    cotangent structure, a bwd that cannot be differentiated...) is a failed
    check carrying the message; an exception of the primal itself means the
    arguments are wrong and propagates.

    Args:
      f: a ``jax.custom_vjp`` or ``jax.custom_jvp`` function, with or without
        ``nondiff_argnums`` (also wrapped in ``jax.jit`` or ``functools.partial``:
        the rule behind them is checked).  A plain function raises ``TypeError``:
        use :func:`check_vjp` with a reference.
      *args: arguments as ``f`` takes them.  Floating arrays (leaves of dicts,
        tuples, NamedTuples too) are differentiated in float64; integer and
        boolean arrays, Python values and ``nondiff_argnums`` positions are held
        fixed.  Outputs may be any pytree, with integer leaves too.
      kwargs: keyword arguments of ``f``, bound to their positions with the
        primal's signature as JAX does (so ``nondiff_argnums`` apply to them).
      names: a name per positional argument; default: the primal's parameter names.
      seed, num_cotangents: random cotangents/directions and how many cotangents.
      dtype: the dtype the rule is used in.  The float64 checks always run; a
        float32, bfloat16 or float16 ``dtype`` adds ``"<dtype> forward"``,
        ``"<dtype> vjp"`` (and ``"<dtype> jvp"``) rows: the rule run in that dtype
        against a float64 evaluation of the same rule on the same rounded inputs,
        to the tolerance :func:`low_precision_tolerance` gives (or ``low_rtol``),
        relaxed where autodiff of the primal in that dtype is as far off.
      rtol: tolerance of the float64 forward, VJP, JVP, second-order and jit
        comparisons (relative to the largest entry of the expected array).
      fd_eps, fd_rtol: step and tolerance of the central differences (errors
        below ``FD_NOISE`` times the difference's rounding noise pass).
      second_order, finite_differences: run those checks (finite differences run
        regardless where they are the only oracle).
      jit: run the checks under ``jax.jit``; ``jit_consistency`` adds ``jit``
        rows comparing the rule's VJP under jit with the same run eagerly.
      residuals: audit residual memory (:class:`ResidualAudit`); with
        ``max_residual_ratio`` the report fails when the rule saves more than that
        many times the bytes autodiff of the primal saves.
      low_rtol, reduction: override the low-precision tolerance, or only the
        reduction size it is computed from (default: read off the jaxpr).
      name: a label for the report (default: the function's name).

    Returns:
      A :class:`Report` (``title="check_rule"``): ``print`` it, or
      ``report.assert_ok()`` / :func:`jaxconv.verify.assert_report_ok`.
    """
    rule, kind, args, kw = _unwrap_rule(f, tuple(args), dict(kwargs or {}))
    args, param_names = _bind(rule.fun, args, kw)
    if names is not None and len(names) != len(args):
        raise ValueError(f"`names` (={list(names)!r}) must name each of the {len(args)} arguments.")
    arg_names = list(names) if names is not None else (param_names or [f"arg{i}" for i in range(len(args))])
    low = jnp.dtype(dtype)
    if not jnp.issubdtype(low, jnp.floating):
        raise ValueError(f"`dtype` (={low}) must be a floating dtype.")
    label = name or str(getattr(rule, "__name__", "f"))
    options = _Options(
        seed,
        num_cotangents,
        rtol,
        fd_eps,
        fd_rtol,
        second_order,
        finite_differences,
        jit,
        rule_kind=kind,
        jit_consistency=jit_consistency,
    )
    fixed = frozenset(int(i) for i in (rule.nondiff_argnums or ()))
    with jax.enable_x64(True):
        prob = _Problem(args, arg_names, jnp.float64, fixed, what="check_rule")
        runner = _Runner(prob, rule, rule.fun, options)
        checks, notes = runner.run()
        oracle = runner.oracle
        if not runner.ref_vjp_ok:
            oracle = "finite differences only (autodiff of the primal failed; see notes)"
            if runner.ref_jvp_ok:
                oracle = (
                    "autodiff of the primal (f.fun) for the JVP, finite differences for the VJP "
                    "(reverse-mode autodiff of the primal failed; see notes)"
                )
        if fixed:
            notes.append(
                "held fixed (nondiff_argnums): " + ", ".join(arg_names[i] for i in sorted(fixed) if i < len(arg_names))
            )
        audit = _audit_residuals(prob, rule, max_residual_ratio) if residuals else None
        if audit is not None and audit.saves_more:
            notes.append(audit.summary())
        if low != jnp.float64:
            checks += _low_precision_checks(prob, rule, kind, low, options, low_rtol, reduction, notes)
    return Report(label, checks, title="check_rule", oracle=oracle, notes=notes, residuals=audit)


# --- residuals ------------------------------------------------------------------------


def _saved(fn, primals, leaf_names) -> list[Residual]:

    out = []
    for abstract, source in saved_residuals(fn, *primals):
        aval = cast(jax.core.ShapedArray, abstract)  # typed AbstractValue; a residual is an array's
        source = re.sub(r"diff_leaves\[(\d+)\]", lambda m: leaf_names[int(m.group(1))], source)
        shape = tuple(int(d) for d in aval.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize
        out.append(Residual(shape, str(jnp.dtype(aval.dtype)), nbytes, source))
    return out


def _audit_residuals(prob: _Problem, rule, max_ratio) -> ResidualAudit:
    note = ""
    try:
        rule_res = _saved(prob.lift(rule), prob.primals, prob.names)
    except Exception as exc:  # noqa: BLE001 - a failing rule is reported by the checks
        return ResidualAudit([], None, max_ratio, note=f"could not trace the rule's residuals: {_error_text(exc)}")
    try:
        ad_res = _saved(prob.lift(rule.fun), prob.primals, prob.names)
    except Exception as exc:  # noqa: BLE001
        ad_res, note = None, f"autodiff of the primal cannot run ({_error_text(exc)})"
    return ResidualAudit(rule_res, ad_res, max_ratio, note=note)


# --- low precision ---------------------------------------------------------------------


def _reduction_of(eqn) -> int:
    name, params = eqn.primitive.name, eqn.params
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    if name == "dot_general":
        (lhs_contract, _), _ = params["dimension_numbers"]
        return math.prod(shapes[0][d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs_spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
        return math.prod(shapes[1][d] for d in rhs_spec[1:])
    if name in ("reduce_sum", "reduce_prod"):
        return math.prod(shapes[0][a] for a in params.get("axes", ()))
    if name in ("cumsum", "cumprod", "cumlogsumexp"):
        return shapes[0][params["axis"]] if shapes[0] else 1
    if name in ("reduce_window_sum", "reduce_window", "select_and_scatter_add", "select_and_gather_add"):
        return math.prod(params.get("window_dimensions", (1,)))
    if name.startswith("scatter") and len(shapes) >= 3:
        operand, updates = math.prod(shapes[0]), math.prod(shapes[2])
        return max(1, -(-updates // max(operand, 1)))
    return 1


def _subjaxprs(params):

    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _max_reduction(jaxpr) -> int:
    k = 1
    for eqn in jaxpr.eqns:
        k = max(k, _reduction_of(eqn))
        for sub in _subjaxprs(eqn.params):
            k = max(k, _max_reduction(sub))
    return k


def reduction_size(fn: Callable, *args) -> int:
    """The longest sum ``fn(*args)`` computes: contraction of a dot or convolution, reduced axes, window.

    Read off the jaxpr (sub-jaxprs included); 1 for elementwise functions.
    """
    return _max_reduction(jax.make_jaxpr(fn)(*args).jaxpr)


def low_precision_tolerance(dtype, reduction: int = 1) -> float:
    """The relative tolerance of a rule run in ``dtype`` against its float64 evaluation.

    ``tol = eps(dtype) * (4 + 2 * log2(reduction))``, applied as
    ``max |a - e| <= tol * max |e|`` with ``e`` the float64 evaluation of the same
    rule on the same rounded inputs, so that the absolute tolerance scales with
    the output's magnitude (its largest entry) and input rounding is not counted.
    ``eps`` is the dtype's machine epsilon (float32 1.2e-7, float16 9.8e-4,
    bfloat16 7.8e-3).  The constant 4 covers a short chain of rounded elementwise
    ops (each within half an ulp); ``2 * log2(reduction)`` is the growth of the
    error bound of pairwise (tree) summation over ``reduction`` terms, which XLA's
    reductions and blocked matrix products and convolutions attain (a sequential
    sum in low precision grows like ``reduction * eps`` and will be flagged, as
    it should be).  ``reduction`` is the longest sum in the rule's forward and
    backward: the contraction of a dot or a convolution, reduced axes or a pooling
    window (:func:`reduction_size`).  For example float32 with a 3x3x64
    convolution (576 terms) gets ``tol = 1.2e-7 * (4 + 18.3) = 2.7e-6``.  A
    badly conditioned rule (a small difference of large numbers) can exceed it
    without a bug: :func:`check_rule` then also runs autodiff of the primal in
    the same dtype, and a row that misses this tolerance passes (with a note) if
    the rule is within ``AD_FACTOR`` (4) times autodiff's own error: a rule is
    blamed only for precision it loses on its own.  ``low_rtol`` replaces both.
    """
    eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
    return eps * (4.0 + 2.0 * math.log2(max(int(reduction), 1)))


def _low_precision_checks(prob, rule, kind, low, o: _Options, low_rtol, reduction, notes) -> list[Check]:
    """The rule run in ``low`` against a float64 evaluation of the same rule on the same rounded inputs."""
    f_l = prob.lift(rule)
    label = str(low)
    lo_primals = [p.astype(low) for p in prob.primals]
    hi_primals = [p.astype(jnp.float64) for p in lo_primals]
    checks: list[Check] = []

    def vjp_all(p, u):
        y, pull = jax.vjp(f_l, *p)
        return y, pull(u)

    y_hi = jax.eval_shape(f_l, *hi_primals)
    rng = np.random.default_rng([o.seed, 7919])
    u_hi = _random_like(rng, y_hi)
    y_lo_shape = jax.eval_shape(f_l, *lo_primals)
    u_lo = jax.tree.map(lambda u, y: u.astype(y.dtype) if _is_float_array(y) else u, u_hi, y_lo_shape)
    u_hi = jax.tree.map(lambda u: u.astype(jnp.float64) if _is_float_array(u) else u, u_lo)

    if reduction is None:
        try:
            reduction = _max_reduction(jax.make_jaxpr(vjp_all)(lo_primals, u_lo).jaxpr)
        except Exception:  # noqa: BLE001 - the rule's failure is reported below
            reduction = 1
    tol = low_rtol if low_rtol is not None else low_precision_tolerance(low, reduction)
    notes.append(
        f"{label} checks: the rule in {label} against its float64 evaluation on the same rounded inputs, "
        f"tolerance {tol:.2e} relative to the largest entry"
        + ("" if low_rtol is not None else f" (eps {float(jnp.finfo(low).eps):.2e}, reduction size {reduction})")
    )

    def fail(kind_, subjects, exc):
        return [Check(kind_, s, math.inf, math.inf, tol, error=_error_text(exc)) for s in subjects]

    run = jax.jit(vjp_all) if o.jit else vjp_all
    try:
        y_lo, g_lo = run(lo_primals, u_lo)
    except Exception as exc:  # noqa: BLE001
        return fail(f"{label} vjp", prob.names, exc)
    y_ref, g_ref = run(hi_primals, u_hi)

    # Autodiff of the primal in the same dtype: where it is as far off (the
    # point is ill-conditioned in low precision), the rule is not blamed.
    ad_l = prob.lift(rule.fun)

    def ad_vjp_all(p, u):
        y, pull = jax.vjp(ad_l, *p)
        return y, pull(u)

    try:
        y_ad, g_ad = (jax.jit(ad_vjp_all) if o.jit else ad_vjp_all)(lo_primals, u_lo)
    except Exception:  # noqa: BLE001 - no autodiff to compare with: the formula's tolerance alone
        y_ad = g_ad = None

    def tolerance(a, ad, e):
        """``(tol, note)``: the formula's tolerance; where the rule misses it, AD_FACTOR times autodiff's own error."""
        if low_rtol is not None or ad is None or relative_error(a, e)[1] <= tol:
            return tol, ""
        ad_rel = relative_error(ad, e)[1]
        if not math.isfinite(ad_rel) or AD_FACTOR * ad_rel <= tol:
            return tol, ""
        return (
            AD_FACTOR * ad_rel,
            f"ill-conditioned here: autodiff of the primal in {label} is off by "
            f"{ad_rel:.2e} too; tolerance {AD_FACTOR}x that",
        )

    def compare(kind_, name, a, e, ad):
        t, note = tolerance(a, ad, e)
        return _compare(kind_, name, a, e, t, "float64", note=note)

    y_ad_leaves = jax.tree.leaves(y_ad) if y_ad is not None else [None] * len(jax.tree.leaves(y_ref))
    for out, a, e, ad in zip(_output_names(y_ref), jax.tree.leaves(y_lo), jax.tree.leaves(y_ref), y_ad_leaves):
        checks.append(compare(f"{label} forward", out, a, e, ad))
    for leaf_name, a, e, ad in zip(prob.names, g_lo, g_ref, g_ad if g_ad is not None else [None] * len(g_ref)):
        checks.append(compare(f"{label} vjp", leaf_name, a, e, ad))
    if kind == "custom_jvp":

        def pushforward(fn):
            push = lambda p, t: jax.jvp(fn, tuple(p), tuple(t))[1]  # noqa: E731
            return jax.jit(push) if o.jit else push

        push, push_ad = pushforward(f_l), pushforward(ad_l)
        directions = _random_like(rng, hi_primals)
        for j, leaf_name in enumerate(prob.names):
            t_lo = [directions[j].astype(low) if i == j else jnp.zeros_like(p) for i, p in enumerate(lo_primals)]
            t_hi = [t.astype(jnp.float64) for t in t_lo]
            try:
                a = push(lo_primals, t_lo)
            except Exception as exc:  # noqa: BLE001
                checks += fail(f"{label} jvp", [leaf_name], exc)
                continue
            e = push(hi_primals, t_hi)
            try:
                ad = jax.tree.leaves(push_ad(lo_primals, t_lo))
            except Exception:  # noqa: BLE001
                ad = [None] * len(jax.tree.leaves(e))
            tols = [
                tolerance(a_leaf, ad_leaf, e_leaf) if _is_float_array(e_leaf) else (tol, "")
                for a_leaf, ad_leaf, e_leaf in zip(jax.tree.leaves(a), ad, jax.tree.leaves(e))
            ]
            checks.append(_Runner._worst_output(f"{label} jvp", leaf_name, a, e, tol, "float64", tols=tols))
    return checks


#: A low-precision row may be off by up to this many times autodiff of the
#: primal's own error in the same dtype (see :func:`low_precision_tolerance`).
AD_FACTOR = 4
