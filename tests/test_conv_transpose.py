"""conv_transpose1d/2d/3d: PyTorch's definition written out in NumPy, the adjoint identity, sizes, errors.

(The float64 VJP, finite-difference, second-order, jit and vmap checks against
``jax.vjp`` of ``reference.conv_transpose_nd`` run in test_conformance.py.)
"""

from __future__ import annotations

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import plan, reference

OPS = {1: jaxconv.conv_transpose1d, 2: jaxconv.conv_transpose2d, 3: jaxconv.conv_transpose3d}
CONVS = {1: jaxconv.conv1d, 2: jaxconv.conv2d, 3: jaxconv.conv3d}


def _scatter(y, w, b, stride, pads, output_padding, dilation, groups):
    """PyTorch's ConvTranspose, entry by entry: y[n, i, o] adds y * w[t, c', o] to output
    position s*i + d*t - lo, channel (group of o) * C/G + c'; what lands outside is dropped."""
    kernel, cg, o = w.shape[:-2], w.shape[-2], w.shape[-1]
    og = o // groups
    size = [
        (n - 1) * s - lo - hi + d * (k - 1) + 1 + op
        for n, (lo, hi), k, s, d, op in zip(y.shape[1:-1], pads, kernel, stride, dilation, output_padding)
    ]
    out = np.zeros((y.shape[0], *size, groups * cg))
    for i in itertools.product(*(range(n) for n in y.shape[1:-1])):
        for t in itertools.product(*(range(k) for k in kernel)):
            pos = [s * a + d * u - lo for a, u, s, d, (lo, _) in zip(i, t, stride, dilation, pads)]
            if not all(0 <= p < m for p, m in zip(pos, size)):
                continue
            for oc in range(o):
                g = oc // og
                out[(slice(None), *pos, slice(g * cg, (g + 1) * cg))] += (
                    y[(slice(None), *i, oc)][:, None] * w[(*t, slice(None), oc)][None, :]
                )
    return out + (0 if b is None else b)


GRID = [
    # ndim, y spatial, kernel, stride, padding (pairs), output_padding, dilation, groups, C/G, O
    (1, (5,), (3,), (2,), ((1, 1),), (1,), (1,), 1, 2, 3),
    (1, (4,), (2,), (3,), ((0, 2),), (2,), (2,), 2, 1, 4),
    (2, (3, 4), (3, 2), (2, 1), ((1, 1), (0, 1)), (1, 0), (1, 2), 1, 2, 3),
    (2, (2, 3), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 2, 2, 4),
    (3, (2, 3, 2), (2, 2, 3), (1, 2, 2), ((0, 0), (1, 0), (1, 1)), (0, 1, 1), (2, 1, 1), 1, 2, 2),
]


@pytest.fixture(
    params=[None, ("conv", "conv"), ("im2row_blocked", "im2row"), ("conv", "mixed")],
    ids=["planner", "conv", "im2row", "mixed"],
)
def form(request, forms):
    if request.param is not None:
        forms(conv_forward=request.param[0], conv_backward=request.param[1])
    return request.param


@pytest.mark.parametrize("ndim,spatial,kernel,stride,pads,output_padding,dilation,groups,cg,o", GRID)
def test_equals_pytorchs_definition_written_out(
    form, ndim, spatial, kernel, stride, pads, output_padding, dilation, groups, cg, o
):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, *spatial, o))
    w = rng.standard_normal((*kernel, cg, o))
    b = rng.standard_normal(groups * cg)
    got = OPS[ndim](
        y, w, b, stride=stride, padding=pads, output_padding=output_padding, dilation=dilation, groups=groups
    )
    np.testing.assert_allclose(
        np.asarray(got), _scatter(y, w, b, stride, pads, output_padding, dilation, groups), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("ndim,spatial,kernel,stride,pads,output_padding,dilation,groups,cg,o", GRID)
def test_is_the_adjoint_of_the_convolution(
    ndim, spatial, kernel, stride, pads, output_padding, dilation, groups, cg, o
):
    """<conv_transpose(y, w), z> = <y, conv(z, w)> for random y and z, and conv(z) has y's shape."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal((2, *spatial, o))
    w = rng.standard_normal((*kernel, cg, o))
    u = OPS[ndim](y, w, stride=stride, padding=pads, output_padding=output_padding, dilation=dilation, groups=groups)
    z = rng.standard_normal(u.shape)
    conv_z = CONVS[ndim](z, w, stride=stride, padding=pads, dilation=dilation, groups=groups)
    assert conv_z.shape == y.shape
    lhs, rhs = float(jnp.vdot(u, z)), float(jnp.vdot(y, conv_z))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(rhs))
    ref = reference.conv_transpose_nd(
        y, w, stride=stride, padding=pads, output_padding=output_padding, dilation=dilation, groups=groups
    )
    np.testing.assert_allclose(np.asarray(u), np.asarray(ref), rtol=1e-12, atol=1e-12)


def test_upsampling_shape_and_padding_forms():
    y = jnp.ones((1, 3, 3, 4))
    w = jnp.ones((3, 3, 2, 4))
    assert jaxconv.conv_transpose2d(y, w, stride=2, padding=1, output_padding=1).shape == (1, 6, 6, 2)
    # An int, one per dimension, and pairs all mean the same padding; "VALID" is 0.
    a = jaxconv.conv_transpose2d(y, w, stride=2, padding=1)
    b = jaxconv.conv_transpose2d(y, w, stride=2, padding=(1, 1))
    c = jaxconv.conv_transpose2d(y, w, stride=2, padding=((1, 1), (1, 1)))
    assert a.shape == (1, 5, 5, 2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(
        np.asarray(jaxconv.conv_transpose2d(y, w, padding="VALID")), np.asarray(jaxconv.conv_transpose2d(y, w))
    )
    assert jaxconv.conv_transpose1d(jnp.ones((2, 7, 3)), jnp.ones((4, 5, 3))).shape == (2, 10, 5)
    assert jaxconv.conv_transpose3d(jnp.ones((1, 2, 3, 4, 2)), jnp.ones((2, 2, 2, 1, 2)), stride=2).shape == (
        1,
        4,
        6,
        8,
        1,
    )


def test_jit_symbolic_batch_export_and_planner():
    y = jnp.ones((2, 4, 4, 8))
    w = jnp.ones((3, 3, 4, 8)) / 9

    def f(y, w):
        return jaxconv.conv_transpose2d(y, w, stride=2, padding=1, output_padding=1)

    np.testing.assert_allclose(np.asarray(jax.jit(f)(y, w)), np.asarray(f(y, w)), rtol=1e-12)
    shapes = jax.export.symbolic_shape("b, 4, 4, 8")
    exported = jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct(shapes, y.dtype), w)
    np.testing.assert_allclose(np.asarray(exported.call(y, w)), np.asarray(f(y, w)), rtol=1e-12)
    # Every form gives the same answer (jitted: plan.forms is part of jit's cache key, so each block retraces).
    grad = jax.jit(jax.grad(lambda y, w: (f(y, w) ** 2).sum(), argnums=(0, 1)))
    with plan.forms(conv_forward="conv", conv_backward="conv"):
        g0 = grad(y, w)
    for fw, bw in itertools.product(plan.CONV_FORWARD_FORMS, plan.CONV_BACKWARD_FORMS):
        with plan.forms(conv_forward=fw, conv_backward=bw):
            g = grad(y, w)
        for a, b_ in zip(g, g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-12, atol=1e-12)


SAME_CASES = [
    # ndim, y spatial, kernel, stride, dilation, groups
    (2, (3, 4), (3, 3), (2, 2), (1, 1), 1),
    (2, (4, 3), (2, 4), (3, 2), (1, 2), 2),
    (1, (5,), (4,), (2,), (2,), 1),
    (3, (2, 3, 2), (3, 2, 3), (2, 1, 3), (1, 1, 1), 1),
    (2, (3, 3), (1, 1), (2, 2), (1, 1), 1),
]


# The planner and the conv form on every case; the product forms (whose SAME geometry is the same code) on two.
SAME_FORMS = [
    pytest.param(forms, case, id=f"{name}-{i}")
    for name, forms in (("planner", None), ("conv", ("conv", "conv")))
    for i, case in enumerate(SAME_CASES)
] + [
    pytest.param(forms, SAME_CASES[i], id=f"{name}-{i}")
    for name, forms in (("im2row", ("im2row_blocked", "im2row")), ("mixed", ("conv", "mixed")))
    for i in (1,)
]


@pytest.mark.parametrize("pair,case", SAME_FORMS)
def test_same_is_the_adjoint_of_the_same_convolution(forms, pair, case):
    """``padding="SAME"``: for every output_padding (every input size the SAME convolution maps to y's size),
    conv_transpose(y) is the VJP of ``conv(x, padding="SAME")`` with respect to x, and its bias is added."""
    ndim, spatial, kernel, stride, dilation, groups = case
    if pair is not None:
        forms(conv_forward=pair[0], conv_backward=pair[1])
    rng = np.random.default_rng(11)
    cg, o = 2, 2 * groups
    y = rng.standard_normal((2, *spatial, o))
    w = rng.standard_normal((*kernel, cg, o))
    b = rng.standard_normal(cg * groups)
    opts = dict(stride=stride, dilation=dilation, groups=groups)
    for output_padding in itertools.product(*(range(s) for s in stride)):
        x_shape = (2, *((m - 1) * s + 1 + op for m, s, op in zip(spatial, stride, output_padding)), cg * groups)
        conv = lambda x: reference.conv_nd(x, w, padding="SAME", **opts)  # noqa: E731
        assert jax.eval_shape(conv, jnp.zeros(x_shape)).shape == y.shape
        (expected,) = jax.vjp(conv, jnp.zeros(x_shape))[1](y)
        got = OPS[ndim](y, w, b, padding="SAME", output_padding=output_padding, **opts)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected) + b, rtol=1e-12, atol=1e-12)

        # The gradients of the rule (forward and kernel) against autodiff of the reference pullback.
        def ref(y, w):
            return jax.vjp(lambda x: reference.conv_nd(x, w, padding="SAME", **opts), jnp.zeros(x_shape))[1](y)[0]

        ours = jax.jit(
            jax.grad(
                lambda y, w: (OPS[ndim](y, w, padding="SAME", output_padding=output_padding, **opts) ** 2).sum(),
                argnums=(0, 1),
            )
        )(y, w)
        theirs = jax.jit(jax.grad(lambda y, w: (ref(y, w) ** 2).sum(), argnums=(0, 1)))(y, w)
        for a, c in zip(ours, theirs):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-11, atol=1e-11)


def test_same_sizes_and_the_output_padding_that_gives_n_times_stride():
    y, w = jnp.ones((1, 5, 4, 3)), jnp.ones((3, 3, 2, 3))
    assert jaxconv.conv_transpose2d(y, w, padding="SAME").shape == (1, 5, 4, 2)
    assert jaxconv.conv_transpose2d(y, w, padding="same", stride=2).shape == (1, 9, 7, 2)
    assert jaxconv.conv_transpose2d(y, w, padding="SAME", stride=2, output_padding=1).shape == (1, 10, 8, 2)
    assert jaxconv.conv_transpose2d(y, w, padding="SAME", stride=(3, 2), output_padding=(2, 0)).shape == (1, 15, 7, 2)
    # The default is "VALID", the same as padding 0.
    np.testing.assert_array_equal(
        np.asarray(jaxconv.conv_transpose2d(y, w, stride=2)),
        np.asarray(jaxconv.conv_transpose2d(y, w, stride=2, padding=0)),
    )
    np.testing.assert_array_equal(
        np.asarray(jaxconv.conv_transpose2d(y, w, stride=2, padding="VALID")),
        np.asarray(jaxconv.conv_transpose2d(y, w, stride=2, padding=((0, 0), (0, 0)))),
    )
    assert inspect.signature(jaxconv.conv_transpose2d).parameters["padding"].default == "VALID"


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), padding="FULL"),
            r"`padding` \(='FULL'\) must be 'VALID', 'SAME'",
        ),
        (
            lambda: jaxconv.conv_transpose2d(
                jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), padding="SAME", stride=2, output_padding=2
            ),
            "`output_padding`.*smaller than `stride`",
        ),
        (
            lambda: jaxconv.conv_transpose2d(
                jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), stride=2, output_padding=2
            ),
            "`output_padding`.*smaller than `stride`",
        ),
        (
            lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 5)), jnp.ones((3, 3, 2, 4))),
            r"`y`'s channels `y.shape\[3\]` \(=5\)",
        ),
        (
            lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), groups=3),
            "`groups` \\(=3\\) must divide",
        ),
        (
            lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), jnp.ones(3)),
            "`b` must have length 2",
        ),
        (lambda: jaxconv.conv_transpose1d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 2, 4))), "`y` must have rank 3"),
        (
            lambda: jaxconv.conv_transpose3d(jnp.ones((1, 2, 2, 2, 4)), jnp.ones((2, 2, 2, 1, 4)), padding=2),
            "`padding` \\(=2\\) crops 2 \\+ 2 from the depth",
        ),
        (
            lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), stride=(1, 2, 1)),
            "`stride`",
        ),
        (lambda: jaxconv.conv_transpose2d(jnp.ones((1, 3, 3, 4)), jnp.ones((3, 3, 2, 4)), padding=-1), "non-negative"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_forward_mode_error_names_the_op():
    y, w = jnp.ones((1, 3, 3, 2)), jnp.ones((2, 2, 1, 2))
    with pytest.raises(TypeError, match="jaxconv.conv_transpose2d"):
        jax.jvp(lambda y: jaxconv.conv_transpose2d(y, w), (y,), (y,))
