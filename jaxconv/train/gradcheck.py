"""``check_model_grads``: every hand rule a network uses, checked against ``jax.grad`` at its real activations.

``python -m jaxconv train --check-grads`` (``Config(check_grads=True)``) runs it
on the first batch before training.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .. import ops
from ..nn import layers as nn
from ..verify import check_vjp
from ..verify.registry import REGISTRY, reference_ops

__all__ = ["check_model_grads"]


class _RecordingOps:
    """An ``ops=`` namespace for :mod:`jaxconv.nn`: runs the op's registered reference and records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name not in REGISTRY:
            raise AttributeError(f"{name}: no reference registered in jaxconv.verify.registry.REGISTRY")
        reference_op = REGISTRY[name].ref

        def op(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return reference_op(*args, **kwargs)

        return op


def _shapes(tree) -> str:
    shapes = [str(tuple(leaf.shape)) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")]
    return " ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} arrays"


def check_model_grads(
    apply_fun: Callable,
    params: Any,
    images: ArrayLike,
    labels: ArrayLike,
    *,
    l2: float = 0.0,
    finite_differences: bool = False,
    stream: TextIO | None = None,
) -> bool:
    """Check every hand rule ``apply_fun`` uses, at this batch's activations, against ``jax.grad``.

    Float64.  The network is run once with :mod:`jaxconv.reference` ops that
    record each call (op, its actual inputs, its options); then, for every
    distinct call (op, input shapes, options), :func:`jaxconv.verify.check_vjp`
    compares the ``jaxconv`` op (looked up at call time, its ``custom_vjp``
    rule) with the reference's autodiff: forward, VJP for two random
    cotangents, grad-of-grad; with ``finite_differences=True`` also central
    differences for the ops without kinks (``OpSpec.smooth``; the others are
    compared with jax.grad of the reference, which shares the convention at a
    kink; off by default: one more float64
    compile per argument, and ``python -m jaxconv verify`` and the tests run
    them on kink-free inputs already).  The loss rules
    (``softmax_cross_entropy`` on the logits, ``l2_penalty`` when ``l2 > 0``)
    are checked too, and finally the whole objective's gradient with respect to
    params and images, jaxconv ops against reference ops.  Prints a table to
    ``stream``; returns whether everything passed.
    """
    reference = reference_ops()
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(np.asarray(images), jnp.float64)
        labels = jnp.asarray(np.asarray(labels), jnp.int32)
        recorder = _RecordingOps()
        # Networks with batch normalisation are checked in training mode, the mode their gradients are taken in.
        mode = {"train": True} if nn.has_state(params64) else {}
        logits = apply_fun(params64, x64, ops=recorder, **mode)
        recorder.softmax_cross_entropy(logits, labels)
        if l2 > 0:
            recorder.l2_penalty(params64, l2)

        rows, passed = [], True
        seen = set()
        for name, args, kwargs in recorder.calls:
            key = (name, _shapes(args), repr(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            arg_names = list(inspect.signature(REGISTRY[name].op).parameters)[: len(args)]
            report = check_vjp(
                lambda *a, _name=name, _kw=kwargs: getattr(ops, _name)(*a, **_kw),
                partial(getattr(reference, name), **kwargs),
                *args,
                names=arg_names,
                finite_differences=finite_differences and REGISTRY[name].smooth,
                name=f"{name} {_shapes(args)}",
            )
            passed &= report.passed
            rows.append((name, _shapes(args), report))

        def objective(ops, loss_ops):
            def loss(p, x, y):
                value = loss_ops.softmax_cross_entropy(apply_fun(p, x, ops=ops, **mode), y)
                return value + loss_ops.l2_penalty(p, l2) if l2 > 0 else value

            return loss

        report = check_vjp(
            objective(None, ops),
            objective(reference, reference),
            params64,
            x64,
            labels,
            names=["params", "images", "labels"],
            finite_differences=False,
            second_order=False,
            name="whole objective",
        )
        passed &= report.passed
        rows.append(("objective", f"{len(jax.tree.leaves(params64))} params, images {tuple(x64.shape)}", report))

    stream = sys.stdout if stream is None else stream
    header = ("rule", "inputs", "vjp rel err", "2nd order", "finite diff", "ok")
    table = [header] + [
        (
            name,
            shapes,
            f"{max(r.worst('vjp'), r.worst('forward')):.1e}",
            f"{r.worst('second-order'):.1e}" if any(c.kind == "second-order" for c in r.checks) else "-",
            f"{r.worst('finite-diff'):.1e}" if any(c.kind == "finite-diff" for c in r.checks) else "-",
            "yes" if r.passed else "NO",
        )
        for name, shapes, r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)), file=stream)
    for _, _, r in rows:
        if not r.passed:
            print(r, file=stream)
    return bool(passed)
