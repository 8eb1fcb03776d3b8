"""conv2d rejects bad input at trace time with a ValueError naming the argument and value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxconv

X = jnp.zeros((2, 6, 6, 4))
W = jnp.zeros((3, 3, 4, 8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=jnp.zeros((6, 6, 4))), r"`x` must have rank 4, got shape \(6, 6, 4\)"),
        (dict(w=jnp.zeros((3, 3, 4))), r"`w` must have rank 4"),
        (dict(w=jnp.zeros((3, 3, 3, 8))), r"`x.shape\[3\]` \(=4\) must equal `groups` \(=1\)"),
        (dict(w=jnp.zeros((3, 3, 2, 6)), groups=2), None),
        (
            dict(w=jnp.zeros((3, 3, 2, 7)), groups=2),
            r"`groups` \(=2\) must divide the output channels `w.shape\[3\]` \(=7\)",
        ),
        (dict(w=jnp.zeros((7, 3, 4, 8))), r"spans 7 in height, larger than the padded input \(6 \+ 0 \+ 0 = 6\)"),
        (dict(w=jnp.zeros((3, 4, 4, 8)), dilation=2), r"spans 7 in width"),
        (dict(stride=0), r"`stride` \(=0\) must be >= 1"),
        (dict(stride=(1, -2)), r"`stride` \(=\(1, -2\)\) must be >= 1"),
        (dict(dilation=0), r"`dilation` \(=0\) must be >= 1"),
        (dict(groups=0), r"`groups` \(=0\) must be a positive int"),
        (dict(groups=1.5), r"`groups` \(=1.5\) must be a positive int"),
        (dict(padding=-1), r"`padding` \(=-1\) must be non-negative"),
        (dict(padding=((0, 1), (2, -1))), r"`padding` \(=\(\(0, 1\), \(2, -1\)\)\) must be non-negative"),
        (dict(padding="FULL"), r"`padding` \(='FULL'\) must be 'VALID', 'SAME'"),
        (dict(padding=(1, 2, 3)), r"`padding` \(=\(1, 2, 3\)\)"),
        (dict(stride="2"), r"`stride` \(='2'\) must be an int or a pair"),
        (dict(x=jnp.zeros((2, 6, 6, 4), jnp.int32)), r"`x` must have a floating dtype, got dtype int32"),
        (dict(w=jnp.zeros((3, 3, 4, 8), jnp.int32)), r"`w` must have a floating dtype"),
        (dict(b=jnp.zeros(7)), r"`b` must have length 8 \(the output channels\), got shape \(7,\)"),
        (dict(b=jnp.zeros((8, 1))), r"`b` must have rank 1"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(x=X, w=W, b=None)
    for name in ("x", "w", "b"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    call = lambda: jaxconv.conv2d(args["x"], args["w"], args["b"], **kwargs)
    if match is None:  # a valid grouped configuration, as a control
        assert call().shape == (2, 4, 4, 6)
        return
    with pytest.raises(ValueError, match=match):
        call()
    # The same error at trace time, under jit: nothing is computed first.
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda x, w: jaxconv.conv2d(x, w, args["b"], **kwargs)).lower(args["x"], args["w"])


@pytest.mark.parametrize(
    "op,y_name,nd",
    [(jaxconv.conv1d, "x", 1), (jaxconv.conv2d, "x", 2), (jaxconv.conv3d, "x", 3), (jaxconv.conv_transpose2d, "y", 2)],
)
@pytest.mark.parametrize("which", ["w", "b"])
def test_dtype_mismatch_is_a_type_error_naming_both_arguments(op, y_name, nd, which):
    """As lax: arrays of different dtypes are a TypeError (eager and at trace time), naming each argument
    and its dtype."""
    x = jnp.zeros((2, *(6,) * nd, 4))
    w = jnp.zeros((*(3,) * nd, 4, 4), jnp.float32 if which == "w" else jnp.float64)
    b = jnp.zeros(4, jnp.float32) if which == "b" else None
    match = rf"dtypes must match, got `{y_name}` float64, `w` {w.dtype}" + (", `b` float32" if b is not None else "")
    with pytest.raises(TypeError, match=match):
        op(x, w, b)
    with pytest.raises(TypeError, match=match):
        jax.jit(lambda x, w: op(x, w, b)).lower(x, w)


def test_padding_can_make_a_small_input_fit():
    assert jaxconv.conv2d(jnp.zeros((1, 2, 2, 1)), jnp.zeros((3, 3, 1, 1)), padding=1).shape == (1, 2, 2, 1)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxconv.conv1d(jnp.zeros((2, 6, 6, 4)), jnp.zeros((3, 4, 8))), r"`x` must have rank 3"),
        (lambda: jaxconv.conv1d(jnp.zeros((2, 6, 4)), jnp.zeros((3, 3, 4, 8))), r"`w` must have rank 3"),
        (
            lambda: jaxconv.conv1d(jnp.zeros((2, 6, 4)), jnp.zeros((3, 4, 8)), stride=(1, 2)),
            r"`stride` \(=\(1, 2\)\) must be an int or one int",
        ),
        (
            lambda: jaxconv.conv1d(jnp.zeros((2, 6, 4)), jnp.zeros((3, 4, 8)), padding=(1, 2)),
            r"`padding` \(=\(1, 2\)\) must be 'VALID', 'SAME', an int, 1 ints or one \(lo, hi\) per dimension",
        ),
        (lambda: jaxconv.conv1d(jnp.zeros((2, 6, 4)), jnp.zeros((9, 4, 8))), r"spans 9 in width"),
        (lambda: jaxconv.conv1d(jnp.zeros((2, 6, 4)), jnp.zeros((3, 3, 8))), r"`x.shape\[2\]` \(=4\)"),
        (lambda: jaxconv.conv3d(jnp.zeros((2, 4, 6, 6, 4)), jnp.zeros((5, 3, 3, 4, 8))), r"spans 5 in depth"),
        (
            lambda: jaxconv.conv3d(jnp.zeros((2, 4, 6, 6, 4)), jnp.zeros((3, 3, 3, 4, 8)), dilation=(1, 1)),
            r"`dilation` \(=\(1, 1\)\) must be an int or a triple",
        ),
        (
            lambda: jaxconv.conv3d(
                jnp.zeros((2, 4, 6, 6, 4)), jnp.zeros((3, 3, 3, 4, 8)), padding=((0, 1), (1, 1), (2, -1))
            ),
            r"must be non-negative",
        ),
        (
            lambda: jaxconv.conv3d(jnp.zeros((2, 4, 6, 6, 4)), jnp.zeros((3, 3, 3, 2, 7)), groups=2),
            r"`groups` \(=2\) must divide the output channels `w.shape\[4\]` \(=7\)",
        ),
    ],
)
def test_1d_and_3d_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_1d_and_3d_padding_forms_and_output_sizes():
    x1, w1 = jnp.zeros((2, 9, 3)), jnp.zeros((3, 3, 5))
    assert jaxconv.conv1d(x1, w1, stride=2, padding="SAME").shape == (2, 5, 5)
    assert jaxconv.conv1d(x1, w1, padding=((2, 0),)).shape == (2, 9, 5)
    assert jaxconv.conv1d(x1, w1, padding=(1,), dilation=2).shape == (2, 7, 5)
    x3, w3 = jnp.zeros((1, 4, 5, 6, 2)), jnp.zeros((2, 3, 3, 2, 4))
    assert jaxconv.conv3d(x3, w3, padding="SAME").shape == (1, 4, 5, 6, 4)
    assert jaxconv.conv3d(x3, w3, stride=(1, 2, 3), padding=(0, 1, 1)).shape == (1, 3, 3, 2, 4)
