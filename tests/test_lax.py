"""jaxconv.lax: the drop-ins against jax.lax's own ops (and Flax's pools) on values, gradients, signatures, errors.

(The conformance harness, tests/test_conformance.py, runs the float64 VJP, finite
differences, grad-of-grad, jit and vmap checks on the registered grids; here:
values and first and second derivatives over hypothesis-drawn layouts, paddings,
strides, dilations and groups; that the hand rules run; dtypes, precision,
sharding; signatures; errors.)
"""

from __future__ import annotations

import inspect

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import jaxconv
from jaxconv import reference
from jaxconv.verify.registry import REGISTRY

DROP_INS = {"conv_general_dilated": lax.conv_general_dilated, "conv_transpose": lax.conv_transpose}
POOLS = {"max_pool": flax.linen.max_pool, "avg_pool": flax.linen.avg_pool}


def _max_rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _derivatives(fn, args):
    """The value, the gradient of a nonlinear scalar loss, and the gradient of (gradient . v): first and second
    order; one jitted program (op by op, each primitive would compile alone)."""
    rng = np.random.default_rng(5)
    shape = jax.eval_shape(fn, *args).shape
    r = rng.standard_normal(shape)
    vs = [rng.standard_normal(np.shape(a)) for a in args]
    argnums = tuple(range(len(args)))

    def loss(*a):
        return jnp.sum(jnp.sin(fn(*a)) * r)

    def directional(*a):
        return sum(jnp.sum(gi * v) for gi, v in zip(jax.grad(loss, argnums)(*a), vs))

    @jax.jit
    def run(*a):
        return fn(*a), jax.grad(loss, argnums)(*a), jax.grad(directional, argnums)(*a)

    return run(*args)


def _assert_same_as_lax(name, config, tol=1e-12):
    ours, theirs = getattr(jaxconv.lax, name), DROP_INS[name]
    options = config["options"]
    rng = np.random.default_rng(1)
    args = (rng.standard_normal(config["lhs_shape"]), rng.standard_normal(config["rhs_shape"]))
    y, g, h = _derivatives(lambda a, b: ours(a, b, **options), args)
    y_ref, g_ref, h_ref = _derivatives(lambda a, b: theirs(a, b, **options), args)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _max_rel(y, y_ref) <= tol, (config, "value")
    for what, a, b in [("grad", g, g_ref), ("second order", h, h_ref)]:
        for arg, u, v in zip(("lhs", "rhs"), a, b):
            assert _max_rel(u, v) <= tol, (config, what, arg, _max_rel(u, v))


@pytest.mark.parametrize("name", sorted(DROP_INS))
@settings(max_examples=4)
@given(data=st.data())
def test_float64_values_and_derivatives_equal_lax(name, data):
    config = data.draw(REGISTRY[f"lax.{name}"].strategy(), label="config")
    _assert_same_as_lax(name, config)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DROP_INS))
@settings(max_examples=40)
@given(data=st.data())
def test_float64_values_and_derivatives_equal_lax_sweep(name, data):
    config = data.draw(REGISTRY[f"lax.{name}"].strategy(), label="config")
    _assert_same_as_lax(name, config)


@pytest.mark.parametrize("name", sorted(DROP_INS))
@pytest.mark.parametrize("index", range(4))
def test_grid_float64_and_float32(name, index):
    """Every registered configuration in float64 (<= 1e-12, first and second order) and float32 (values within
    the forms' float32 error: a few ulps of the sum of |products|)."""
    config = REGISTRY[f"lax.{name}"].grid[index]
    _assert_same_as_lax(name, config)
    rng = np.random.default_rng(2)
    lhs = rng.standard_normal(config["lhs_shape"]).astype(np.float32)
    rhs = rng.standard_normal(config["rhs_shape"]).astype(np.float32)
    ours = getattr(jaxconv.lax, name)(lhs, rhs, **config["options"])
    exact = DROP_INS[name](lhs.astype(np.float64), rhs.astype(np.float64), **config["options"])
    scale = DROP_INS[name](np.abs(lhs).astype(np.float64), np.abs(rhs).astype(np.float64), **config["options"])
    assert ours.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(ours, np.float64) - np.asarray(exact)) <= 1e-5 * np.asarray(scale) + 1e-6)


@pytest.mark.parametrize(
    "layout,padding",
    [
        (None, "SAME"),
        (("NCHW", "OIHW", "NCHW"), ((2, -1), (-1, 3))),
        (("NHWC", "HWIO", "NHWC"), "SAME_LOWER"),
        (("NHWC", "OIHW", "NCHW"), "VALID"),
        (("CHWN", "IOHW", "WHNC"), "SAME"),
    ],
)
def test_layouts_and_paddings(layout, padding):
    specs = layout or ("NCHW", "OIHW", "NCHW")
    sizes = dict(N=2, C=4, H=7, W=6)
    lhs_shape = tuple(sizes[a] for a in specs[0])
    rhs_shape = tuple(dict(O=6, I=2, H=3, W=2)[a] for a in specs[1])
    config = dict(
        lhs_shape=lhs_shape,
        rhs_shape=rhs_shape,
        options=dict(
            window_strides=(2, 1), padding=padding, rhs_dilation=(1, 2), dimension_numbers=layout, feature_group_count=2
        ),
    )
    _assert_same_as_lax("conv_general_dilated", config)


@pytest.mark.parametrize(
    "ndim,lhs_dilation,strides,pads",
    [(1, 2, 1, (1, 2)), (2, 3, 2, (4, -1)), (3, 2, 3, (-2, 5)), (1, 3, 2, (-2, 5)), (2, 2, 3, (1, 2))],
)
def test_lhs_dilation_is_the_transposed_convolution(ndim, lhs_dilation, strides, pads):
    """lhs dilation (and a stride on top, and padding past the kernel extent, and crops) in 1-3 dims, groups 2."""
    config = dict(
        lhs_shape=(2, 4, *(5, 4, 3)[:ndim]),
        rhs_shape=(6, 2, *(3, 2, 2)[:ndim]),
        options=dict(
            window_strides=(strides,) * ndim,
            padding=(pads,) * ndim,
            lhs_dilation=(lhs_dilation,) * ndim,
            rhs_dilation=(1, 2, 1)[:ndim],
            feature_group_count=2,
        ),
    )
    _assert_same_as_lax("conv_general_dilated", config)


def test_empty_output_as_lax():
    x, w = np.ones((1, 2, 5)), np.ones((3, 2, 3))
    y = jaxconv.lax.conv_general_dilated(x, w, (1,), ((-2, -2),))
    assert y.shape == lax.conv_general_dilated(x, w, (1,), ((-2, -2),)).shape == (1, 3, 0)


def _loss(fn, **options):
    return lambda x, w: jnp.sum(fn(x, w, **options) ** 2)


def test_the_hand_rules_run():
    """The loss's jaxpr calls the rule (``custom_vjp_call``, which jax.grad differentiates by the rule's backward);
    and with the matrix-product forms forced, the gradient has no convolution at all, where autodiff of lax's
    op would transpose it into two."""
    x, w = np.ones((2, 3, 6, 6)), np.ones((4, 3, 3, 3))
    options = dict(window_strides=(1, 1), padding="SAME")
    ours = _loss(jaxconv.lax.conv_general_dilated, **options)
    assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(x, w))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(_loss(lax.conv_general_dilated, **options))(x, w))
    with jaxconv.plan.forms(conv_forward="im2row_blocked", conv_backward="im2row"):
        grad_jaxpr = str(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, w))
    assert "conv_general_dilated" not in grad_jaxpr and "dot_general" in grad_jaxpr
    assert "conv_general_dilated" in str(jax.make_jaxpr(jax.grad(_loss(lax.conv_general_dilated, **options)))(x, w))
    for name in ("max_pool", "avg_pool"):
        pool = getattr(jaxconv.lax, name)
        assert "custom_vjp_call" in str(jax.make_jaxpr(lambda a: jnp.sum(pool(a, (2, 2), (2, 2))))(np.ones((6, 6, 2))))
    y = np.ones((1, 3, 3, 4))
    assert "custom_vjp_call" in str(
        jax.make_jaxpr(_loss(jaxconv.lax.conv_transpose, strides=(2, 2), padding="SAME"))(y, np.ones((3, 3, 4, 2)))
    )


@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_signature_is_lax(name):
    assert (
        inspect.signature(getattr(jaxconv.lax, name)).parameters.keys()
        == inspect.signature(DROP_INS[name]).parameters.keys()
    )
    ours, theirs = inspect.signature(getattr(jaxconv.lax, name)), inspect.signature(DROP_INS[name])
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_signature_is_flax(name):
    ours, theirs = inspect.signature(getattr(jaxconv.lax, name)), inspect.signature(POOLS[name])
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


POOL_CASES = [
    ((2, 6, 6, 3), (2, 2), (2, 2), "VALID"),
    ((7, 8, 2), (3, 3), None, "SAME"),  # no batch dim; Flax's default stride 1
    ((2, 2, 9, 2), (3,), (2,), "SAME"),  # two batch dims (Flax itself fails on two with (lo, hi) pairs)
    ((9, 2), (3,), (2,), ((1, 1),)),
    ((1, 5, 4, 4, 2), (2, 3, 2), (1, 2, 2), ((1, 0), (1, 1), (0, 1))),
    ((3, 7, 2), (2,), (3,), "SAME"),
]


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
@pytest.mark.parametrize(
    "name,extra",
    [("max_pool", {}), ("avg_pool", dict(count_include_pad=True)), ("avg_pool", dict(count_include_pad=False))],
)
def test_pools_equal_flax(shape, window, strides, padding, name, extra):
    """Values and gradients against flax.linen's own pools (and the plain-lax oracle of the registry against it)."""
    size = int(np.prod(shape))
    x = ((np.random.default_rng(0).permutation(size) + 0.5) / size).reshape(shape)  # no ties
    ours = getattr(jaxconv.lax, name)
    theirs, oracle = POOLS[name], getattr(reference, f"flax_{name}")
    y_ref, (g_ref,), (h_ref,) = _derivatives(lambda a: theirs(a, window, strides, padding, **extra), (x,))
    for fn in (ours, oracle):
        y, (g,), (h,) = _derivatives(lambda a, f=fn: f(a, window, strides, padding, **extra), (x,))
        assert y.shape == y_ref.shape
        assert _max_rel(y, y_ref) <= 1e-12 and _max_rel(g, g_ref) <= 1e-12 and _max_rel(h, h_ref) <= 1e-12


def test_preferred_element_type():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 6)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4, 3, 3, 3)), jnp.bfloat16)
    options = dict(window_strides=(1, 1), padding="SAME", preferred_element_type=jnp.float32)
    y = jaxconv.lax.conv_general_dilated(x, w, **options)
    y_ref = lax.conv_general_dilated(x, w, **options)
    assert y.dtype == y_ref.dtype == jnp.float32
    # bf16 products are exact in float32: only the float32 summation order differs.
    exact = lax.conv_general_dilated(x.astype(jnp.float64), w.astype(jnp.float64), (1, 1), "SAME")
    scale = lax.conv_general_dilated(jnp.abs(x).astype(jnp.float64), jnp.abs(w).astype(jnp.float64), (1, 1), "SAME")
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= 1e-6 * scale)
    gx = jax.grad(lambda a: jnp.sum(jaxconv.lax.conv_general_dilated(a, w, **options)))(x)
    assert gx.dtype == jax.grad(lambda a: jnp.sum(lax.conv_general_dilated(a, w, **options)))(x).dtype
    # Narrower than the inputs: lax's TypeError.
    with pytest.raises(TypeError, match="preferred_element_type"):
        jaxconv.lax.conv_general_dilated(
            x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "SAME", preferred_element_type=jnp.bfloat16
        )


@pytest.mark.parametrize(
    "precision,printed",
    [
        ("highest", "(Precision.HIGHEST, Precision.HIGHEST)"),
        (lax.Precision.DEFAULT, "(Precision.DEFAULT, Precision.DEFAULT)"),
        (("highest", "default"), "(Precision.HIGHEST, Precision.DEFAULT)"),
    ],
)
def test_precision_reaches_the_op(precision, printed):
    x, w = np.ones((1, 3, 5, 5), np.float32), np.ones((2, 3, 3, 3), np.float32)
    fn = lambda a: jaxconv.lax.conv_general_dilated(a, w, (1, 1), "SAME", precision=precision)  # noqa: E731
    assert f"precision={printed}" in str(jax.make_jaxpr(fn)(x))
    np.testing.assert_array_equal(fn(x), lax.conv_general_dilated(x, w, (1, 1), "SAME", precision=precision))


def test_out_sharding():
    """As lax: a NamedSharding over explicit mesh axes (or a PartitionSpec under that mesh) shards the result."""
    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Explicit,))
    x, w = np.ones((4, 5, 5, 3)), np.ones((3, 3, 3, 2))
    dn = ("NHWC", "HWIO", "NHWC")
    y = jaxconv.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dn, out_sharding=NamedSharding(mesh, PartitionSpec("b"))
    )
    assert y.sharding.spec[0] == "b" and len(y.sharding.device_set) == 4
    with jax.set_mesh(mesh):
        y = jax.jit(
            lambda a, b: jaxconv.lax.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=dn, out_sharding=PartitionSpec("b")
            )
        )(x, w)
    assert y.sharding.spec[0] == "b"
    np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn), rtol=1e-12)


# --- errors ----------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w = np.ones((2, 4, 6, 6)), np.ones((4, 4, 3, 3))
    with pytest.raises(ValueError, match="batch_group_count"):
        jaxconv.lax.conv_general_dilated(x, w, (1, 1), "SAME", batch_group_count=2)
    with pytest.raises(ValueError, match="`lhs`.*spatial"):
        jaxconv.lax.conv_general_dilated(np.ones((1, 1, 2, 2, 2, 2)), np.ones((1, 1, 1, 1, 1, 1)), (1,) * 4, "VALID")
    with pytest.raises(ValueError, match="floating"):
        jaxconv.lax.conv_general_dilated(x.astype(np.int32), w.astype(np.int32), (1, 1), "SAME")
    with pytest.raises(TypeError, match="same dtype"):
        jaxconv.lax.conv_general_dilated(x.astype(np.float32), w, (1, 1), "SAME")
    # What lax rejects, lax's own error: string padding with lhs dilation, a feature count that does not divide.
    with pytest.raises(ValueError, match="String padding"):
        jaxconv.lax.conv_general_dilated(x, w, (1, 1), "SAME", lhs_dilation=(2, 2))
    with pytest.raises(ValueError, match="feature_group_count"):
        jaxconv.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=3)
    with pytest.raises(TypeError, match="same dtype"):
        jaxconv.lax.conv_transpose(x.astype(np.float32), w, (1, 1), "SAME")


def test_pool_errors_name_the_argument():
    x = np.ones((1, 6, 6, 2))
    with pytest.raises(ValueError, match="`padding`.*half the window"):
        jaxconv.lax.max_pool(x, (2, 2), padding=((2, 2), (0, 0)))
    with pytest.raises(ValueError, match="`padding`"):
        jaxconv.lax.avg_pool(x, (2, 2), padding="FULL")
    with pytest.raises(ValueError, match="`padding`"):
        jaxconv.lax.avg_pool(x, (2, 2), padding=((0, 0),))
    with pytest.raises(ValueError, match="`window_shape`"):
        jaxconv.lax.max_pool(x, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="`inputs`"):
        jaxconv.lax.max_pool(np.ones((6, 6)), (2, 2))
    with pytest.raises(ValueError, match="`strides`"):
        jaxconv.lax.max_pool(x, (2, 2), strides=(0, 1))


@pytest.mark.parametrize("lhs_dilation,padding", [(1, (1, -1)), (2, (3, -1)), (3, (-3, 2)), (1, (-2, 2))])
def test_crops_that_leave_outputs_reading_padding_alone(lhs_dilation, padding):
    """A crop that removes every input entry while padding on the other side keeps outputs: they are zeros,
    as lax's (and their gradients zero)."""
    config = dict(
        lhs_shape=(2, 2, 1 if lhs_dilation == 1 else 2),
        rhs_shape=(3, 2, 1),
        options=dict(window_strides=(1,), padding=(padding,), lhs_dilation=(lhs_dilation,)),
    )
    _assert_same_as_lax("conv_general_dilated", config)
