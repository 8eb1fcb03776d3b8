"""Second order through whole networks: forward-over-reverse (jax.jvp of jax.grad, the usual
Hessian-vector product) and jax.hessian equal the reference's autodiff; plain forward mode
is a clear error that says what works instead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import models, reference, train
from jaxconv.verify import relative_error

SHAPES = {"dd2424_net": (8, 8, 1), "lenet5": (28, 28, 1), "alexnet_small": (32, 32, 3), "resnet_small": (8, 8, 1)}


def _objective(apply, ops):
    def loss(params, x, y):
        return ops.softmax_cross_entropy(apply(params, x, ops=ops), y) + ops.l2_penalty(params, 1e-3)

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
        results.append(jax.jvp(lambda p: grad(p, x, y), (params,), (v,)))
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


X = np.random.default_rng(1).standard_normal((2, 6, 6, 3))
P = np.full((2, 4), 0.25)
OPS = {
    "conv2d": (lambda x: jaxconv.conv2d(x, jnp.ones((3, 3, 3, 2))), X),
    "avg_pool2d": (lambda x: jaxconv.avg_pool2d(x, 2), X),
    "max_pool2d": (lambda x: jaxconv.max_pool2d(x, 2), X),
    "lrn": (lambda x: jaxconv.lrn(x, size=3), X),
    "relu": (jaxconv.relu, X),
    "flatten": (jaxconv.flatten, X),
    "linear": (lambda x: jaxconv.linear(x, jnp.ones((4, 3))), P),
    "softmax": (jaxconv.softmax, P),
    "log_loss": (lambda p: jaxconv.log_loss(p, jnp.array([0, 1])), P),
    "softmax_cross_entropy": (lambda s: jaxconv.softmax_cross_entropy(s, jnp.array([0, 1])), P),
    "l2_penalty": (lambda w: jaxconv.l2_penalty(w, 0.5), P),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_plain_forward_mode_is_a_clear_error(name):
    f, x = OPS[name]
    x = jnp.asarray(x)
    for transform in (lambda: jax.jvp(f, (x,), (x,)), lambda: jax.jacfwd(f)(x)):
        with pytest.raises(TypeError, match=rf"jaxconv.{name}: .*reverse-mode rule.*jax.hessian.*"
                                            rf"jaxconv.reference.{name}"):
            transform()
    jax.jacrev(f)(x)  # reverse mode: the rule


def test_other_type_errors_pass_through_unchanged():
    with pytest.raises(TypeError, match=r"`x` must be an array"):
        jaxconv.relu(None)
