r"""Local response normalisation across channels, with a hand-derived backward pass.

Forward (docs/layers.md, Local response normalisation; the MatConvNet / AlexNet
convention), for ``x`` of shape ``(N, H, W, C)`` (NHWC: the channel is the last
axis) and at every position ``(n, i, j)``:

.. math::

    L_k = \kappa + \alpha \sum_{t \in G(k)} x_t^2, \qquad y_k = x_k\, L_k^{-\beta},

    G(k) = [\,k - \lfloor (\text{size}-1)/2 \rfloor,\; k + \lceil (\text{size}-1)/2 \rceil\,]
    \cap \{0, \dots, C-1\}.

So an odd ``size`` is a centred window; an even one reaches one channel further
*up* than down (``size = 4``: ``[k-1, k+2]``); a ``size >= C`` may cover every
channel.  ``alpha`` multiplies the plain sum: Caffe's and PyTorch's ``alpha`` is
divided by the window size first (see the converters below).

Backward, derived from the forward (docs/layers.md, Local response normalisation,
Backward).  ``y_k`` depends on ``x_d`` directly when
``k = d`` and through ``L_k`` whenever ``d \in G(k)``, with
``dL_k/dx_d = 2 \alpha x_d``.  For the output gradient ``g = dz/dy``:

.. math::

    \frac{dz}{dx_d} = g_d L_d^{-\beta}
        - 2\alpha\beta\, x_d \sum_{k:\, d \in G(k)} g_k\, x_k\, L_k^{-\beta-1}.

The set ``{k : d in G(k)}`` is the *transposed* window
``[d - ceil((size-1)/2), d + floor((size-1)/2)]``: for even sizes it leans the
other way.  Both window sums are one ``lax.reduce_window`` add over the channel
axis with the two paddings swapped.  Writing ``q_k = g_k y_k / L_k``
(``= g_k x_k L_k^{-beta-1}``) the rule is ``dx = g L^{-beta} - 2 alpha beta x
Gᵀ(q)``.  The residuals are ``x`` and ``L^{-beta}`` (the power is the costly
part); the backward recomputes ``L``, one window sum.  The rule is written in
``jnp``/``lax``, so grad-of-grad differentiates through it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from .._core import args as _args

__all__ = [
    "lrn",
    "lrn_params_from_caffe",
    "lrn_params_from_pytorch",
    "lrn_params_from_pytorch_mirrored",
    "lrn_params_from_tensorflow",
]


class LRNConfig(NamedTuple):
    """Static, hashable configuration of one lrn call."""

    size: int
    kappa: float
    alpha: float
    beta: float


def window_extent(size: int) -> tuple[int, int]:
    """``(below, above)``: ``G(k) = [k - below, k + above]``, the MatConvNet window."""
    return (size - 1) // 2, size // 2


def _real(value, name: str, *, minimum: float | None = None) -> float:
    """A finite Python float from a number (or a concrete 0-d array)."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` (={value!r}) must be a real number.")
    try:
        result = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"`{name}` (={value!r}) must be a concrete real number (a static hyperparameter).") from None
    if not math.isfinite(result):
        raise ValueError(f"`{name}` (={value!r}) must be finite.")
    if minimum is not None and result < minimum:
        raise ValueError(f"`{name}` (={value!r}) must be >= {minimum}.")
    return result


@_args.reverse_mode_rule
def lrn(x: ArrayLike, *, size: int = 5, kappa: float = 2.0, alpha: float = 1e-4, beta: float = 0.75) -> Array:
    """Local response normalisation across channels (MatConvNet / AlexNet convention).

    ``y[..., k] = x[..., k] * (kappa + alpha * sum_{t in G(k)} x[..., t]**2) ** (-beta)``
    with ``G(k) = [k - floor((size-1)/2), k + ceil((size-1)/2)]`` clipped to the
    channels; the hand-derived backward is in the module docstring (docs/layers.md, Local response normalisation).

    Args:
      x: input, shape ``(N, H, W, C)``, floating dtype; normalised over ``C``.
      size: the window length, an int ``>= 1``; even sizes and ``size >= C`` are
        fine, and so is any huge one: a window past the channels is clipped
        to them (``size >= 2C - 1`` covers every channel from every ``k``).
      kappa: the additive constant, ``>= 0``.  (``kappa = 0`` with an all-zero
        window divides by zero, as the formula does.)
      alpha: the scale of the *plain* sum of squares, ``>= 0`` (not divided by
        ``size``; use :func:`lrn_params_from_caffe` / ``_pytorch`` for those).
      beta: the exponent, a finite real.

    The hyperparameters are static (Python numbers): changing them retraces.

    Returns:
      ``y``, the same shape and dtype as ``x``.  NaN: a NaN at channel ``t``
      makes ``y[..., k]`` NaN at the same position for every ``k`` whose window
      ``G(k)`` holds ``t`` (through the sum of squares), eager and under
      ``jit``; other positions are unaffected.

    Examples:
      >>> y = lrn(jnp.ones((1, 1, 1, 3)), size=3, kappa=1.0, alpha=1.0, beta=1.0)
      >>> y[0, 0, 0].tolist()  # windows {0, 1}, {0, 1, 2}, {1, 2}: 1/3, 1/4, 1/3
      [0.3333333432674408, 0.25, 0.3333333432674408]
    """
    x = _args.check_float_array(x, "x", 4)
    config = LRNConfig(
        size=_args.positive_int(size, "size"),
        kappa=_real(kappa, "kappa", minimum=0.0),
        alpha=_real(alpha, "alpha", minimum=0.0),
        beta=_real(beta, "beta"),
    )
    return _lrn(config, x)


def _channel_window_sum(v, below: int, above: int):
    """``out[..., k] = sum_{t = k - below}^{k + above} v[..., t]`` over existing channels."""
    ndim = v.ndim
    return lax.reduce_window(
        v,
        np.zeros((), v.dtype),  # a concrete 0: lax recognises the sum monoid (differentiable)
        lax.add,
        window_dimensions=(1,) * (ndim - 1) + (below + above + 1,),
        window_strides=(1,) * ndim,
        padding=((0, 0),) * (ndim - 1) + ((below, above),),
    )


def _clipped_extent(size: int, channels: int) -> tuple[int, int]:
    """:func:`window_extent` with each side at most ``channels - 1``: the same
    windows once clipped to the channels (a window reaching ``C - 1`` channels
    down already reaches channel 0 from every ``k``), so any ``size`` (say
    ``2**40``) costs what ``size = 2C - 1`` costs, instead of a reduction window
    (and padding) of ``size`` channels."""
    below, above = window_extent(size)
    most = max(channels - 1, 0)
    return min(below, most), min(above, most)


def _denominator(config: LRNConfig, x):
    """``L = kappa + alpha * G(x^2)``."""
    below, above = _clipped_extent(config.size, x.shape[-1])
    return config.kappa + config.alpha * _channel_window_sum(x * x, below, above)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lrn(config: LRNConfig, x):
    return x * _denominator(config, x) ** (-config.beta)


def _lrn_fwd(config: LRNConfig, x):
    # Residuals x and L^(-beta): the power (an exp and a log per entry) is the
    # costly part, taken once here; the backward recomputes L, one window sum
    # of x^2.  Two arrays of x's size, where autodiff keeps three.
    l_pow = _denominator(config, x) ** (-config.beta)
    return x * l_pow, (x, l_pow)


def _lrn_bwd(config: LRNConfig, residuals, g):
    x, l_pow = residuals
    below, above = _clipped_extent(config.size, x.shape[-1])
    q = g * x * l_pow / _denominator(config, x)  # g_k x_k L_k^(-beta-1)
    # {k : d in G(k)} = [d - above, d + below]: the window transposed.
    spread = _channel_window_sum(q, above, below)
    dx = g * l_pow - (2.0 * config.alpha * config.beta) * x * spread
    return (dx,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


# --- converters from other frameworks' parameterisations ----------------------


def lrn_params_from_pytorch(size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> dict:
    r"""``lrn`` keyword arguments equal to PyTorch's ``LocalResponseNorm(size, alpha, beta, k)``.

    PyTorch's implementation (``torch.nn.functional.local_response_norm``) pads the
    squared input with ``size // 2`` channels before and ``(size - 1) // 2`` after,
    then average-pools ``size`` channels (padding counted), so

    .. math::

        b_c = a_c \Big(k + \frac{\alpha}{n}
            \sum_{c' = c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor} a_{c'}^2\Big)^{-\beta}.

    (Its documentation writes the sum from ``c - n/2`` to ``c + n/2``, which is
    what the code does only for odd ``n``.)  Hence ``size = n``, ``kappa = k``,
    ``alpha = alpha / n``, ``beta = beta``.

    For odd ``n`` the windows agree exactly.  For even ``n`` PyTorch's window
    reaches one channel further *down* than up, the mirror image of
    MatConvNet's ``G(k)``, and no ``lrn`` arguments reproduce it; so this raises
    a ``ValueError`` for even ``size``.  :func:`lrn_params_from_pytorch_mirrored`
    returns the same numbers for any ``size``, for the caller to evaluate
    ``lrn(x[..., ::-1], **params)[..., ::-1]`` (reversing the channels mirrors
    the window; tested).
    """
    return _pytorch_params(size, alpha, beta, k, mirrored=False)


def _pytorch_params(size, alpha, beta, k, *, mirrored: bool) -> dict:
    n = _args.positive_int(size, "size")
    if n % 2 == 0 and not mirrored:
        raise ValueError(
            f"`size` (={size!r}) is even: PyTorch's window [c - {n // 2}, c + {(n - 1) // 2}] is the mirror "
            f"image of lrn's [c - {(n - 1) // 2}, c + {n // 2}]; call lrn_params_from_pytorch_mirrored and "
            f"evaluate lrn(x[..., ::-1], **params)[..., ::-1]."
        )
    return dict(
        size=n,
        kappa=_real(k, "k", minimum=0.0),
        alpha=_real(alpha, "alpha", minimum=0.0) / n,
        beta=_real(beta, "beta"),
    )


def lrn_params_from_pytorch_mirrored(size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> dict:
    """As :func:`lrn_params_from_pytorch`, also for even ``size``, to be used on reversed channels.

    ``lrn(x[..., ::-1], **p)[..., ::-1]`` equals PyTorch's
    ``LocalResponseNorm(size, alpha, beta, k)`` for every ``size`` (NHWC ``x``):
    reversing the channel order mirrors the window.
    """
    return _pytorch_params(size, alpha, beta, k, mirrored=True)


def lrn_params_from_caffe(local_size: int = 5, alpha: float = 1.0, beta: float = 0.75, k: float = 1.0) -> dict:
    r"""``lrn`` keyword arguments equal to Caffe's ``LRN`` layer, ``norm_region: ACROSS_CHANNELS``.

    Caffe computes

    .. math::

        b_i = a_i \Big(k + \frac{\alpha}{n} \sum_{j = i - (n-1)/2}^{i + (n-1)/2} a_j^2\Big)^{-\beta}

    with ``n = local_size``, which Caffe requires to be odd (so does this), the
    sum clipped to the channels.  Hence ``size = n``, ``kappa = k``,
    ``alpha = alpha / n`` (MatConvNet's manual warns of this ``N * alpha``), ``beta``.
    Caffe's ``WITHIN_CHANNEL`` (spatial) region is a different operation and not
    covered.
    """
    n = _args.positive_int(local_size, "local_size")
    if n % 2 == 0:
        raise ValueError(f"`local_size` (={local_size!r}) must be odd, as Caffe's LRN layer requires.")
    return dict(
        size=n,
        kappa=_real(k, "k", minimum=0.0),
        alpha=_real(alpha, "alpha", minimum=0.0) / n,
        beta=_real(beta, "beta"),
    )


def lrn_params_from_tensorflow(depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5) -> dict:
    r"""``lrn`` keyword arguments equal to ``tf.nn.local_response_normalization``.

    TensorFlow computes, over the last (depth) axis,

    .. math::

        \text{sqr\_sum}_d = \sum_{t = d - r}^{d + r} a_t^2, \qquad
        b_d = a_d\, (\text{bias} + \alpha\, \text{sqr\_sum}_d)^{-\beta}

    with ``r = depth_radius`` and the sum clipped to the channels: a centred
    window of ``2r + 1`` channels and ``alpha`` *not* divided by the window size.
    Hence ``size = 2 * depth_radius + 1``, ``kappa = bias``, ``alpha``, ``beta``.
    """
    r = _args.positive_int(depth_radius, "depth_radius", minimum=0)
    return dict(
        size=2 * r + 1,
        kappa=_real(bias, "bias", minimum=0.0),
        alpha=_real(alpha, "alpha", minimum=0.0),
        beta=_real(beta, "beta"),
    )
