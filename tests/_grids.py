"""The convolution configurations and helpers every conv test builds its cases from.

:data:`CONV2D_GRID` is the conformance registry's conv2d grid
(``jaxconv.verify.registry``), as ``(x shape, w shape, options)``: the one grid
of 2-D convolutions, which tests/test_conformance.py checks in full,
tests/test_conv.py runs under every backward form and tests/test_conv_strategies.py
cuts into batch blocks.  A configuration added there is tested everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv
from jaxconv import plan, reference
from jaxconv.verify.registry import REGISTRY

CONV2D_GRID = [(config["x_shape"], config["w_shape"], config["options"]) for config in REGISTRY["conv2d"].grid]


def conv_pair(options, ndim=2):
    """``(x, w, b) -> conv{ndim}d(x, w, b, **options)``: the op and its plain-lax reference."""
    op, ref = getattr(jaxconv, f"conv{ndim}d"), getattr(reference, f"conv{ndim}d")

    def f(x, w, b):
        return op(x, w, b, **options)

    def g(x, w, b):
        return ref(x, w, b, **options)

    return f, g


def conv_arrays(rng, x_shape, w_shape, bias=True, dtype=np.float64):
    """Standard normal ``x``, ``w`` and (if ``bias``) ``b`` of ``w``'s output channels, else ``None``."""
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[-1]).astype(dtype) if bias else None
    return x, w, b


def float32_errors(op, ref, x, w, g, forms, **options):
    """Normwise relative error of (y, dx, dw) of ``op`` in float32 under ``forms`` (``jaxconv.plan.forms``
    arguments), against ``ref`` in float64."""
    with plan.forms(**forms):
        run = jax.jit(lambda x, w, g: (lambda yp: (yp[0], *yp[1](g)))(jax.vjp(lambda x, w: op(x, w, **options), x, w)))
        low = run(*(np.asarray(a, np.float32) for a in (x, w, g)))
    exact_y, pullback = jax.vjp(lambda x, w: ref(x, w, **options), jnp.asarray(x), jnp.asarray(w))
    exact = (exact_y, *pullback(jnp.asarray(g)))
    return [
        float(np.linalg.norm(np.asarray(b, np.float64) - np.asarray(a)) / np.linalg.norm(np.asarray(a)))
        for a, b in zip(exact, low)
    ]
