"""Second order through whole networks: forward-over-reverse (jax.jvp of jax.grad, the usual
Hessian-vector product) and jax.hessian equal the reference's autodiff; plain forward mode
is a clear error that says what works instead."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import nn, reference, train
from jaxconv.nn import models
from jaxconv.verify import relative_error
from jaxconv.verify.registry import REGISTRY

SHAPES = {
    "dd2424_net": (8, 8, 1),
    "lenet5": (28, 28, 1),
    "alexnet_small": (32, 32, 3),
    "resnet_small": (8, 8, 1),
    "resnet_small_nobn": (8, 8, 1),
}


def _objective(apply, ops):
    def loss(params, x, y):
        # Networks with batch normalisation in training mode: through batch_norm's own rule.
        mode = {"train": True} if nn.has_state(params) else {}
        return ops.softmax_cross_entropy(apply(params, x, ops=ops, **mode), y) + ops.l2_penalty(params, 1e-3)

    return loss


def _setup(name, batch=2, seed=0):
    init, apply = models.MODELS[name](10)
    _, params = train.init_params(init, (batch, *SHAPES[name]), seed=seed)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, *SHAPES[name])))
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    return apply, params, x, y, rng


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_hessian_vector_product_of_every_model_equals_the_reference(name):
    apply, params, x, y, rng = _setup(name)
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    results = []
    for ops in (jaxconv, reference):
        grad = jax.grad(_objective(apply, ops))
        # jit: one compiled program instead of thousands of op-by-op dispatches (eager second order is
        # covered per op by the conformance harness).
        results.append(jax.jit(lambda p, v, grad=grad: jax.jvp(lambda q: grad(q, x, y), (p,), (v,)))(params, v))
    (g, hv), (g_ref, hv_ref) = results
    for a, b in zip(jax.tree.leaves((g, hv)), jax.tree.leaves((g_ref, hv_ref))):
        assert relative_error(a, b)[1] <= 1e-11


def test_hessian_with_respect_to_the_input_equals_the_reference():
    apply, params, x, y, _ = _setup("dd2424_net", batch=1)
    hessians = [jax.hessian(_objective(apply, ops), argnums=1)(params, x, y) for ops in (jaxconv, reference)]
    assert hessians[0].shape == (1, 8, 8, 1, 1, 8, 8, 1)
    assert relative_error(*hessians)[1] <= 1e-11
    flat = np.asarray(hessians[0]).reshape(64, 64)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)  # a Hessian is symmetric


def _first_arg_function(name, seed=0):
    """The op of registry entry ``name`` on its first grid configuration, as a function of its
    first argument (the others fixed)."""
    spec = REGISTRY[name]
    case = spec.make(np.random.default_rng([seed, 1]), spec.grid[0])
    first, *rest = case.args
    return (lambda a: case.f(a, *rest)), jax.tree.map(jnp.asarray, first)


OPS = sorted(REGISTRY)


def _nd_net(ndim):
    """A network through every N-d op: conv, max pool, transposed conv, average pool."""
    return nn.serial(
        getattr(nn, f"Conv{ndim}D")(3, 2, padding="SAME"),
        nn.Relu,
        getattr(nn, f"MaxPool{ndim}D")(2),
        getattr(nn, f"ConvTranspose{ndim}D")(2, 2, stride=2),
        getattr(nn, f"AvgPool{ndim}D")(2, stride=1, padding=1),
        nn.Flatten,
        nn.Dense(3),
    )


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_hessian_vector_product_through_the_nd_ops_equals_the_reference(ndim):
    init, apply = _nd_net(ndim)
    shape = {1: (2, 8, 2), 2: (2, 6, 6, 2), 3: (1, 4, 4, 4, 1)}[ndim]
    _, params = init(jax.random.key(ndim), shape)
    rng = np.random.default_rng(ndim)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    x = jnp.asarray(rng.standard_normal(shape))
    y = jnp.asarray(rng.integers(0, 3, shape[0]), jnp.int32)
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), (params, x))
    results = []
    for ops in (jaxconv, reference):
        grad = jax.grad(_objective(apply, ops), argnums=(0, 1))
        results.append(jax.jit(lambda p, x, v, grad=grad: jax.jvp(lambda q, z: grad(q, z, y), (p, x), v))(params, x, v))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        assert relative_error(a, b)[1] <= 1e-11


@pytest.mark.parametrize("name", [n for n in OPS if n != "l2_penalty"])  # l2_penalty takes a pytree, no batch
def test_every_op_exports_with_a_symbolic_batch(name):
    """jax.export of the op and of its gradient with the leading (batch) dimension symbolic: the
    planner picks the forms that need no size, and the exported program equals the op."""
    case = REGISTRY[name].make(np.random.default_rng([0, 1]), REGISTRY[name].grid[0])
    # The losses' labels share the batch; every other argument (kernels, weights) is fixed-size.
    batched = (0, 1) if name in ("log_loss", "softmax_cross_entropy") else (0,)
    args = [jnp.asarray(a) for a in case.args[: len(batched)]]
    rest = case.args[len(batched) :]
    (b,) = jax.export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype) for a in args]

    def f(*a):
        return case.f(*a, *rest)

    def grad(*a):
        return jax.grad(lambda a0, *more: jnp.sum(jnp.sin(f(a0, *more))))(*a)

    for fn in (f, grad):
        exported = jax.export.export(jax.jit(fn))(*specs)
        np.testing.assert_allclose(np.asarray(exported.call(*args)), np.asarray(fn(*args)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPS))
def test_plain_forward_mode_is_a_clear_error(name):
    f, x = _first_arg_function(name)
    for transform in (lambda: jax.jvp(f, (x,), (x,)), lambda: jax.jacfwd(f)(x)):
        short = name.removeprefix("lax.")
        instead = (
            f"jax.lax.{short}"
            if name.startswith("lax.conv")
            else f"jaxconv.reference.flax_{short}"
            if name.startswith("lax.")
            else f"jaxconv.reference.{name}"
        )
        with pytest.raises(
            TypeError,
            match=rf"jaxconv\.{re.escape(name)}: .*reverse-mode rule.*jax.hessian.*"
            rf"{re.escape(instead)}",
        ):
            transform()
    jax.jacrev(f)(x)  # reverse mode: the rule


def test_other_type_errors_pass_through_unchanged():
    with pytest.raises(TypeError, match=r"`x` must be an array"):
        jaxconv.relu(None)
