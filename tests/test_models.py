"""jaxconv.nn.models: shapes on 8x8x1, 28x28x1 and 32x32x3, the layers each model really uses, and its VJP
against the reference."""

from __future__ import annotations

import inspect
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import reference
from jaxconv.nn import models
from jaxconv.verify import check_vjp

from .strategies import permutation_input

INPUTS = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_every_public_model_is_registered_under_its_own_name():
    """MODELS (what ``--model`` offers) holds every public function of jaxconv.nn.models, found by
    introspection, each under its ``__name__``, and each builds a classifier of ``num_classes`` outputs."""
    helpers = {"check_input_shape", "min_input_size"}  # the input sizes the models take, not models
    public = {
        name
        for name, f in inspect.getmembers(models, callable)
        if getattr(f, "__module__", None) == models.__name__ and not name.startswith("_") and not isinstance(f, type)
    }
    assert helpers <= public and helpers <= set(models.__all__)
    assert set(models.MODELS) == public - helpers
    for name, constructor in models.MODELS.items():
        assert constructor.__name__ == name and name in models.__all__
        init, _ = constructor(num_classes=3)
        assert init(jax.random.key(0), (-1, 8, 8, 1))[0] == (-1, 3), name


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("image_shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
def test_output_shape_on_every_image_size(name, image_shape):
    init, apply = models.MODELS[name](num_classes=7)
    out_shape, params = init(jax.random.key(0), (-1, *image_shape))
    assert out_shape == (-1, 7)
    logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((5, *image_shape), jnp.float32))
    assert logits.shape == (5, 7) and logits.dtype == jnp.float32


@pytest.mark.parametrize("w,h,c,f,n_f,classes", [(8, 8, 1, 3, 16, 10), (32, 32, 3, 5, 3, 10), (28, 28, 1, 4, 2, 4)])
def test_dd2424_net_is_conv_relu_dense_with_these_shapes(w, h, c, f, n_f, classes):
    """F_i f x f x C with scalar b_i; S, H (w-f+1)(h-f+1) n_F; W C x (w-f+1)(h-f+1) n_F; b C."""
    init, apply = models.dd2424_net(classes, num_filters=n_f, filter_size=f)
    _, params = init(jax.random.key(0), (-1, h, w, c))
    conv, relu, flat, dense = params
    assert conv["w"].shape == (f, f, c, n_f) and conv["b"].shape == (n_f,)
    assert relu == () and flat == ()
    assert dense["w"].shape == ((w - f + 1) * (h - f + 1) * n_f, classes) and dense["b"].shape == (classes,)
    # And it computes s = W vec(max(0, X * F + b)) + b, vec row-major.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, h, w, c)), jnp.float32)
    params = jax.tree.map(lambda a: a + 0.1, params)  # nonzero biases
    conv, _, _, dense = params
    hidden = jnp.maximum(reference.conv2d(x, conv["w"], conv["b"]), 0)
    expected = hidden.reshape(2, -1) @ dense["w"] + dense["b"]
    np.testing.assert_allclose(apply(params, x), expected, rtol=1e-5, atol=1e-5)


def _op_calls(name):
    calls = []

    class Counting:
        def __getattr__(self, op):
            calls.append(op)
            return getattr(jaxconv, op)

    init, apply = models.MODELS[name]()
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    x = jnp.ones((1, 8, 8, 1), jnp.float32)
    np.testing.assert_array_equal(apply(params, x, ops=Counting()), apply(params, x))
    return calls


def test_each_model_uses_the_layers_it_names():
    assert _op_calls("dd2424_net") == ["conv2d", "relu", "flatten", "linear"]
    lenet = _op_calls("lenet5")
    assert lenet.count("conv2d") == 2 and lenet.count("avg_pool2d") == 2 and lenet.count("linear") == 3
    alexnet = _op_calls("alexnet_small")
    assert alexnet.count("lrn") == 2 and alexnet.count("max_pool2d") == 3 and alexnet.count("conv2d") == 4
    assert alexnet.index("lrn") == alexnet.index("relu") + 1  # conv, ReLU, LRN, pool: AlexNet's order
    resnet = _op_calls("resnet_small")
    # Stem, 2 in the identity block, 2 + a 1x1 projection in each of the two strided blocks.
    assert resnet.count("conv2d") == 1 + 2 + 3 + 3
    assert resnet[-3:] == ["avg_pool2d", "flatten", "linear"]  # the global-average-pool head


def test_resnet_blocks_start_as_identity_plus_shortcut():
    """The last BN of each branch starts with scale 0 (without BN: the last conv starts at 0)."""
    init, apply = models.resnet_small()
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    for block in params[3:6]:  # serial(residual(...), Relu) per stage, after conv, BN, ReLU
        main = block[0][1][0]  # conv, BN, ReLU, conv, BN
        assert not jnp.any(main[4]["scale"]) and jnp.all(main[1]["scale"] == 1) and jnp.any(main[3]["w"])
    init, apply = models.resnet_small_nobn()
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    for block in params[2:5]:
        main = block[0][1][0]  # conv, ReLU, conv
        assert not jnp.any(main[2]["w"]) and jnp.any(main[0]["w"])


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_model_vjp_float64(name):
    """The whole model's gradient (params and image) equals autodiff of the same model on jaxconv.reference."""
    init, apply = models.MODELS[name](num_classes=3)
    _, params = init(jax.random.key(1), (-1, 8, 8, 1))
    rng = np.random.default_rng(0)
    # Nonzero everywhere (the zero-initialised residual convs too), so every rule sees a real gradient.
    params = jax.tree.map(lambda a: jnp.asarray(a + 0.05 * rng.standard_normal(a.shape), jnp.float64), params)
    x = permutation_input(rng, (2, 8, 8, 1)) * 3
    smooth = name == "dd2424_net"  # no pooling: finite differences are safe at tie-free inputs
    check_vjp(
        apply,
        partial(apply, ops=reference),
        params,
        x,
        names=("params", "x"),
        finite_differences=smooth,
        second_order=smooth,
    ).assert_ok()


def test_model_vjp_float32():
    init, apply = models.lenet5(num_classes=4)
    _, params = init(jax.random.key(2), (-1, 8, 8, 1))
    x = permutation_input(np.random.default_rng(1), (2, 8, 8, 1), np.float32)
    check_vjp(
        apply, partial(apply, ops=reference), params, x, dtype=jnp.float32, finite_differences=False, second_order=False
    ).assert_ok()


@pytest.mark.parametrize("bad", [0, -1, 2.0, "10"])
def test_bad_num_classes(bad):
    for constructor in models.MODELS.values():
        with pytest.raises(ValueError, match=r"`num_classes` \(="):
            constructor(bad)
