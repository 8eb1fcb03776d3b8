r"""Network layers as ``(init_fun, apply_fun)`` pairs, stax style, on jaxconv's hand rules.

A layer is a pair of pure functions:

* ``init_fun(rng, input_shape) -> (output_shape, params)``: shape inference and
  initialisation.  ``input_shape`` includes the batch dimension, which may be
  ``-1`` (unknown); it is carried through unchanged.  ``params`` is a plain
  pytree: a dict ``{"w": ..., "b": ...}`` for a layer with weights, ``()`` for
  one without, a list of the children's params for a combinator.
* ``apply_fun(params, x, **kwargs) -> y``: the forward pass.  Every array
  operation is one of jaxconv's ops (``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``,
  ``max_pool1d/2d/3d``, ``avg_pool1d/2d/3d``, ``batch_norm``, ``lrn``, ``relu``,
  ``linear``, ``flatten``), whose backward passes are the
  hand-derived ``custom_vjp`` rules of docs/, so ``jax.grad`` of a network
  runs those rules and nothing else (besides the additions of ``FanInSum``).

Every ``apply_fun`` takes the keyword ``ops``: the namespace the ops are looked
up in, at call time.  The default is the ``jaxconv`` package (the hand rules);
``ops=jaxconv.reference`` runs the *same* network in plain ``lax``, differentiated
by autodiff: the oracle that ``jaxconv.verify.check_vjp`` compares a whole network
against::

    init, apply = serial(Conv(8, 3), Relu, Flatten, Dense(10))
    _, params = init(jax.random.key(0), (-1, 8, 8, 1))
    check_vjp(apply, partial(apply, ops=jaxconv.reference), params, x).assert_ok()

Layout is channels last: ``(N, W, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``;
kernels ``(*kernel, C // groups, O)`` (HWIO in 2-D); dense weights
``(D_in, D_out)`` (``y = x @ w + b``).

Spatial dimensions: :func:`Conv`, :func:`ConvTranspose`, :func:`MaxPool` and
:func:`AvgPool` take 1, 2 or 3 of them, as many as the kernel (window) tuple
has entries: ``Conv(8, (3,))`` is 1-D, ``Conv(8, (3, 3))`` 2-D,
``Conv(8, (3, 3, 3))`` 3-D.  An int kernel is 2-D (``Conv(8, 3)`` is ``3 x 3``
on images; Flax would read it as 1-D).  ``Conv1D``/``Conv2D``/``Conv3D`` (and
likewise ``ConvTranspose*``, ``MaxPool*``, ``AvgPool*``) fix the dimension, an
int then meaning that size in every dimension.  Geometry (``stride``,
``padding``, ``dilation``, ...) is keyword-only everywhere.

Initialisation (He et al. 2015, "He normal"): weights ``~ N(0, 2 / fan_in)``
with ``fan_in = KH * KW * C / groups`` for a convolution and ``D_in`` for a dense
layer, so that ReLU layers keep the activations' second moment; biases zero.
Parameters are float32 unless a constructor is given another ``dtype``
(whether or not ``jax_enable_x64`` is on, so a seed gives the same network).

Combinators: :func:`serial` (composition), :func:`parallel` (one layer per input
of a tuple), :func:`FanOut` (copy), :data:`FanInSum` (add), :data:`Identity`, and
:func:`residual`, ``x -> main(x) + shortcut(x)`` (He et al. 2016; the
ResNet head ``AvPool, 512`` is :data:`GlobalAvgPool`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from .. import ops
from .._core import args as _args
from .._core import window as _window
from ..ops import local_response

__all__ = [
    "ApplyFun",
    "InitFun",
    "Initializer",
    "Layer",
    "AvgPool",
    "AvgPool1D",
    "AvgPool2D",
    "AvgPool3D",
    "Conv",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "ConvTranspose",
    "ConvTranspose1D",
    "ConvTranspose2D",
    "ConvTranspose3D",
    "Dense",
    "FanInSum",
    "FanOut",
    "Flatten",
    "GlobalAvgPool",
    "Identity",
    "LRN",
    "MaxPool",
    "MaxPool1D",
    "MaxPool2D",
    "MaxPool3D",
    "BatchNorm",
    "Relu",
    "STATE_KEY",
    "he_normal",
    "merge_state",
    "has_state",
    "ones",
    "partition_state",
    "train_apply",
    "parallel",
    "residual",
    "serial",
    "zeros",
]


Shape = tuple[int, ...]
InitFun = Callable[[jax.Array, Any], tuple[Any, Any]]
"""``init_fun(rng, input_shape) -> (output_shape, params)``."""
ApplyFun = Callable[..., Any]
"""``apply_fun(params, x, **kwargs) -> y``."""
Layer = tuple[InitFun, ApplyFun]
"""A layer: its ``(init_fun, apply_fun)`` pair."""
Initializer = Callable[[jax.Array, Shape, Any, int], jax.Array]
"""``w_init(key, shape, dtype, fan_in) -> array``, e.g. :func:`he_normal`."""
Size = int | Sequence[int]
Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


class _HandOps:
    """The hand-rule ops, looked up at call time in :mod:`jaxconv.ops` (so a rule patched there is the one used)."""

    def __getattr__(self, name):
        return getattr(ops, name)


_HAND_OPS = _HandOps()


def _hand_ops():
    return _HAND_OPS


def _ops(kwargs):
    ops = kwargs.get("ops")
    return _hand_ops() if ops is None else ops


# --- initialisers ---------------------------------------------------------------


def he_normal(key: jax.Array, shape: Shape, dtype: DTypeLike, fan_in: int) -> jax.Array:
    """``N(0, 2 / fan_in)`` entries (He et al. 2015), the ReLU-preserving scale."""
    return jax.random.normal(key, shape, dtype) * jnp.asarray(math.sqrt(2.0 / fan_in), dtype)


def zeros(key: jax.Array, shape: Shape, dtype: DTypeLike, fan_in: int) -> jax.Array:
    """All zeros (e.g. the last convolution of a residual branch: the block starts as the identity)."""
    del key, fan_in
    return jnp.zeros(shape, dtype)


def ones(key: jax.Array, shape: Shape, dtype: DTypeLike, fan_in: int) -> jax.Array:
    """All ones (batch normalisation's default scale)."""
    del key, fan_in
    return jnp.ones(shape, dtype)


# --- shape checks ---------------------------------------------------------------


def _shape(input_shape, ndim: int, layer: str) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or any(d < 1 for d in shape[1:])
        or not (shape[0] == -1 or shape[0] >= 1)
    ):
        layout = {2: "(N, D)", 3: "(N, W, C)", 4: "(N, H, W, C)", 5: "(N, D, H, W, C)"}.get(ndim, f"rank {ndim}")
        raise ValueError(
            f"{layer}: `input_shape` (={input_shape!r}) must be {layout} with positive ints (the batch may be -1)."
        )
    return shape


def _precision_option(precision) -> dict:
    """``{"precision": p}`` for the op, checked now; ``{}`` for ``None`` (lax's default), so that an ``ops``
    namespace without the keyword runs a layer that does not ask for one."""
    precision = _args.precision(precision)
    return {} if precision is None else {"precision": precision}


def _dtype(dtype):
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` (={dtype}) must be a floating dtype.")
    return dtype


# --- layers with parameters -----------------------------------------------------

#: The largest number of spatial dimensions a layer takes (the ops come in 1, 2 and 3).
_MAX_SPATIAL = 3


def _spatial_ndim(value, name: str) -> int:
    """The spatial dimensions a layer's ``kernel`` or ``window`` implies: a sequence's length; an int is 2-D."""
    if _args._is_int(value):
        return 2
    if isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= _MAX_SPATIAL:
        return len(value)
    raise ValueError(
        f"`{name}` (={value!r}) must be an int (2-D) or a tuple of 1, 2 or 3 ints: its length is "
        "the number of spatial dimensions."
    )


def _layer_name(base: str, ndim: int) -> str:
    return base if ndim == 2 else f"{base}{ndim}D"


def _channels(out_channels, groups) -> tuple[int, int]:
    out_channels = _args.positive_int(out_channels, "out_channels")
    groups = _args.positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"`groups` (={groups}) must divide `out_channels` (={out_channels}).")
    return out_channels, groups


def _in_channels(name: str, c: int, groups: int) -> None:
    if c % groups:
        raise ValueError(f"{name}: input channels (={c}) must be divisible by `groups` (={groups}).")


def Conv(
    out_channels: int,
    kernel: Size,
    *,
    stride: Size = 1,
    padding: Padding = "VALID",
    dilation: Size = 1,
    groups: int = 1,
    bias: bool = True,
    w_init: Initializer = he_normal,
    dtype: DTypeLike = jnp.float32,
    precision: Any = None,
) -> Layer:
    """A convolution layer in 1, 2 or 3 spatial dimensions: ``y = conv(x, w, b, ...)`` (docs/convolution.md §1).

    The number of spatial dimensions is ``kernel``'s length: ``(KW,)`` is a
    1-D layer on ``(N, W, C)`` (:func:`jaxconv.conv1d`), ``(KH, KW)`` a 2-D one
    on ``(N, H, W, C)`` (:func:`jaxconv.conv2d`), ``(KD, KH, KW)`` a 3-D one on
    ``(N, D, H, W, C)`` (:func:`jaxconv.conv3d`).  An int kernel is 2-D, a
    square ``k x k`` filter (images are the common case; note that Flax reads
    an int as 1-D).  :func:`Conv1D`, :func:`Conv2D` and :func:`Conv3D` fix the
    dimension, and there an int means the same size in every dimension.

    ``S_i = X * F_i + b_i``: each of the ``out_channels`` filters slides over
    the input and adds its bias.

    Args:
      out_channels: ``O``, the number of filters.
      kernel: the filter's spatial size, an int (2-D) or one int per spatial dimension.
      stride: an int or one per dimension.
      padding: ``"VALID"``, ``"SAME"``, an int, one int per dimension or one
        ``(lo, hi)`` pair per dimension, as :func:`jaxconv.conv2d`.
      dilation: an int or one per dimension.
      groups: the channel groups; must divide the input channels and ``out_channels``.
      bias: whether to add a per-channel bias (zero-initialised).
      w_init: ``w_init(key, shape, dtype, fan_in)``; default :func:`he_normal`
        with ``fan_in = prod(kernel) * C / groups``.
      dtype: the parameters' dtype.
      precision: the products' precision, forward and backward, as :func:`jaxconv.conv2d`
        takes it (``None``: lax's default; ``"highest"``, a :class:`jax.lax.Precision`, ...).

    Returns:
      ``(init_fun, apply_fun)``.  Params ``{"w": (*kernel, C // groups, O), "b": (O,)}``
      (no ``"b"`` when ``bias=False``); output ``(N, *out, O)`` with each
      ``out = floor((n + lo + hi - dilation*(k - 1) - 1) / stride) + 1``.
    """
    ndim = _spatial_ndim(kernel, "kernel")
    out_channels, groups = _channels(out_channels, groups)
    kernel = _window.ints(kernel, "kernel", ndim)
    stride = _window.ints(stride, "stride", ndim)
    dilation = _window.ints(dilation, "dilation", ndim)
    dtype = _dtype(dtype)
    _window.padding(padding, (1,) * ndim, kernel, stride, dilation)  # validates the form early
    options = _precision_option(precision)
    name = _layer_name("Conv", ndim)

    def init_fun(rng, input_shape):
        n, *spatial, c = _shape(input_shape, ndim + 2, name)
        _in_channels(name, c, groups)
        window = _window.parse(tuple(spatial), kernel, stride, padding, dilation, kernel_name="kernel")
        w_shape = (*kernel, c // groups, out_channels)
        params = {"w": w_init(rng, w_shape, dtype, math.prod(kernel) * (c // groups))}
        if bias:
            params["b"] = jnp.zeros((out_channels,), dtype)
        return (n, *window.out_size, out_channels), params

    def apply_fun(params, x, **kwargs):
        op = getattr(_ops(kwargs), f"conv{ndim}d")
        return op(
            x, params["w"], params.get("b"), stride=stride, padding=padding, dilation=dilation, groups=groups, **options
        )

    return init_fun, apply_fun


def Conv1D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`Conv` on ``(N, W, C)``: ``kernel`` an int or ``(KW,)``; the keyword options as :func:`Conv`."""
    return Conv(out_channels, _window.ints(kernel, "kernel", 1), **options)


def Conv2D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`Conv` on ``(N, H, W, C)``: ``kernel`` an int or ``(KH, KW)``; the keyword options as :func:`Conv`."""
    return Conv(out_channels, _window.ints(kernel, "kernel", 2), **options)


def Conv3D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`Conv` on ``(N, D, H, W, C)``: ``kernel`` an int or ``(KD, KH, KW)``; the options as :func:`Conv`."""
    return Conv(out_channels, _window.ints(kernel, "kernel", 3), **options)


def ConvTranspose(
    out_channels: int,
    kernel: Size,
    *,
    stride: Size = 1,
    padding: Padding = "VALID",
    output_padding: Size = 0,
    dilation: Size = 1,
    groups: int = 1,
    bias: bool = True,
    w_init: Initializer = he_normal,
    dtype: DTypeLike = jnp.float32,
    precision: Any = None,
) -> Layer:
    """A transposed convolution layer in 1, 2 or 3 spatial dimensions (docs/convolution.md §6).

    :func:`jaxconv.conv_transpose1d`, ``2d`` or ``3d`` by ``kernel``'s length,
    an int kernel being 2-D, as :func:`Conv`; :func:`ConvTranspose1D`,
    :func:`ConvTranspose2D` and :func:`ConvTranspose3D` fix the dimension.
    It is the adjoint of a :func:`Conv` with ``out_channels`` input channels
    (a learnable upsampling): ``(N, *spatial, C_in) -> (N, *out, out_channels)``,
    each ``out = (n - 1)*stride - lo - hi + dilation*(k - 1) + 1 + output_padding``
    (``"SAME"``: ``(n - 1)*stride + 1 + output_padding``).

    Args:
      out_channels: the output channels (the convolution's input channels).
      kernel: an int (2-D) or one int per spatial dimension.
      stride: an int or one per dimension.
      padding: the convolution's: ``"VALID"`` (default), ``"SAME"`` (the adjoint
        of a ``"SAME"`` convolution), or amounts cropped off the output here: an
        int, one per dimension or one ``(lo, hi)`` pair per dimension.
      output_padding: extra output entries at the high end, each ``< stride``
        (``stride - 1`` with ``"SAME"`` gives ``n * stride``).
      dilation: an int or one per dimension.
      groups: the channel groups; must divide the input channels and ``out_channels``.
      bias: whether to add a per-channel bias (zero-initialised).
      w_init: default :func:`he_normal` with ``fan_in = prod(kernel) * C_in / groups``.
      dtype: the parameters' dtype.
      precision: as :func:`Conv`.

    Returns:
      ``(init_fun, apply_fun)``.  Params ``{"w": (*kernel, out_channels // groups, C_in),
      "b": (out_channels,)}``: ``w`` in the convolution's layout, as the op takes it.
    """
    ndim = _spatial_ndim(kernel, "kernel")
    out_channels, groups = _channels(out_channels, groups)
    kernel = _window.ints(kernel, "kernel", ndim)
    stride = _window.ints(stride, "stride", ndim)
    dilation = _window.ints(dilation, "dilation", ndim)
    output_padding = _window.ints(output_padding, "output_padding", ndim, minimum=0)
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(
            f"`output_padding` (={output_padding}) must be smaller than `stride` (={stride}) in every dimension."
        )
    same = isinstance(padding, str) and padding.upper() == "SAME"
    pads = _window.padding(padding, (1,) * ndim, kernel, stride, dilation)  # validates the form early
    dtype = _dtype(dtype)
    options = _precision_option(precision)
    name = _layer_name("ConvTranspose", ndim)

    def init_fun(rng, input_shape):
        n, *spatial, c = _shape(input_shape, ndim + 2, name)
        _in_channels(name, c, groups)
        if same:
            out = tuple((size - 1) * s + 1 + op for size, s, op in zip(spatial, stride, output_padding))
        else:
            out = tuple(
                (size - 1) * s - lo - hi + d * (k - 1) + 1 + op
                for size, (lo, hi), k, s, d, op in zip(spatial, pads, kernel, stride, dilation, output_padding)
            )
        if min(out) < 1:
            raise ValueError(
                f"{name}: `padding` (={padding!r}) crops the whole output of an input "
                f"{tuple(spatial)} (size {out} before it is refused)."
            )
        w_shape = (*kernel, out_channels // groups, c)
        params = {"w": w_init(rng, w_shape, dtype, math.prod(kernel) * (c // groups))}
        if bias:
            params["b"] = jnp.zeros((out_channels,), dtype)
        return (n, *out, out_channels), params

    def apply_fun(params, x, **kwargs):
        op = getattr(_ops(kwargs), f"conv_transpose{ndim}d")
        return op(
            x,
            params["w"],
            params.get("b"),
            stride=stride,
            padding="SAME" if same else pads,
            output_padding=output_padding,
            dilation=dilation,
            groups=groups,
            **options,
        )

    return init_fun, apply_fun


def ConvTranspose1D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`ConvTranspose` on ``(N, W, C)``: ``kernel`` an int or ``(KW,)``; options as :func:`ConvTranspose`."""
    return ConvTranspose(out_channels, _window.ints(kernel, "kernel", 1), **options)


def ConvTranspose2D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`ConvTranspose` on ``(N, H, W, C)``: ``kernel`` an int or a pair; options as :func:`ConvTranspose`."""
    return ConvTranspose(out_channels, _window.ints(kernel, "kernel", 2), **options)


def ConvTranspose3D(out_channels: int, kernel: Size, **options: Any) -> Layer:
    """:func:`ConvTranspose` on ``(N, D, H, W, C)``: ``kernel`` an int or a triple; options as :func:`ConvTranspose`."""
    return ConvTranspose(out_channels, _window.ints(kernel, "kernel", 3), **options)


def Dense(
    out_dim: int,
    *,
    bias: bool = True,
    w_init: Initializer = he_normal,
    dtype: DTypeLike = jnp.float32,
    precision: Any = None,
) -> Layer:
    """A fully connected layer ``y = x @ w + b`` (``s = W vec(H) + b``, as rows; docs/layers.md, Fully connected layer).

    Input ``(N, D_in)`` (put :data:`Flatten` before it); params
    ``{"w": (D_in, out_dim), "b": (out_dim,)}``; He-normal ``w`` with ``fan_in = D_in``.
    ``precision``: the product's, forward and backward, as :func:`jaxconv.linear` takes it
    (``None``: lax's default).
    """
    out_dim = _args.positive_int(out_dim, "out_dim")
    dtype = _dtype(dtype)
    options = _precision_option(precision)

    def init_fun(rng, input_shape):
        n, d = _shape(input_shape, 2, "Dense")
        params = {"w": w_init(rng, (d, out_dim), dtype, d)}
        if bias:
            params["b"] = jnp.zeros((out_dim,), dtype)
        return (n, out_dim), params

    def apply_fun(params, x, **kwargs):
        return _ops(kwargs).linear(x, params["w"], params.get("b"), **options)

    return init_fun, apply_fun


# --- batch normalisation and layer state --------------------------------------------

STATE_KEY = "batch_stats"
"""The key under which a layer keeps its non-trainable state (running statistics) in its params dict:
Flax's name for the collection."""


def BatchNorm(
    *, momentum: float = 0.1, eps: float = 1e-5, scale_init: Initializer | None = None, dtype: DTypeLike = jnp.float32
) -> Layer:
    r"""Batch normalisation over every axis but the last (channels), with running statistics for inference.

    Params: ``{"scale": (C,), "offset": (C,), "batch_stats": {"mean": (C,), "var": (C,)}}``;
    ``scale`` starts at ones (or ``scale_init``, e.g. :func:`zeros` for the last
    normalisation of a residual branch), ``offset`` at zeros, the running
    ``mean`` at 0 and ``var`` at 1.  ``batch_stats`` is *state*, not a weight:
    no gradient reaches it and no optimizer updates it (:func:`partition_state`
    splits it off).

    Two modes, chosen by the keyword ``train`` of ``apply_fun`` (default ``False``):

    * ``train=True``: :func:`jaxconv.batch_norm` with the batch's own statistics
      (biased variance; the hand-derived backward of docs/layers.md).  Run the
      network through :func:`train_apply` to get the updated running statistics
      back, with PyTorch's convention: ``running <- (1 - momentum) * running +
      momentum * batch``, using the *unbiased* batch variance ``var * m / (m - 1)``
      (``m`` entries per channel) for the running variance.
    * ``train=False`` (evaluation, inference): ``scale * (x - mean) / sqrt(var +
      eps) + offset`` with the running statistics, an elementwise affine map
      (differentiated by autodiff; it has no batch coupling to hand-derive).

    ``momentum`` in ``(0, 1]``, ``eps > 0``.  Inputs ``(N, ..., C)`` of any rank >= 2.
    """
    momentum = _unit_interval(momentum, "momentum")
    eps = _positive_real(eps, "eps")
    dtype = _dtype(dtype)
    scale_init = ones if scale_init is None else scale_init

    def init_fun(rng, input_shape):
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
        if shape is None or len(shape) < 2:
            raise ValueError(f"BatchNorm: `input_shape` (={input_shape!r}) must be (N, ..., C), rank >= 2.")
        _shape(shape, len(shape), "BatchNorm")
        c = shape[-1]
        params = {
            "scale": scale_init(rng, (c,), dtype, c),
            "offset": jnp.zeros((c,), dtype),
            STATE_KEY: {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)},
        }
        return shape, params

    def apply_fun(params, x, **kwargs):
        stats = params[STATE_KEY]
        if not kwargs.get("train", False):
            inv = jax.lax.rsqrt(stats["var"] + jnp.asarray(eps, stats["var"].dtype))
            return (x - stats["mean"]) * (inv * params["scale"]) + params["offset"]
        y = _ops(kwargs).batch_norm(x, params["scale"], params["offset"], eps=eps)
        updates = kwargs.get("state_updates")
        if updates is not None:
            axes = tuple(range(jnp.ndim(x) - 1))
            m = math.prod(jnp.shape(x)[:-1])
            xs = jax.lax.stop_gradient(x)
            mean = jnp.mean(xs, axis=axes)
            var = jnp.mean(jnp.square(xs - mean), axis=axes) * (m / max(m - 1, 1))
            mom = jnp.asarray(momentum, stats["mean"].dtype)
            if id(stats["mean"]) in updates:
                raise ValueError(
                    "BatchNorm: one `batch_stats` array is used by two layers (or one layer twice); "
                    "each BatchNorm needs its own running statistics."
                )
            updates[id(stats["mean"])] = {
                "mean": (1 - mom) * stats["mean"] + mom * mean.astype(stats["mean"].dtype),
                "var": (1 - mom) * stats["var"] + mom * var.astype(stats["var"].dtype),
            }
        return y

    return init_fun, apply_fun


def _unit_interval(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"`{name}` (={value!r}) must be a number in (0, 1].")
    return float(value)


def _positive_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` (={value!r}) must be a finite number > 0.")
    return float(value)


def has_state(params: Any) -> bool:
    """Whether ``params`` holds layer state (a batch norm's running statistics): such a model applies with
    ``train=``."""
    if isinstance(params, dict):
        return STATE_KEY in params or any(has_state(v) for v in params.values())
    if isinstance(params, (list, tuple)):
        return any(has_state(v) for v in params)
    return False


def partition_state(params: Any) -> tuple[Any, Any]:
    """Split params into ``(trainable, state)``: the weights, and the layers' ``batch_stats``.

    Both keep the params' nesting (lists, tuples, dicts): ``trainable`` drops
    every ``"batch_stats"`` entry, ``state`` keeps only those (and empty
    containers elsewhere).  ``merge_state(*partition_state(p))`` is ``p``.  A
    network without :func:`BatchNorm` has an empty state and ``trainable`` is
    ``params`` unchanged, so optimizers and checkpoints of stateless networks
    are unaffected.  Differentiate and optimise ``trainable`` only.
    """
    if isinstance(params, dict):
        parts = {k: partition_state(v) for k, v in params.items() if k != STATE_KEY}
        trainable = {k: t for k, (t, _) in parts.items()}
        state = {k: s for k, (_, s) in parts.items()}
        if STATE_KEY in params:
            state[STATE_KEY] = params[STATE_KEY]
        return trainable, state
    if isinstance(params, (list, tuple)):
        pairs = [partition_state(v) for v in params]
        return type(params)(t for t, _ in pairs), type(params)(s for _, s in pairs)
    return params, None


def merge_state(trainable: Any, state: Any) -> Any:
    """The inverse of :func:`partition_state`: the full params from weights and state."""
    if isinstance(trainable, dict):
        if not isinstance(state, dict):
            raise ValueError(f"merge_state: `state` does not match `trainable` (a dict vs {type(state).__name__}).")
        merged = {k: merge_state(v, state.get(k)) for k, v in trainable.items()}
        if STATE_KEY in state:
            merged[STATE_KEY] = state[STATE_KEY]
        return merged
    if isinstance(trainable, (list, tuple)):
        if not isinstance(state, (list, tuple)) or len(state) != len(trainable):
            raise ValueError("merge_state: `state` does not have `trainable`'s nesting.")
        return type(trainable)(merge_state(t, s) for t, s in zip(trainable, state))
    return trainable


def train_apply(apply_fun: ApplyFun, params: Any, x: ArrayLike, **kwargs: Any) -> tuple[Any, Any]:
    """Run a network in training mode: ``(y, new_params)`` with the running statistics updated.

    ``apply_fun(params, x, train=True, ...)``: every :func:`BatchNorm`
    normalises with the batch's statistics and reports its new running
    statistics, which replace the old ones in ``new_params`` (the weights are
    the same arrays).  Pure: call it inside ``jax.jit`` / ``jax.grad`` (the
    state is not differentiated: ``stop_gradient``).  A network without state
    is called as ``apply_fun(params, x, **kwargs)``, unchanged.
    """
    if not has_state(params):
        return apply_fun(params, x, **kwargs), params
    updates: dict = {}
    y = apply_fun(params, x, train=True, state_updates=updates, **kwargs)

    def replace(tree):
        if isinstance(tree, dict):
            out = {k: replace(v) for k, v in tree.items() if k != STATE_KEY}
            if STATE_KEY in tree:
                stats = tree[STATE_KEY]
                key = id(stats["mean"]) if isinstance(stats, dict) and "mean" in stats else None
                out[STATE_KEY] = updates.get(key, stats)
            return out
        if isinstance(tree, (list, tuple)):
            return type(tree)(replace(v) for v in tree)
        return tree

    return y, replace(params)


# --- layers without parameters --------------------------------------------------


def _stateless(op_name: str, out_shape, ndim: int | None = None, *, name: str | None = None, **options) -> Layer:
    def init_fun(rng, input_shape):
        del rng
        if ndim is not None:
            _shape(input_shape, ndim, name or op_name)
        return out_shape(tuple(input_shape)), ()

    def apply_fun(params, x, **kwargs):
        del params
        return getattr(_ops(kwargs), op_name)(x, **options)

    return init_fun, apply_fun


def _pool(kind: str, window, stride, padding, **options):
    ndim = _spatial_ndim(window, "window")
    window = _window.ints(window, "window", ndim)
    stride = window if stride is None else _window.ints(stride, "stride", ndim)
    if not isinstance(padding, str):  # "SAME" always satisfies the rule; explicit amounts are checked now
        _window.check_pool_padding(padding, _window.padding(padding, (1,) * ndim, window, stride, (1,) * ndim), window)
    name = _layer_name({"max": "MaxPool", "avg": "AvgPool"}[kind], ndim)

    def out_shape(shape):
        n, *spatial, c = shape
        win = _window.parse(tuple(spatial), window, stride, padding, kernel_name="window", pool=True)
        return (n, *win.out_size, c)

    return _stateless(
        f"{kind}_pool{ndim}d", out_shape, ndim + 2, name=name, window=window, stride=stride, padding=padding, **options
    )


def MaxPool(window: Size, *, stride: Size | None = None, padding: Padding = "VALID") -> Layer:
    """Max pooling in 1, 2 or 3 spatial dimensions, :func:`jaxconv.max_pool2d` etc. (docs/pooling.md §4).

    The number of spatial dimensions is ``window``'s length, an int window
    being 2-D (``k x k``), as :func:`Conv`: ``(k,)`` pools ``(N, W, C)``,
    ``(kh, kw)`` ``(N, H, W, C)``, ``(kd, kh, kw)`` ``(N, D, H, W, C)``.
    :func:`MaxPool1D`, :func:`MaxPool2D` and :func:`MaxPool3D` fix the dimension.

    Args:
      window: an int (2-D) or one int per spatial dimension.
      stride: an int or one per dimension; ``None`` (default) means the window.
      padding: ``"VALID"``, ``"SAME"``, an int, one per dimension or ``(lo, hi)``
        pairs; each side at most half the window.
    """
    return _pool("max", window, stride, padding)


def AvgPool(
    window: Size, *, stride: Size | None = None, padding: Padding = "VALID", count_include_pad: bool = True
) -> Layer:
    """Average pooling in 1, 2 or 3 spatial dimensions, :func:`jaxconv.avg_pool2d` etc. (docs/pooling.md §2).

    Dimensions by ``window``'s length, an int being 2-D, as :func:`MaxPool`;
    :func:`AvgPool1D`, :func:`AvgPool2D` and :func:`AvgPool3D` fix the dimension.

    Args:
      window: an int (2-D) or one int per spatial dimension.
      stride: an int or one per dimension; ``None`` (default) means the window.
      padding: as :func:`MaxPool`.
      count_include_pad: whether padded entries count in each window's divisor.
    """
    return _pool("avg", window, stride, padding, count_include_pad=bool(count_include_pad))


def MaxPool1D(window: Size, **options: Any) -> Layer:
    """:func:`MaxPool` over ``(N, W, C)``: ``window`` an int or ``(k,)``; the keyword options as :func:`MaxPool`."""
    return MaxPool(_window.ints(window, "window", 1), **options)


def MaxPool2D(window: Size, **options: Any) -> Layer:
    """:func:`MaxPool` over ``(N, H, W, C)``: ``window`` an int or a pair; the keyword options as :func:`MaxPool`."""
    return MaxPool(_window.ints(window, "window", 2), **options)


def MaxPool3D(window: Size, **options: Any) -> Layer:
    """:func:`MaxPool` over ``(N, D, H, W, C)``: ``window`` an int or a triple; the options as :func:`MaxPool`."""
    return MaxPool(_window.ints(window, "window", 3), **options)


def AvgPool1D(window: Size, **options: Any) -> Layer:
    """:func:`AvgPool` over ``(N, W, C)``: ``window`` an int or ``(k,)``; the keyword options as :func:`AvgPool`."""
    return AvgPool(_window.ints(window, "window", 1), **options)


def AvgPool2D(window: Size, **options: Any) -> Layer:
    """:func:`AvgPool` over ``(N, H, W, C)``: ``window`` an int or a pair; the keyword options as :func:`AvgPool`."""
    return AvgPool(_window.ints(window, "window", 2), **options)


def AvgPool3D(window: Size, **options: Any) -> Layer:
    """:func:`AvgPool` over ``(N, D, H, W, C)``: ``window`` an int or a triple; the options as :func:`AvgPool`."""
    return AvgPool(_window.ints(window, "window", 3), **options)


def LRN(size: int = 5, kappa: float = 2.0, alpha: float = 1e-4, beta: float = 0.75) -> Layer:
    """Local response normalisation across channels, :func:`jaxconv.lrn` (AlexNet; docs/layers.md)."""
    lrn_module = local_response
    # Validate now, with lrn's own checks, rather than at the first apply.
    _args.positive_int(size, "size")
    lrn_module._real(kappa, "kappa", minimum=0.0)
    lrn_module._real(alpha, "alpha", minimum=0.0)
    lrn_module._real(beta, "beta")
    return _stateless("lrn", lambda shape: shape, 4, size=size, kappa=kappa, alpha=alpha, beta=beta)


Relu = _stateless("relu", lambda shape: shape)
"""ReLU, :func:`jaxconv.relu` (docs/layers.md, ReLU); any shape."""


def _flat_shape(shape):
    if len(shape) < 1 or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"Flatten: `input_shape` (={shape!r}) must be (N, ...) with int dimensions.")
    return (shape[0], math.prod(shape[1:]))


Flatten = _stateless("flatten", _flat_shape)
"""``(N, ...) -> (N, prod(...))``, row-major, :func:`jaxconv.flatten` (docs/layers.md, Flatten and vectorisation)."""


def _global_avg_pool() -> Layer:
    def init_fun(rng, input_shape):
        del rng
        n, _, _, c = _shape(input_shape, 4, "GlobalAvgPool")
        return (n, c), ()

    def apply_fun(params, x, **kwargs):
        del params
        ops = _ops(kwargs)
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"GlobalAvgPool: `x` must be (N, H, W, C), got shape {jnp.shape(x)}.")
        pooled = ops.avg_pool2d(x, x.shape[1:3])
        return ops.flatten(pooled)

    return init_fun, apply_fun


GlobalAvgPool = _global_avg_pool()
"""Global average pooling ``(N, H, W, C) -> (N, C)``: an :func:`jaxconv.avg_pool2d`
whose window is the whole image, then :func:`jaxconv.flatten` (ResNet's ``AvPool, 512``; docs/pooling.md §3).
Backward: each pixel gets ``g_{n,c} / (H W)``."""


# --- combinators ----------------------------------------------------------------


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right; params are a list, one entry per layer."""
    if not layers:
        raise ValueError("serial: needs at least one layer.")
    init_funs, apply_funs = zip(*layers)

    def init_fun(rng, input_shape):
        params = []
        for init, key in zip(init_funs, jax.random.split(rng, len(init_funs))):
            input_shape, layer_params = init(key, input_shape)
            params.append(layer_params)
        return input_shape, params

    def apply_fun(params, x, **kwargs):
        if len(params) != len(apply_funs):
            raise ValueError(f"serial: got {len(params)} param entries for {len(apply_funs)} layers.")
        for apply, layer_params in zip(apply_funs, params):
            x = apply(layer_params, x, **kwargs)
        return x

    return init_fun, apply_fun


def parallel(*layers: Layer) -> Layer:
    """Apply layer ``i`` to input ``i`` of a tuple; params are a list, one per layer."""
    if not layers:
        raise ValueError("parallel: needs at least one layer.")
    init_funs, apply_funs = zip(*layers)

    def init_fun(rng, input_shape):
        if (
            not isinstance(input_shape, (tuple, list))
            or len(input_shape) != len(layers)
            or not all(isinstance(s, (tuple, list)) for s in input_shape)
        ):
            raise ValueError(f"parallel: `input_shape` (={input_shape!r}) must be a tuple of {len(layers)} shapes.")
        keys = jax.random.split(rng, len(layers))
        outputs = [init(key, shape) for init, key, shape in zip(init_funs, keys, input_shape)]
        return tuple(shape for shape, _ in outputs), [p for _, p in outputs]

    def apply_fun(params, xs, **kwargs):
        return tuple(apply(p, x, **kwargs) for apply, p, x in zip(apply_funs, params, xs))

    return init_fun, apply_fun


def FanOut(num: int) -> Layer:
    """``x -> (x, ..., x)``, ``num`` copies (their gradients add)."""
    num = _args.positive_int(num, "num")
    return (lambda rng, input_shape: ((tuple(input_shape),) * num, ())), (lambda params, x, **kwargs: (x,) * num)


def _fan_in_sum() -> Layer:
    def init_fun(rng, input_shapes):
        shapes = {tuple(s) for s in input_shapes}
        if len(shapes) != 1:
            raise ValueError(f"FanInSum: the branches' shapes differ: {list(input_shapes)!r}.")
        return shapes.pop(), ()

    def apply_fun(params, xs, **kwargs):
        return sum(xs[1:], xs[0])

    return init_fun, apply_fun


FanInSum = _fan_in_sum()
"""``(x_1, ..., x_k) -> x_1 + ... + x_k``; the branches must have one shape."""

Identity: Layer = (lambda rng, input_shape: (tuple(input_shape), ())), (lambda params, x, **kwargs: x)
"""``x -> x``."""


def residual(*layers: Layer, shortcut: Layer | None = None) -> Layer:
    """``x -> serial(*layers)(x) + shortcut(x)`` (He et al. 2016's residual block).

    ``shortcut`` defaults to :data:`Identity`; give a layer (e.g. a strided 1x1
    :func:`Conv`) where the main branch changes the shape.  Params:
    ``[(), [main_params, shortcut_params], ()]``.
    """
    return serial(FanOut(2), parallel(serial(*layers), Identity if shortcut is None else shortcut), FanInSum)
