"""lrn specifics: forward and backward against the formulas in numpy, the window convention, and
converters that reproduce PyTorch's, Caffe's and TensorFlow's formulas (written here in numpy).
(The VJP checks against the reference run in test_conformance.py.)"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv.verify import relative_error

# The function jaxconv.lrn shadows the submodule's attribute on the package.
lrn_module = sys.modules["jaxconv.ops.local_response"]


def _numpy_lrn(x, size, kappa, alpha, beta):
    """The docstring's formula, channel by channel: G(k) = [k - floor((size-1)/2), k + ceil((size-1)/2)]."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    y = np.empty_like(x)
    for k in range(c):
        lo, hi = max(0, k - (size - 1) // 2), min(c - 1, k + -(-(size - 1) // 2))
        y[..., k] = x[..., k] * (kappa + alpha * np.sum(x[..., lo : hi + 1] ** 2, axis=-1)) ** (-beta)
    return y


def _numpy_lrn_backward(x, g, size, kappa, alpha, beta):
    """docs/layers.md's LRN backward, summed literally over {k : d in G(k)}."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    c = x.shape[-1]
    window = [range(max(0, k - (size - 1) // 2), min(c, k + size // 2 + 1)) for k in range(c)]
    big_l = np.stack([kappa + alpha * np.sum(x[..., list(window[k])] ** 2, axis=-1) for k in range(c)], axis=-1)
    dx = g * big_l ** (-beta)
    for d in range(c):
        for k in range(c):
            if d in window[k]:
                dx[..., d] -= 2 * alpha * beta * g[..., k] * big_l[..., k] ** (-beta - 1) * x[..., k] * x[..., d]
    return dx


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 9])
def test_forward_and_backward_against_the_formulas_in_numpy(size):
    """Forward by the definition; backward by docs/layers.md's sum over {k : d in G(k)}."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 3, 6))
    g = rng.standard_normal(x.shape)
    options = dict(size=size, kappa=1.2, alpha=0.4, beta=0.8)
    y, vjp = jax.vjp(lambda x: jaxconv.lrn(x, **options), jnp.asarray(x))
    assert relative_error(y, _numpy_lrn(x, **options))[1] <= 1e-13
    assert relative_error(vjp(jnp.asarray(g))[0], _numpy_lrn_backward(x, g, **options))[1] <= 1e-12


def test_even_window_leans_up():
    """size 2: G(k) = {k, k+1}; only the top channel sees itself alone."""
    x = jnp.ones((1, 1, 1, 3))
    y = jaxconv.lrn(x, size=2, kappa=0.0, alpha=1.0, beta=1.0)
    np.testing.assert_allclose(np.asarray(y[0, 0, 0]), [0.5, 0.5, 1.0], rtol=1e-15)


# --- converters, each against its framework's formula in numpy -----------------


def _numpy_pytorch_lrn(x, size, alpha, beta, k):
    """torch.nn.functional.local_response_norm, channel-last: pad the squares with
    size // 2 channels before and (size - 1) // 2 after, average size of them
    (the zeros counted), then x / (k + alpha * avg) ** beta."""
    sq = np.asarray(x, np.float64) ** 2
    c = sq.shape[-1]
    padded = np.concatenate(
        [np.zeros(sq.shape[:-1] + (size // 2,)), sq, np.zeros(sq.shape[:-1] + ((size - 1) // 2,))], axis=-1
    )
    avg = np.stack([padded[..., j : j + size].sum(-1) / size for j in range(c)], axis=-1)
    return x / (k + alpha * avg) ** beta


def _numpy_caffe_lrn(x, local_size, alpha, beta, k):
    """Caffe LRN, ACROSS_CHANNELS: scale_i = k + alpha/n sum_{|j - i| <= (n-1)/2} a_j^2, b = a scale^-beta."""
    c = x.shape[-1]
    half = (local_size - 1) // 2
    scale = np.stack(
        [k + alpha / local_size * np.sum(x[..., max(0, i - half) : i + half + 1] ** 2, axis=-1) for i in range(c)],
        axis=-1,
    )
    return x * scale ** (-beta)


def _numpy_tensorflow_lrn(x, depth_radius, bias, alpha, beta):
    """tf.nn.local_response_normalization: sqr_sum[d] = sum(x[d - r : d + r + 1]^2); x / (bias + alpha sqr_sum)^beta."""
    c = x.shape[-1]
    r = depth_radius
    sqr_sum = np.stack([np.sum(x[..., max(0, d - r) : d + r + 1] ** 2, axis=-1) for d in range(c)], axis=-1)
    return x / (bias + alpha * sqr_sum) ** beta


@pytest.mark.parametrize("size", [1, 3, 5, 7, 11])
def test_pytorch_converter_odd_sizes(size):
    x = np.random.default_rng(7).standard_normal((2, 2, 3, 8))
    torch_args = dict(size=size, alpha=0.3, beta=0.75, k=1.5)
    params = jaxconv.lrn_params_from_pytorch(**torch_args)
    assert params == dict(size=size, kappa=1.5, alpha=0.3 / size, beta=0.75)
    expected = _numpy_pytorch_lrn(x, **torch_args)
    assert relative_error(jaxconv.lrn(jnp.asarray(x), **params), expected)[1] <= 1e-13


@pytest.mark.parametrize("size", [2, 4, 6, 10])
def test_pytorch_converter_even_sizes_need_the_mirror(size):
    """PyTorch's even window [c - n/2, c + n/2 - 1] mirrors G(k): reversing the channels matches it,
    the plain call does not (and the unmirrored converter refuses)."""
    x = np.random.default_rng(8).standard_normal((2, 2, 2, 8))
    torch_args = dict(size=size, alpha=0.6, beta=0.75, k=1.0)
    expected = _numpy_pytorch_lrn(x, **torch_args)
    with pytest.raises(ValueError, match=rf"`size` \(={size}\) is even"):
        jaxconv.lrn_params_from_pytorch(**torch_args)
    params = jaxconv.lrn_params_from_pytorch_mirrored(**torch_args)
    mirrored = jaxconv.lrn(jnp.asarray(x)[..., ::-1], **params)[..., ::-1]
    assert relative_error(mirrored, expected)[1] <= 1e-13
    assert relative_error(jaxconv.lrn(jnp.asarray(x), **params), expected)[1] > 1e-3


def test_pytorch_defaults():
    assert jaxconv.lrn_params_from_pytorch(5) == dict(size=5, kappa=1.0, alpha=1e-4 / 5, beta=0.75)


@pytest.mark.parametrize("local_size", [1, 3, 5, 9])
def test_caffe_converter(local_size):
    x = np.random.default_rng(9).standard_normal((2, 3, 2, 7))
    caffe_args = dict(local_size=local_size, alpha=0.4, beta=0.6, k=2.0)
    params = jaxconv.lrn_params_from_caffe(**caffe_args)
    expected = _numpy_caffe_lrn(x, **caffe_args)
    assert relative_error(jaxconv.lrn(jnp.asarray(x), **params), expected)[1] <= 1e-13


@pytest.mark.parametrize("depth_radius", [0, 1, 2, 5])
def test_tensorflow_converter(depth_radius):
    x = np.random.default_rng(10).standard_normal((2, 2, 3, 9))
    tf_args = dict(depth_radius=depth_radius, bias=1.0, alpha=0.2, beta=0.5)
    params = jaxconv.lrn_params_from_tensorflow(**tf_args)
    assert params["size"] == 2 * depth_radius + 1
    expected = _numpy_tensorflow_lrn(x, **tf_args)
    assert relative_error(jaxconv.lrn(jnp.asarray(x), **params), expected)[1] <= 1e-13


def test_alexnet_numbers_across_conventions():
    """AlexNet's LRN (n = 5, k = 2, alpha = 1e-4 on the plain sum, beta = 0.75) in each framework."""
    ours = dict(size=5, kappa=2.0, alpha=1e-4, beta=0.75)
    assert jaxconv.lrn_params_from_caffe(local_size=5, alpha=5e-4, beta=0.75, k=2.0) == pytest.approx(ours)
    assert jaxconv.lrn_params_from_pytorch(5, alpha=5e-4, beta=0.75, k=2.0) == pytest.approx(ours)
    assert jaxconv.lrn_params_from_tensorflow(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75) == ours


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "x,options,match",
    [
        (np.ones((2, 3, 4)), {}, r"`x` must have rank 4"),
        (np.ones((1, 2, 2, 3), np.int32), {}, r"`x` must have a floating dtype"),
        (np.ones((1, 2, 2, 3)), dict(size=0), r"`size` \(=0\)"),
        (np.ones((1, 2, 2, 3)), dict(size=-2), r"`size` \(=-2\)"),
        (np.ones((1, 2, 2, 3)), dict(size=2.5), r"`size` \(=2.5\)"),
        (np.ones((1, 2, 2, 3)), dict(kappa=-1.0), r"`kappa` \(=-1.0\) must be >= 0"),
        (np.ones((1, 2, 2, 3)), dict(alpha=-0.1), r"`alpha` \(=-0.1\) must be >= 0"),
        (np.ones((1, 2, 2, 3)), dict(beta=float("nan")), r"`beta` \(=nan\) must be finite"),
        (np.ones((1, 2, 2, 3)), dict(kappa="big"), r"`kappa` \(='big'\)"),
    ],
)
def test_bad_input(x, options, match):
    with pytest.raises(ValueError, match=match):
        jaxconv.lrn(x, **options)


def test_bad_hyperparameter_under_jit_is_a_value_error():
    """A traced kappa cannot be a static hyperparameter: ValueError at trace time."""
    with pytest.raises(ValueError, match=r"`kappa`"):
        jax.jit(lambda x, k: jaxconv.lrn(x, kappa=k))(jnp.ones((1, 1, 1, 3)), 1.0)


@pytest.mark.parametrize(
    "converter,kwargs,match",
    [
        (jaxconv.lrn_params_from_caffe, dict(local_size=4), r"`local_size` \(=4\) must be odd"),
        (jaxconv.lrn_params_from_caffe, dict(local_size=0), r"`local_size` \(=0\)"),
        (jaxconv.lrn_params_from_caffe, dict(k=-1.0), r"`k` \(=-1.0\)"),
        (jaxconv.lrn_params_from_tensorflow, dict(depth_radius=-1), r"`depth_radius` \(=-1\)"),
        (jaxconv.lrn_params_from_tensorflow, dict(bias=-2.0), r"`bias` \(=-2.0\)"),
        (jaxconv.lrn_params_from_pytorch, dict(size=0), r"`size` \(=0\)"),
        (jaxconv.lrn_params_from_pytorch_mirrored, dict(size=3, alpha=-1.0), r"`alpha` \(=-1.0\)"),
    ],
)
def test_bad_converter_arguments(converter, kwargs, match):
    with pytest.raises(ValueError, match=match):
        converter(**kwargs)


def test_window_extent_matches_the_convention():
    for size in range(1, 9):
        below, above = lrn_module.window_extent(size)
        assert below + above + 1 == size
        assert below == (size - 1) // 2 and above == -(-(size - 1) // 2)
