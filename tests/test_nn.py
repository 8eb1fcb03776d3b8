"""jaxconv.nn: shape inference, initialisation, and every layer's VJP against the same layer on jaxconv.reference."""

from __future__ import annotations

from functools import partial

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jaxconv
from jaxconv import nn, reference
from jaxconv.verify import check_vjp

from .strategies import conv_configs, permutation_input

KEY = jax.random.key(0)


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _init(layer, input_shape, key=KEY):
    return layer[0](key, input_shape)


def _apply_pair(layer):
    """The layer on the hand rules and the same layer on the autodiff reference."""
    apply = layer[1]
    return (lambda params, x: apply(params, x)), (lambda params, x: apply(params, x, ops=reference))


# --- shape inference ---------------------------------------------------------------

SHAPE_GRID = [
    (nn.Conv(4, 3), (2, 7, 6, 3)),
    (nn.Conv(6, (3, 2), stride=2, padding="SAME", groups=3), (1, 9, 8, 3)),
    (nn.Conv(2, 3, padding=((2, 0), (1, 3)), dilation=2, bias=False), (2, 6, 5, 1)),
    (nn.Conv(3, 1, stride=(2, 3)), (1, 5, 7, 2)),
    (nn.MaxPool(2), (2, 6, 6, 3)),
    (nn.MaxPool(3, stride=2, padding="SAME"), (1, 8, 7, 2)),
    (nn.MaxPool((2, 3), stride=(1, 2), padding=((1, 0), (0, 1))), (1, 5, 5, 1)),
    (nn.AvgPool(2, padding="SAME"), (2, 5, 5, 2)),
    (nn.AvgPool(3, stride=1, padding=1, count_include_pad=False), (1, 4, 6, 2)),
    (nn.GlobalAvgPool, (3, 5, 4, 6)),
    (nn.LRN(size=3), (2, 3, 3, 5)),
    (nn.Relu, (2, 3, 4, 5)),
    (nn.Flatten, (2, 3, 4, 5)),
    (nn.Dense(7), (3, 11)),
    (nn.residual(nn.Conv(4, 3, padding="SAME"), nn.Relu, nn.Conv(4, 3, padding="SAME")), (2, 5, 5, 4)),
    (nn.residual(nn.Conv(6, 3, stride=2, padding="SAME"), shortcut=nn.Conv(6, 1, stride=2)), (1, 7, 7, 2)),
    (nn.serial(nn.Conv(3, 3), nn.Relu, nn.MaxPool(2), nn.Flatten, nn.Dense(4)), (2, 8, 8, 1)),
    (nn.Conv1D(4, 3, stride=2, padding="SAME"), (2, 9, 3)),
    (nn.Conv3D(2, (2, 3, 1), padding=((1, 0), (0, 2), (1, 1)), dilation=(1, 2, 1)), (1, 4, 6, 3, 2)),
    (nn.ConvTranspose1D(3, 4, stride=2, padding=1), (2, 5, 2)),
    (nn.ConvTranspose2D(4, 3, stride=2, padding=1, output_padding=1, groups=2), (1, 4, 3, 2)),
    (nn.ConvTranspose3D(2, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (1, 3, 3, 2, 3)),
    (nn.MaxPool1D(3, stride=2, padding="SAME"), (2, 7, 2)),
    (nn.AvgPool1D(2, padding=1, count_include_pad=False), (1, 5, 3)),
    (nn.MaxPool3D(2), (1, 4, 5, 4, 2)),
    (nn.AvgPool3D((1, 2, 2), stride=1), (2, 3, 4, 4, 1)),
]


@pytest.mark.parametrize("layer,input_shape", SHAPE_GRID)
def test_declared_output_shape_is_the_real_one(layer, input_shape):
    out_shape, params = _init(layer, input_shape)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(input_shape), jnp.float32)
    assert layer[1](params, x).shape == tuple(out_shape)
    # An unknown batch (-1) is carried through, the rest unchanged.
    unknown, params_again = _init(layer, (-1, *input_shape[1:]))
    assert unknown == (-1, *out_shape[1:])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params_again))


@given(conv_configs(max_channels=4, max_hw=8, max_kernel=4))
def test_conv_shape_inference_hypothesis(config):
    n, h, w, c = config["x_shape"]
    kh, kw, _, o = config["w_shape"]
    layer = nn.Conv(o, (kh, kw), bias=config["bias"], **config["options"])
    out_shape, params = _init(layer, (-1, h, w, c))
    assert params["w"].shape == config["w_shape"]
    assert ("b" in params) == config["bias"]
    y = jax.eval_shape(layer[1], params, jax.ShapeDtypeStruct((n, h, w, c), jnp.float32))
    assert y.shape == (n, *out_shape[1:])


# --- N-d layers: the kernel's (window's) length is the number of spatial dimensions ---------


def _draw_geometry(rng, kind: str, ndim: int):
    """One valid layer and input shape of ``kind`` in ``ndim`` spatial dimensions, every size drawn per dimension."""
    kernel = tuple(int(k) for k in rng.integers(1, 4, ndim))
    stride = tuple(int(s) for s in rng.integers(1, 3, ndim))
    if kind in ("max", "avg"):
        form = rng.integers(4)
        padding = (
            "VALID",
            "SAME",
            tuple(int(rng.integers(0, k // 2 + 1)) for k in kernel),
            tuple((int(rng.integers(0, k // 2 + 1)), int(rng.integers(0, k // 2 + 1))) for k in kernel),
        )[form]
        sizes = tuple(int(k + rng.integers(0, 4)) for k in kernel)
        stride_arg = None if rng.integers(2) else stride
        if kind == "max":
            layer = nn.MaxPool(kernel, stride=stride_arg, padding=padding)
        else:
            layer = nn.AvgPool(kernel, stride=stride_arg, padding=padding, count_include_pad=bool(rng.integers(2)))
        return layer, (2, *sizes, 3), (kernel, stride_arg, padding)
    dilation = tuple(int(d) for d in rng.integers(1, 3, ndim))
    groups = int(rng.choice([1, 2]))
    out_channels = 2 * groups
    if kind == "conv":
        form = rng.integers(4)
        padding = (
            "VALID",
            "SAME",
            tuple(int(p) for p in rng.integers(0, 3, ndim)),
            tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (ndim, 2))),
        )[form]
        sizes = tuple(int(d * (k - 1) + 1 + rng.integers(0, 4)) for k, d in zip(kernel, dilation))
        layer = nn.Conv(
            out_channels,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bool(rng.integers(2)),
        )
        return layer, (2, *sizes, 2 * groups), (kernel, stride, padding, dilation, groups)
    sizes = tuple(int(s) for s in rng.integers(1, 5, ndim))
    output_padding = tuple(int(rng.integers(0, s)) for s in stride)
    # crop at most what the transposed convolution spans, less one: some output is left
    full = [
        (n - 1) * s + d * (k - 1) + 1 + op for n, s, d, k, op in zip(sizes, stride, dilation, kernel, output_padding)
    ]
    padding = (
        "VALID",
        "SAME",
        tuple((int(rng.integers(0, f // 2 + 1)), int(rng.integers(0, (f - 1) // 2 + 1))) for f in full),
    )[rng.integers(3)]
    layer = nn.ConvTranspose(
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    return layer, (2, *sizes, 2 * groups), (kernel, stride, padding, output_padding, dilation, groups)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "max", "avg"])
def test_nd_declared_output_shape_is_the_real_one_over_a_grid(kind, ndim):
    """For drawn geometries of every layer in 1, 2 and 3 dimensions: the shape ``init_fun`` declares is the shape
    the layer's op produces, on the hand rules and on the reference; the params fit the op."""
    rng = np.random.default_rng(100 * ndim + len(kind))
    for _ in range(12):
        layer, input_shape, geometry = _draw_geometry(rng, kind, ndim)
        out_shape, params = _init(layer, (-1, *input_shape[1:]))
        x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
        for ops in (None, reference):
            y = jax.eval_shape(partial(layer[1], ops=ops), params, x)
            assert y.shape == (input_shape[0], *out_shape[1:]), (kind, ndim, input_shape, geometry)
        assert len(out_shape) == ndim + 2


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_nd_layers_run_in_the_kernels_dimensions(ndim):
    """A real forward pass of each N-d layer: the output array has the declared shape."""
    x = jnp.asarray(np.random.default_rng(ndim).standard_normal((2, *(6,) * ndim, 2)), jnp.float32)
    k = (3,) * ndim
    for layer in (
        nn.Conv(4, k, padding="SAME"),
        nn.ConvTranspose(3, k, stride=2, padding=1, output_padding=1),
        nn.MaxPool(k, stride=2),
        nn.AvgPool(k, stride=1, padding=1, count_include_pad=False),
    ):
        out_shape, params = _init(layer, x.shape)
        assert layer[1](params, x).shape == out_shape


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_fixed_dimension_aliases_are_the_nd_layer(ndim):
    """``Conv{N}D(o, k)`` with an int ``k`` is ``Conv(o, (k,) * N)``: same shapes, same params, same output."""
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, *(5,) * ndim, 2)), jnp.float32)
    pairs = [
        (getattr(nn, f"Conv{ndim}D")(3, 2, stride=2, padding=1), nn.Conv(3, (2,) * ndim, stride=2, padding=1)),
        (getattr(nn, f"ConvTranspose{ndim}D")(3, 2, stride=2), nn.ConvTranspose(3, (2,) * ndim, stride=2)),
        (getattr(nn, f"MaxPool{ndim}D")(2, stride=1), nn.MaxPool((2,) * ndim, stride=1)),
        (getattr(nn, f"AvgPool{ndim}D")(3, padding="SAME"), nn.AvgPool((3,) * ndim, padding="SAME")),
    ]
    for alias, layer in pairs:
        (shape_a, params_a), (shape_b, params_b) = _init(alias, x.shape), _init(layer, x.shape)
        assert shape_a == shape_b and len(shape_a) == ndim + 2
        assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params_a, params_b))
        np.testing.assert_array_equal(alias[1](params_a, x), layer[1](params_b, x))


def test_an_int_kernel_or_window_is_2d():
    """The documented convention: an int kernel (window) is 2-D, as the 2-D alias reads it."""
    for layer in (nn.Conv(2, 3), nn.ConvTranspose(2, 3), nn.MaxPool(3), nn.AvgPool(3)):
        out_shape, _ = _init(layer, (-1, 6, 6, 2))
        assert len(out_shape) == 4
        with pytest.raises(ValueError, match=r"`input_shape` \(=\(-1, 6, 2\)\) must be \(N, H, W, C\)"):
            _init(layer, (-1, 6, 2))


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: nn.Conv(2, (3, 3, 3, 3)),
            r"`kernel` \(=\(3, 3, 3, 3\)\) must be an int \(2-D\) or a tuple of 1, 2 or 3",
        ),
        (lambda: nn.Conv(2, ()), r"`kernel` \(=\(\)\)"),
        (lambda: nn.Conv(2, "3"), r"`kernel` \(='3'\)"),
        (lambda: nn.Conv(2, (3,), stride=(1, 2)), r"`stride` \(=\(1, 2\)\)"),
        (lambda: nn.Conv1D(2, (3, 3)), r"`kernel` \(=\(3, 3\)\)"),
        (lambda: nn.Conv3D(2, (3, 3)), r"`kernel` \(=\(3, 3\)\)"),
        (lambda: nn.ConvTranspose(2, (2, 2), stride=2, output_padding=2), r"`output_padding`"),
        (lambda: nn.ConvTranspose(2, (2,), padding="FULL"), r"`padding` \(='FULL'\)"),
        (lambda: nn.Conv(2, 3, precision="ultra"), r"`precision` \(='ultra'\)"),
        (lambda: nn.ConvTranspose(2, (3,), precision=3), r"`precision` \(=3\)"),
        (lambda: nn.Dense(2, precision=("highest",)), r"`precision`"),
        (lambda: nn.ConvTranspose(3, 2, groups=2), r"`groups` \(=2\) must divide `out_channels` \(=3\)"),
        (lambda: nn.MaxPool((2, 2, 2, 2)), r"`window`"),
        (lambda: nn.MaxPool2D((2, 2, 2)), r"`window` \(=\(2, 2, 2\)\)"),
        (lambda: nn.AvgPool((2,), stride=(1, 1)), r"`stride` \(=\(1, 1\)\)"),
        (lambda: nn.AvgPool1D(2, padding=(2,)), r"`padding`.*window"),
    ],
)
def test_bad_nd_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_conv_transpose_that_crops_everything_is_refused_at_init():
    layer = nn.ConvTranspose(2, (3,), padding=((2, 1),))  # an input of 1 spans 3: nothing is left
    with pytest.raises(ValueError, match=r"ConvTranspose1D: `padding`.*crops the whole output"):
        _init(layer, (-1, 1, 2))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv(2, 3, 2),
        lambda: nn.ConvTranspose(2, 3, 2),
        lambda: nn.MaxPool(3, 2),
        lambda: nn.AvgPool(3, 2, "SAME"),
        lambda: nn.MaxPool1D(3, 2),
        lambda: nn.Conv3D(2, 3, 1),
    ],
)
def test_geometry_is_keyword_only(make):
    with pytest.raises(TypeError):
        make()


# --- precision= reaches every product, forward and backward ------------------------------


def _product_precisions(apply, params, x):
    """The ``precision`` of every dot_general / conv_general_dilated in the forward and gradient of a layer."""

    def loss(params, x):
        return jnp.sum(apply(params, x))

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                yield eqn.params["precision"]
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from walk(sub)

    return list(walk(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(params, x).jaxpr))


@pytest.mark.parametrize(
    "make,input_shape",
    [
        (lambda **o: nn.Conv(3, (2,), stride=2, **o), (2, 7, 2)),
        (lambda **o: nn.Conv(4, 3, padding="SAME", groups=2, **o), (1, 5, 5, 2)),
        (lambda **o: nn.Conv3D(2, 2, **o), (1, 3, 4, 3, 2)),
        (lambda **o: nn.ConvTranspose(2, (2, 3), stride=2, padding="SAME", **o), (1, 3, 3, 4)),
        (lambda **o: nn.Dense(3, **o), (4, 5)),
    ],
)
def test_precision_reaches_every_product_forward_and_backward(make, input_shape):
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    x = jnp.ones(input_shape, jnp.float32)
    for precision, expected in (("highest", highest), (jax.lax.Precision.HIGHEST, highest), (None, None)):
        layer = make(precision=precision)
        _, params = _init(layer, input_shape)
        found = _product_precisions(layer[1], params, x)
        assert len(found) >= 3 and all(p == expected for p in found), (precision, found)
    # The reference runs the same precision.
    layer = make(precision="highest")
    _, params = _init(layer, input_shape)
    found = _product_precisions(partial(layer[1], ops=reference), params, x)
    assert found and all(p == highest for p in found), found


def test_no_precision_keyword_for_an_ops_namespace_without_one():
    """A layer built without ``precision`` calls its op as before: an ``ops`` namespace of older signatures runs."""

    class Plain:
        conv2d = staticmethod(
            lambda x, w, b, *, stride, padding, dilation, groups: reference.conv2d(
                x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups
            )
        )
        linear = staticmethod(lambda x, w, b: reference.linear(x, w, b))
        relu = staticmethod(reference.relu)
        flatten = staticmethod(reference.flatten)

    net = nn.serial(nn.Conv(2, 3), nn.Relu, nn.Flatten, nn.Dense(3))
    _, params = _init(net, (2, 5, 5, 1))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 5, 1)), jnp.float32)
    np.testing.assert_allclose(net[1](params, x, ops=Plain()), net[1](params, x), rtol=1e-5, atol=1e-6)


# --- initialisation -----------------------------------------------------------------


def test_he_normal_scale_and_zero_bias():
    _, conv = _init(nn.Conv(64, 5, groups=2), (-1, 8, 8, 32))
    fan_in = 5 * 5 * 16
    assert conv["w"].shape == (5, 5, 16, 64) and conv["w"].dtype == jnp.float32
    assert abs(float(jnp.std(conv["w"])) / np.sqrt(2 / fan_in) - 1) < 0.03
    assert abs(float(jnp.mean(conv["w"]))) < 0.1 * np.sqrt(2 / fan_in)
    assert not jnp.any(conv["b"])
    _, dense = _init(nn.Dense(300), (-1, 200))
    assert dense["w"].shape == (200, 300) and dense["b"].shape == (300,)
    assert abs(float(jnp.std(dense["w"])) / np.sqrt(2 / 200) - 1) < 0.03
    _, zero = _init(nn.Conv(2, 3, w_init=nn.zeros), (-1, 4, 4, 1))
    assert not jnp.any(zero["w"])


def test_init_is_float32_under_x64_and_deterministic():
    assert jax.config.jax_enable_x64  # conftest
    net = nn.serial(nn.Conv(3, 3), nn.Relu, nn.Flatten, nn.Dense(2))
    _, a = _init(net, (-1, 5, 5, 1), jax.random.key(3))
    _, b = _init(net, (-1, 5, 5, 1), jax.random.key(3))
    _, c = _init(net, (-1, 5, 5, 1), jax.random.key(4))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(a))
    assert all(jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not jnp.array_equal(a[0]["w"], c[0]["w"])
    # Each layer gets its own key: the two Dense-free convs of a serial differ.
    _, two = _init(nn.serial(nn.Conv(2, 1), nn.Conv(2, 1)), (-1, 3, 3, 2))
    assert not jnp.array_equal(two[0]["w"], two[1]["w"])
    _, half = _init(nn.Dense(2, dtype=jnp.float64), (-1, 3))
    assert half["w"].dtype == jnp.float64


def test_params_are_plain_pytrees():
    net = nn.serial(nn.Conv(2, 3), nn.Relu, nn.residual(nn.Conv(2, 1)), nn.GlobalAvgPool, nn.Dense(3))
    _, params = _init(net, (-1, 5, 5, 1))
    assert isinstance(params, list) and params[1] == () and set(params[0]) == {"w", "b"}
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert paths == ["[0]['b']", "[0]['w']", "[2][1][0][0]['b']", "[2][1][0][0]['w']", "[4]['b']", "[4]['w']"]


# --- each layer's VJP equals the reference's ------------------------------------------

VJP_GRID = [
    ("conv", nn.Conv(3, 3, stride=2, padding=1), (2, 6, 5, 2)),
    ("conv_groups", nn.Conv(4, (2, 3), dilation=(2, 1), groups=2, padding="SAME"), (1, 5, 6, 4)),
    ("dense", nn.Dense(3), (4, 5)),
    ("relu", nn.Relu, (2, 3, 3, 2)),
    ("max_pool", nn.MaxPool(3, stride=2, padding="SAME"), (2, 5, 5, 2)),
    ("avg_pool", nn.AvgPool(2, stride=1, padding=1, count_include_pad=False), (1, 4, 5, 2)),
    ("global_avg_pool", nn.GlobalAvgPool, (2, 3, 4, 3)),
    ("lrn", nn.LRN(size=3, kappa=1.0, alpha=0.5, beta=0.75), (2, 2, 2, 4)),
    ("flatten", nn.Flatten, (2, 3, 2, 2)),
    ("residual", nn.residual(nn.Conv(2, 3, padding="SAME"), nn.Relu, nn.Conv(2, 1)), (1, 4, 4, 2)),
    (
        "net_1d",
        nn.serial(
            nn.Conv1D(3, 3, padding="SAME"),
            nn.Relu,
            nn.MaxPool1D(2),
            nn.ConvTranspose1D(2, 2, stride=2),
            nn.AvgPool1D(3, stride=1, padding=1),
            nn.Flatten,
            nn.Dense(2),
        ),
        (2, 8, 2),
    ),
    (
        "net_3d",
        nn.serial(
            nn.Conv3D(2, 2, padding=1),
            nn.Relu,
            nn.AvgPool3D(2),
            nn.ConvTranspose3D(2, 2, stride=2),
            nn.MaxPool3D(2, stride=1),
            nn.Flatten,
            nn.Dense(2),
        ),
        (1, 3, 4, 3, 2),
    ),
]


@pytest.mark.parametrize("name,layer,input_shape", VJP_GRID, ids=[g[0] for g in VJP_GRID])
def test_layer_vjp_float64(name, layer, input_shape):
    rng = np.random.default_rng(1)
    _, params = _init(layer, input_shape)
    # Random (nonzero) biases, so their gradients and the reference's differ if the rule is wrong.
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float64), params)
    x = permutation_input(rng, input_shape) * 3  # tie- and zero-free: max pooling and ReLU are smooth here
    f, ref = _apply_pair(layer)
    check_vjp(f, ref, params, x, names=("params", "x"), fd_eps=1e-7).assert_ok()


@pytest.mark.parametrize(
    "name,layer,input_shape", VJP_GRID[:2] + VJP_GRID[4:6], ids=lambda v: v if isinstance(v, str) else ""
)
def test_layer_vjp_float32(name, layer, input_shape):
    rng = np.random.default_rng(2)
    _, params = _init(layer, input_shape)
    x = permutation_input(rng, input_shape, np.float32)
    f, ref = _apply_pair(layer)
    check_vjp(f, ref, params, x, dtype=jnp.float32, finite_differences=False, second_order=False).assert_ok()


def _small_net():
    return nn.serial(
        nn.Conv(4, 3, padding="SAME"),
        nn.Relu,
        nn.LRN(size=3, kappa=1.0, alpha=0.1),
        nn.MaxPool(2),
        nn.residual(nn.Conv(4, 3, padding="SAME"), nn.Relu),
        nn.AvgPool(2, padding="SAME"),
        nn.Flatten,
        nn.Dense(3),
    )


def test_network_vjp_float64_and_eager():
    net = _small_net()
    rng = np.random.default_rng(3)
    _, params = _init(net, (-1, 6, 6, 2))
    x = permutation_input(rng, (2, 6, 6, 2)) * 4
    f, ref = _apply_pair(net)
    check_vjp(f, ref, _f64(params), x, names=("params", "x")).assert_ok()
    # Eagerly (op by op), without the compile-heavy second order.
    check_vjp(f, ref, _f64(params), x, jit=False, second_order=False, finite_differences=False).assert_ok()


def test_network_per_example_gradients_under_vmap():
    net = _small_net()
    _, params = _init(net, (-1, 6, 6, 2))
    params = _f64(params)
    x = jnp.asarray(permutation_input(np.random.default_rng(4), (3, 6, 6, 2)))

    def per_example(apply):
        loss = lambda p, xi: jnp.sum(jnp.sin(apply(p, xi[None])))  # noqa: E731
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)

    hand = per_example(net[1])
    ref = per_example(partial(net[1], ops=reference))
    for a, e in zip(jax.tree.leaves(hand), jax.tree.leaves(ref)):
        assert a.shape[0] == 3
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-13)


def test_apply_runs_the_hand_rules():
    """Every op of a network goes through the `ops` namespace: a namespace that
    counts calls and forwards to the hand rules gives the same output."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(jaxconv, name)

    net = _small_net()
    _, params = _init(net, (-1, 6, 6, 2))
    x = jnp.ones((1, 6, 6, 2), jnp.float32)
    np.testing.assert_array_equal(net[1](params, x, ops=Counting()), net[1](params, x))
    assert calls == ["conv2d", "relu", "lrn", "max_pool2d", "conv2d", "relu", "avg_pool2d", "flatten", "linear"]


def test_a_wrong_rule_is_caught():
    """A network-level check fails when one layer's backward is wrong."""

    @jax.custom_vjp
    def bad_relu(x):
        return jnp.maximum(x, 0)

    bad_relu.defvjp(lambda x: (bad_relu(x), x), lambda x, g: (g * (x > 0) * 1.01,))

    class Planted:
        def __getattr__(self, name):
            return bad_relu if name == "relu" else getattr(jaxconv, name)

    net = _small_net()
    _, params = _init(net, (-1, 6, 6, 2))
    x = permutation_input(np.random.default_rng(5), (1, 6, 6, 2))
    report = check_vjp(
        partial(net[1], ops=Planted()),
        partial(net[1], ops=reference),
        _f64(params),
        x,
        finite_differences=False,
        second_order=False,
    )
    with pytest.raises(AssertionError):
        report.assert_ok()


# --- bad arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,input_shape,match",
    [
        (lambda: nn.Conv(4, 3), (2, 8, 8), r"Conv: `input_shape` \(=\(2, 8, 8\)\)"),
        (lambda: nn.Conv(4, 3), (2, 8, 0, 1), r"`input_shape` \(=\(2, 8, 0, 1\)\)"),
        (lambda: nn.Conv(4, 3, groups=2), (-1, 8, 8, 3), r"input channels \(=3\).*`groups` \(=2\)"),
        (lambda: nn.Conv(4, 5), (-1, 3, 8, 1), r"kernel"),
        (lambda: nn.Dense(4), (-1, 8, 8, 1), r"Dense: `input_shape`"),
        (lambda: nn.MaxPool(4), (-1, 3, 3, 1), r"window"),
        (lambda: nn.GlobalAvgPool, (-1, 3), r"GlobalAvgPool: `input_shape`"),
        (
            lambda: nn.serial(nn.FanOut(2), nn.parallel(nn.Conv(2, 1), nn.Conv(3, 1)), nn.FanInSum),
            (-1, 3, 3, 1),
            r"FanInSum: the branches' shapes differ",
        ),
        (lambda: nn.parallel(nn.Relu, nn.Relu), (-1, 3), r"parallel: `input_shape`"),
    ],
)
def test_bad_input_shape(make, input_shape, match):
    with pytest.raises(ValueError, match=match):
        make()[0](KEY, input_shape)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: nn.Conv(0, 3), r"`out_channels` \(=0\)"),
        (lambda: nn.Conv(4, 0), r"`kernel` \(=0\)"),
        (lambda: nn.Conv(4, 3, stride=0), r"`stride` \(=0\)"),
        (lambda: nn.Conv(4, 3, padding="FULL"), r"`padding`"),
        (lambda: nn.Conv(5, 3, groups=2), r"`groups` \(=2\) must divide `out_channels` \(=5\)"),
        (lambda: nn.Conv(4, 3, dtype=jnp.int32), r"`dtype` \(=int32\)"),
        (lambda: nn.Dense(2.5), r"`out_dim` \(=2.5\)"),
        (lambda: nn.MaxPool(2, padding=-1), r"`padding`"),
        (lambda: nn.MaxPool(2, padding=3), r"`padding`.*window"),  # a window of padding only: refused when built
        (lambda: nn.AvgPool((2, 0)), r"`window`"),
        (lambda: nn.LRN(size=0), r"`size`"),
        (lambda: nn.LRN(alpha=-1.0), r"`alpha`"),
        (lambda: nn.FanOut(0), r"`num` \(=0\)"),
        (lambda: nn.serial(), r"serial: needs at least one layer"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_apply_with_wrong_params_structure():
    net = nn.serial(nn.Relu, nn.Flatten)
    with pytest.raises(ValueError, match=r"serial: got 1 param entries for 2 layers"):
        net[1]([()], jnp.ones((1, 2)))
