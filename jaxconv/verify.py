"""check_vjp: a float64 checker for hand-written VJP rules, ours and yours.

Given a function ``f`` (typically with a ``jax.custom_vjp`` rule) and a reference
``ref`` computing the same thing with plain ``lax`` (differentiated by autodiff),
:func:`check_vjp` runs four independent checks at the given arguments:

1. ``forward``: ``f(*args)`` equals ``ref(*args)``.
2. ``vjp``: for random cotangents ``u``, every argument's ``vjp_f(u)`` equals
   ``vjp_ref(u)`` (max abs error and relative error, per argument).
3. ``finite-diff``: a central difference in a random direction ``v`` of the
   scalar ``<u, f(x)>`` equals ``<vjp_f(u), v>``.  Reverse mode only, since
   ``custom_vjp`` functions have no forward mode; an oracle independent of ``ref``.
4. ``second-order``: the gradient of the scalar ``<vjp_f(u), r>`` (random ``r``)
   with respect to the arguments equals the same for ``ref``: grad-of-grad
   through the rule.

Only floating-point array arguments are differentiated; integer arrays (labels)
and other Python values are held fixed.  Arrays are cast to ``dtype`` (float64 by
default, with ``jax_enable_x64`` switched on for the duration of the check).

Example::

    report = check_vjp(my_relu, lambda x: jnp.maximum(x, 0), x)
    print(report)          # a table
    report.assert_ok()     # AssertionError naming the argument and the index
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Check", "Report", "check_vjp", "relative_error"]


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: ``kind`` of check, which ``argument``, its errors and verdict."""

    kind: str
    argument: str
    max_abs: float
    rel: float
    tol: float
    where: tuple[int, ...] | None = None

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel)) and self.rel <= self.tol


@dataclasses.dataclass
class Report:
    """All checks of one :func:`check_vjp` call.  ``bool(report)`` is ``report.passed``."""

    name: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

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
            (c.kind, c.argument, f"{c.max_abs:.2e}", f"{c.rel:.2e}", f"{c.tol:.0e}", "yes" if c.passed else "NO")
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [f"check_vjp: {self.name}", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` describing every failed check."""
        if self.passed:
            return
        lines = [f"check_vjp({self.name}) failed:"]
        for c in self.failures:
            where = f" at index {c.where}" if c.where is not None else ""
            lines.append(
                f"  {c.kind}: argument {c.argument}: relative error {c.rel:.3e} > {c.tol:.0e} "
                f"(max abs error {c.max_abs:.3e}{where})"
            )
        lines.append(str(self))
        raise AssertionError("\n".join(lines))


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


def _is_float_array(leaf) -> bool:
    return hasattr(leaf, "dtype") and hasattr(leaf, "shape") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _vdot(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return sum((jnp.vdot(x, y) for x, y in zip(leaves_a, leaves_b)), jnp.zeros((), leaves_a[0].dtype))


def _random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


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
    label = name or getattr(f, "__name__", "f")
    with jax.enable_x64(dtype == jnp.float64 or jax.config.jax_enable_x64):
        return _check(f, ref, args, names, seed, num_cotangents, dtype, rtol, fd_eps, fd_rtol,
                      second_order, finite_differences, jit, label)


def _check(f, ref, args, names, seed, num_cotangents, dtype, rtol, fd_eps, fd_rtol, second_order,
           finite_differences, jit, label) -> Report:
    maybe_jit = jax.jit if jit else (lambda fn: fn)
    arg_names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    leaves, treedef = jax.tree.flatten(args, is_leaf=lambda v: v is None)
    diff_idx = [i for i, leaf in enumerate(leaves) if _is_float_array(leaf)]
    if not diff_idx:
        raise ValueError("check_vjp needs at least one floating-point array argument to differentiate.")
    leaves = [jnp.asarray(l, dtype) if i in diff_idx else l for i, l in enumerate(leaves)]

    # A readable name per differentiated leaf: the argument's name, plus a path
    # inside it when the argument is a pytree.
    leaf_names = []
    for i, path_leaf in enumerate(jax.tree_util.tree_flatten_with_path(args, is_leaf=lambda v: v is None)[0]):
        if i in diff_idx:
            path = path_leaf[0]
            base = arg_names[path[0].idx]
            rest = jax.tree_util.keystr(path[1:])
            leaf_names.append(base + rest)

    def lift(fn):
        def on_leaves(*diff_leaves):
            full = list(leaves)
            for i, v in zip(diff_idx, diff_leaves):
                full[i] = v
            return fn(*treedef.unflatten(full))

        return on_leaves

    f_l, ref_l = lift(f), lift(ref)
    primals = [leaves[i] for i in diff_idx]
    checks: list[Check] = []
    key = jax.random.PRNGKey(seed)

    def vjp_and_output(fn):
        y, _ = jax.vjp(fn, *primals)
        pullback = maybe_jit(lambda p, u: jax.vjp(fn, *p)[1](u))
        return y, lambda u: pullback(primals, u)

    y_f, vjp_f = vjp_and_output(f_l)
    y_r, vjp_r = vjp_and_output(ref_l)
    out_leaves_f, out_leaves_r = jax.tree.leaves(y_f), jax.tree.leaves(y_r)
    if jax.tree.structure(y_f) != jax.tree.structure(y_r):
        raise ValueError(f"`f` and `ref` return different structures: {jax.tree.structure(y_f)} vs {jax.tree.structure(y_r)}.")
    for k, (a, e) in enumerate(zip(out_leaves_f, out_leaves_r)):
        max_abs, rel, where = relative_error(a, e)
        out = "output" if len(out_leaves_f) == 1 else f"output[{k}]"
        checks.append(Check("forward", out, max_abs, rel, rtol, where))

    cotangents = []
    for _ in range(num_cotangents):
        key, sub = jax.random.split(key)
        u = _random_like(sub, y_r)
        cotangents.append(u)
        for leaf_name, a, e in zip(leaf_names, vjp_f(u), vjp_r(u)):
            max_abs, rel, where = relative_error(a, e)
            checks.append(Check("vjp", leaf_name, max_abs, rel, rtol, where))
    u = cotangents[0]

    if finite_differences:
        # A float64 oracle independent of `ref`: d/dt <u, f(x + t v)> at t = 0.
        key, sub = jax.random.split(key)
        directions = _random_like(sub, primals)
        grads = vjp_f(u)
        for j, leaf_name in enumerate(leaf_names):
            v = directions[j]

            @maybe_jit
            def along(t, j=j, v=v):
                moved = list(primals)
                moved[j] = primals[j] + t * v
                return _vdot(u, f_l(*moved))

            fd = (along(fd_eps) - along(-fd_eps)) / (2 * fd_eps)
            analytic = jnp.vdot(grads[j], v)
            err = float(jnp.abs(fd - analytic))
            scale = max(float(jnp.abs(fd)), float(jnp.abs(analytic)), 1e-300)
            checks.append(Check("finite-diff", leaf_name, err, err / scale, fd_rtol))

    if second_order:
        key, sub = jax.random.split(key)
        r = _random_like(sub, primals)

        def second(fn):
            def scalar(*p):
                _, vjp = jax.vjp(fn, *p)
                return _vdot(vjp(u), r)

            return maybe_jit(jax.grad(scalar, argnums=tuple(range(len(primals)))))(*primals)

        for leaf_name, a, e in zip(leaf_names, second(f_l), second(ref_l)):
            max_abs, rel, where = relative_error(a, e)
            checks.append(Check("second-order", leaf_name, max_abs, rel, rtol, where))

    return Report(label, checks)
