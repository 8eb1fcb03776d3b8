"""jaxconv.lax in real frameworks: a Flax linen CNN, a Flax NNX CNN and an Equinox CNN with the one-line change.

For each: the parameter gradients in float64 equal the untouched model's
(<= 1e-12), one jitted optax SGD step runs, and the loss's jaxpr calls
jaxconv's rules (``custom_vjp_call``).  The Equinox pattern (a wrapper module
swapped in for ``eqx.nn.Conv``) is the one docs/interop.md shows; jaxconv itself
imports neither Flax nor Equinox.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxconv

F64 = jnp.float64


def _data(n=4, size=8, channels=3, classes=5):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, size, size, channels)), rng.integers(0, classes, n)


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_trees_close(a, b, tol=1e-12):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for u, v in zip(leaves_a, leaves_b):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape
        assert np.max(np.abs(u - v)) <= tol * max(np.max(np.abs(v)), 1e-30)


# --- Flax linen -------------------------------------------------------------------------------


class LinenCNN(nn.Module):
    """Conv (SAME) - relu - max pool - grouped strided conv - avg pool - dense; ``jaxconv=True`` is the one-line
    change: ``conv_general_dilated=jaxconv.lax.conv_general_dilated`` and jaxconv's pools."""

    jaxconv: bool = False

    @nn.compact
    def __call__(self, x):
        conv = dict(conv_general_dilated=jaxconv.lax.conv_general_dilated) if self.jaxconv else {}
        max_pool = jaxconv.lax.max_pool if self.jaxconv else nn.max_pool
        avg_pool = jaxconv.lax.avg_pool if self.jaxconv else nn.avg_pool
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", param_dtype=F64, **conv)(x))
        x = max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(
            nn.Conv(
                6,
                (3, 3),
                strides=(1, 1),
                kernel_dilation=(1, 1),
                feature_group_count=2,
                padding=((1, 0), (0, 1)),
                param_dtype=F64,
                **conv,
            )(x)
        )
        x = avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(5, param_dtype=F64)(x.reshape(x.shape[0], -1))


def test_flax_linen():
    x, labels = _data()
    params = LinenCNN().init(jax.random.key(0), x)
    grads = {}
    for flag in (False, True):

        def loss(p, flag=flag):
            return _xent(LinenCNN(jaxconv=flag).apply(p, x), labels)

        grads[flag] = jax.jit(jax.grad(loss))(params)
    _assert_trees_close(grads[True], grads[False])
    ours = lambda p: _xent(LinenCNN(jaxconv=True).apply(p, x), labels)  # noqa: E731
    assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(params))

    tx = optax.sgd(0.1)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(ours)(p)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, value

    new, _, value = step(params, tx.init(params))
    assert np.isfinite(value) and ours(new) < value


# --- Flax NNX ---------------------------------------------------------------------------------


class NNXCNN(nnx.Module):
    def __init__(self, use_jaxconv: bool, rngs: nnx.Rngs):
        conv = dict(conv_general_dilated=jaxconv.lax.conv_general_dilated) if use_jaxconv else {}
        self.max_pool = jaxconv.lax.max_pool if use_jaxconv else nn.max_pool
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding="SAME", param_dtype=F64, rngs=rngs, **conv)
        self.conv2 = nnx.Conv(
            4,
            6,
            (3, 3),
            strides=(2, 1),
            feature_group_count=2,
            padding="SAME_LOWER",
            param_dtype=F64,
            rngs=rngs,
            **conv,
        )
        self.dense = nnx.Linear(6 * 2 * 4, 5, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        x = self.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.dense(x.reshape(x.shape[0], -1))


def test_flax_nnx():
    x, labels = _data()
    models = {flag: NNXCNN(flag, nnx.Rngs(0)) for flag in (False, True)}
    _assert_trees_close(nnx.state(models[True], nnx.Param), nnx.state(models[False], nnx.Param), tol=0)

    def loss(model):
        return _xent(model(x), labels)

    grads = {flag: nnx.state(nnx.grad(loss)(model), nnx.Param) for flag, model in models.items()}
    _assert_trees_close(grads[True], grads[False])
    graphdef, params = nnx.split(models[True])
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: loss(nnx.merge(graphdef, p)))(params))

    model = models[True]
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        value, g = nnx.value_and_grad(loss)(model)
        optimizer.update(model, g)
        return value

    value = step(model, optimizer)
    assert np.isfinite(value) and loss(model) < value


# --- Equinox ----------------------------------------------------------------------------------


class JaxconvConv(eqx.Module):
    """An ``eqx.nn.Conv`` (any dimension) run by ``jaxconv.lax.conv_general_dilated``: same parameters, same call."""

    conv: eqx.nn.Conv

    def __call__(self, x, *, key=None):
        c = self.conv
        padding = c.padding
        if c.padding_mode != "ZEROS":
            x, padding = c._nonzero_pad(x), "VALID"
        y = jaxconv.lax.conv_general_dilated(
            x[None], c.weight, c.stride, padding, rhs_dilation=c.dilation, feature_group_count=c.groups
        )[0]
        return y + c.bias if c.use_bias else y


def use_jaxconv(model):
    """Every ``eqx.nn.Conv`` in ``model`` wrapped in :class:`JaxconvConv` (the parameters are shared, not copied)."""
    is_conv = lambda m: isinstance(m, eqx.nn.Conv)  # noqa: E731
    return jax.tree.map(lambda m: JaxconvConv(m) if is_conv(m) else m, model, is_leaf=is_conv)


class EqxCNN(eqx.Module):
    layers: list

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1),
            jax.nn.relu,
            eqx.nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=((1, 0), (0, 1)), key=k2),
            jax.nn.relu,
            eqx.nn.Conv2d(6, 6, 3, padding=1, padding_mode="REFLECT", dilation=1, key=k3),
        ]

    def __call__(self, x):  # one image, channels first (Equinox's convention)
        for layer in self.layers:
            x = layer(x)
        return x.mean(axis=(1, 2))[:5]


def test_equinox():
    x, labels = _data()
    x = np.moveaxis(x, -1, 1)  # NCHW
    model = jax.tree.map(lambda a: a.astype(F64) if eqx.is_inexact_array(a) else a, EqxCNN(jax.random.key(0)))
    ours = use_jaxconv(model)
    assert (
        sum(isinstance(m, JaxconvConv) for m in jax.tree.leaves(ours, is_leaf=lambda m: isinstance(m, JaxconvConv)))
        == 3
    )

    def loss(m):
        return _xent(jax.vmap(m)(x), labels)

    grads = {name: eqx.filter_jit(eqx.filter_grad(loss))(m) for name, m in (("lax", model), ("jaxconv", ours))}
    # The same parameters in the same order: the wrapper only adds a level to the tree.
    _assert_trees_close(eqx.filter(grads["jaxconv"], eqx.is_array), eqx.filter(grads["lax"], eqx.is_array))
    params, static = eqx.partition(ours, eqx.is_array)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: loss(eqx.combine(p, static)))(params))

    tx = optax.sgd(0.1)

    @eqx.filter_jit
    def step(m, state):
        value, g = eqx.filter_value_and_grad(loss)(m)
        updates, state = tx.update(g, state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), state, value

    new, _, value = step(ours, tx.init(eqx.filter(ours, eqx.is_array)))
    assert np.isfinite(value) and loss(new) < value


@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_the_package_imports_neither_framework(framework):
    """jaxconv (every module) must not import Flax or Equinox: they are test and benchmark dependencies only."""
    import subprocess
    import sys

    code = (
        "import sys, jaxconv, jaxconv.lax, jaxconv.verify.registry, jaxconv.nn, jaxconv.train; "
        f"print(any(m == '{framework}' or m.startswith('{framework}.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
