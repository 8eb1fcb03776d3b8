r"""Network layers as ``(init_fun, apply_fun)`` pairs, stax style, on jaxconv's hand rules.

A layer is a pair of pure functions:

* ``init_fun(rng, input_shape) -> (output_shape, params)``: shape inference and
  initialisation.  ``input_shape`` includes the batch dimension, which may be
  ``-1`` (unknown); it is carried through unchanged.  ``params`` is a plain
  pytree: a dict ``{"w": ..., "b": ...}`` for a layer with weights, ``()`` for
  one without, a list of the children's params for a combinator.
* ``apply_fun(params, x, **kwargs) -> y``: the forward pass.  Every array
  operation is one of jaxconv's ops (``conv2d``, ``max_pool2d``, ``avg_pool2d``,
  ``lrn``, ``relu``, ``linear``, ``flatten``), whose backward passes are the
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

Layout is NHWC; kernels HWIO ``(KH, KW, C // groups, O)``; dense weights
``(D_in, D_out)`` (``y = x @ w + b``).

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

import jax
import jax.numpy as jnp

from .. import ops
from .._core import args as _args
from .._core import window as _window
from ..ops import local_response

__all__ = [
    "AvgPool",
    "AvgPool1D",
    "AvgPool2D",
    "AvgPool3D",
    "Conv",
    "Conv1D",
    "Conv2D",
    "Conv3D",
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


def he_normal(key, shape, dtype, fan_in: int):
    """``N(0, 2 / fan_in)`` entries (He et al. 2015), the ReLU-preserving scale."""
    return jax.random.normal(key, shape, dtype) * jnp.asarray(math.sqrt(2.0 / fan_in), dtype)


def zeros(key, shape, dtype, fan_in: int):
    """All zeros (e.g. the last convolution of a residual branch: the block starts as the identity)."""
    del key, fan_in
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype, fan_in: int):
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
            f"{layer}: `input_shape` (={input_shape!r}) must be {layout} with positive ints "
            f"(the batch may be -1)."
        )
    return shape


def _dtype(dtype):
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` (={dtype}) must be a floating dtype.")
    return dtype


# --- layers with parameters -----------------------------------------------------


def _conv_layer(ndim: int, out_channels, kernel, stride, padding, dilation, groups, bias, w_init, dtype):
    out_channels = _args.positive_int(out_channels, "out_channels")
    kernel = _window.ints(kernel, "kernel", ndim)
    stride = _window.ints(stride, "stride", ndim)
    dilation = _window.ints(dilation, "dilation", ndim)
    groups = _args.positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"`groups` (={groups}) must divide `out_channels` (={out_channels}).")
    dtype = _dtype(dtype)
    _window.padding(padding, (1,) * ndim, kernel, stride, dilation)  # validates the form early
    name = f"Conv{ndim}D" if ndim != 2 else "Conv"

    def init_fun(rng, input_shape):
        n, *spatial, c = _shape(input_shape, ndim + 2, name)
        if c % groups:
            raise ValueError(f"{name}: input channels (={c}) must be divisible by `groups` (={groups}).")
        window = _window.parse(tuple(spatial), kernel, stride, padding, dilation, kernel_name="kernel")
        w_shape = (*kernel, c // groups, out_channels)
        params = {"w": w_init(rng, w_shape, dtype, math.prod(kernel) * (c // groups))}
        if bias:
            params["b"] = jnp.zeros((out_channels,), dtype)
        return (n, *window.out_size, out_channels), params

    def apply_fun(params, x, **kwargs):
        op = getattr(_ops(kwargs), f"conv{ndim}d")
        return op(x, params["w"], params.get("b"), stride=stride, padding=padding, dilation=dilation, groups=groups)

    return init_fun, apply_fun


def Conv(out_channels, kernel, *, stride=1, padding="VALID", dilation=1, groups=1, bias=True,
         w_init=he_normal, dtype=jnp.float32):
    """A 2-D convolution layer: ``y = conv2d(x, w, b, ...)`` (``S_i = X * F_i + b_i``, docs/convolution.md §1).

    Args:
      out_channels: ``O``, the number of filters.
      kernel: ``(KH, KW)``, int or pair.
      stride, padding, dilation, groups: as :func:`jaxconv.conv2d`.
      bias: whether to add a per-channel bias (zero-initialised).
      w_init: ``w_init(key, shape, dtype, fan_in)``; default :func:`he_normal`
        with ``fan_in = KH * KW * C / groups``.
      dtype: the parameters' dtype.

    Params: ``{"w": (KH, KW, C // groups, O), "b": (O,)}`` (no ``"b"`` when ``bias=False``).
    Output shape ``(N, Ho, Wo, O)`` with conv2d's output-size formula.
    :func:`Conv1D` and :func:`Conv3D` are the same layer on ``(N, W, C)`` and
    ``(N, D, H, W, C)`` inputs (:func:`jaxconv.conv1d`, :func:`jaxconv.conv3d`).
    """
    return _conv_layer(2, out_channels, kernel, stride, padding, dilation, groups, bias, w_init, dtype)


def Conv1D(out_channels, kernel, *, stride=1, padding="VALID", dilation=1, groups=1, bias=True,
           w_init=he_normal, dtype=jnp.float32):
    """A 1-D convolution layer on ``(N, W, C)``, :func:`jaxconv.conv1d`; arguments as :func:`Conv`."""
    return _conv_layer(1, out_channels, kernel, stride, padding, dilation, groups, bias, w_init, dtype)


#: The 2-D convolution layer, :func:`Conv`.
Conv2D = Conv


def Conv3D(out_channels, kernel, *, stride=1, padding="VALID", dilation=1, groups=1, bias=True,
           w_init=he_normal, dtype=jnp.float32):
    """A 3-D convolution layer on ``(N, D, H, W, C)``, :func:`jaxconv.conv3d`; arguments as :func:`Conv`."""
    return _conv_layer(3, out_channels, kernel, stride, padding, dilation, groups, bias, w_init, dtype)


def _conv_transpose_layer(ndim: int, out_channels, kernel, stride, padding, output_padding, dilation, groups,
                          bias, w_init, dtype):
    out_channels = _args.positive_int(out_channels, "out_channels")
    kernel = _window.ints(kernel, "kernel", ndim)
    stride = _window.ints(stride, "stride", ndim)
    dilation = _window.ints(dilation, "dilation", ndim)
    output_padding = _window.ints(output_padding, "output_padding", ndim, minimum=0)
    groups = _args.positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"`groups` (={groups}) must divide `out_channels` (={out_channels}).")
    if isinstance(padding, str) and padding.upper() == "SAME":
        raise ValueError("`padding` (='SAME') is not defined for a transposed convolution: give the amounts.")
    pads = _window.padding(padding, (1,) * ndim, kernel, stride, dilation)
    dtype = _dtype(dtype)
    name = f"ConvTranspose{ndim}D"

    def init_fun(rng, input_shape):
        n, *spatial, c = _shape(input_shape, ndim + 2, name)
        if c % groups:
            raise ValueError(f"{name}: input channels (={c}) must be divisible by `groups` (={groups}).")
        w_shape = (*kernel, out_channels // groups, c)
        params = {"w": w_init(rng, w_shape, dtype, math.prod(kernel) * (c // groups))}
        if bias:
            params["b"] = jnp.zeros((out_channels,), dtype)
        out = jax.eval_shape(
            lambda y, w: getattr(_hand_ops(), f"conv_transpose{ndim}d")(
                y, w, stride=stride, padding=pads, output_padding=output_padding, dilation=dilation, groups=groups),
            jax.ShapeDtypeStruct((1, *spatial, c), dtype), jax.ShapeDtypeStruct(w_shape, dtype),
        ).shape
        return (n, *out[1:]), params

    def apply_fun(params, x, **kwargs):
        op = getattr(_ops(kwargs), f"conv_transpose{ndim}d")
        return op(x, params["w"], params.get("b"), stride=stride, padding=pads, output_padding=output_padding,
                  dilation=dilation, groups=groups)

    return init_fun, apply_fun


_CONV_TRANSPOSE_DOC = """A {n}-D transposed convolution layer, :func:`jaxconv.conv_transpose{n}d` (docs/convolution.md §6).

    The adjoint of a :func:`{conv}` with ``out_channels`` input channels: it
    maps ``(N, {spatial}, C_in)`` to ``(N, {spatial_out}, out_channels)``, each
    size ``(n - 1)*s - lo - hi + d*(k - 1) + 1 + output_padding``
    (a learnable upsampling).

    Args:
      out_channels: the output channels (the convolution's input channels).
      kernel: int or one per dimension.
      stride, padding, output_padding, dilation, groups: as
        :func:`jaxconv.conv_transpose{n}d` (padding: amounts, not ``"SAME"``).
      bias: whether to add a per-channel bias (zero-initialised).
      w_init: default :func:`he_normal` with ``fan_in = prod(kernel) * C_in / groups``.
      dtype: the parameters' dtype.

    Params: ``{{"w": (*kernel, out_channels // groups, C_in), "b": (out_channels,)}}``:
    ``w`` in the convolution's layout, as the op takes it.
    """


def ConvTranspose1D(out_channels, kernel, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                    bias=True, w_init=he_normal, dtype=jnp.float32):
    return _conv_transpose_layer(1, out_channels, kernel, stride, padding, output_padding, dilation, groups, bias,
                                 w_init, dtype)


def ConvTranspose2D(out_channels, kernel, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                    bias=True, w_init=he_normal, dtype=jnp.float32):
    return _conv_transpose_layer(2, out_channels, kernel, stride, padding, output_padding, dilation, groups, bias,
                                 w_init, dtype)


def ConvTranspose3D(out_channels, kernel, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                    bias=True, w_init=he_normal, dtype=jnp.float32):
    return _conv_transpose_layer(3, out_channels, kernel, stride, padding, output_padding, dilation, groups, bias,
                                 w_init, dtype)


ConvTranspose1D.__doc__ = _CONV_TRANSPOSE_DOC.format(n=1, conv="Conv1D", spatial="W", spatial_out="Wo")
ConvTranspose2D.__doc__ = _CONV_TRANSPOSE_DOC.format(n=2, conv="Conv", spatial="H, W", spatial_out="Ho, Wo")
ConvTranspose3D.__doc__ = _CONV_TRANSPOSE_DOC.format(n=3, conv="Conv3D", spatial="D, H, W",
                                                     spatial_out="Do, Ho, Wo")


def Dense(out_dim, *, bias=True, w_init=he_normal, dtype=jnp.float32):
    """A fully connected layer ``y = x @ w + b`` (``s = W vec(H) + b``, as rows; docs/layers.md, Fully connected layer).

    Input ``(N, D_in)`` (put :data:`Flatten` before it); params
    ``{"w": (D_in, out_dim), "b": (out_dim,)}``; He-normal ``w`` with ``fan_in = D_in``.
    """
    out_dim = _args.positive_int(out_dim, "out_dim")
    dtype = _dtype(dtype)

    def init_fun(rng, input_shape):
        n, d = _shape(input_shape, 2, "Dense")
        params = {"w": w_init(rng, (d, out_dim), dtype, d)}
        if bias:
            params["b"] = jnp.zeros((out_dim,), dtype)
        return (n, out_dim), params

    def apply_fun(params, x, **kwargs):
        return _ops(kwargs).linear(x, params["w"], params.get("b"))

    return init_fun, apply_fun


# --- batch normalisation and layer state --------------------------------------------

#: The key under which a layer keeps its non-trainable state (running statistics)
#: in its params dict: Flax's name for the collection.
STATE_KEY = "batch_stats"


def BatchNorm(*, momentum=0.1, eps=1e-5, scale_init=None, dtype=jnp.float32):
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
                raise ValueError("BatchNorm: one `batch_stats` array is used by two layers (or one layer twice); "
                                 "each BatchNorm needs its own running statistics.")
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


def has_state(params) -> bool:
    """Whether ``params`` holds layer state (a batch norm's running statistics): such a model applies with ``train=``."""
    if isinstance(params, dict):
        return STATE_KEY in params or any(has_state(v) for v in params.values())
    if isinstance(params, (list, tuple)):
        return any(has_state(v) for v in params)
    return False


def partition_state(params):
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
        parts = [partition_state(v) for v in params]
        return type(params)(t for t, _ in parts), type(params)(s for _, s in parts)
    return params, None


def merge_state(trainable, state):
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


def train_apply(apply_fun, params, x, **kwargs):
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


def _stateless(op_name: str, out_shape, ndim: int | None = None, **options):
    def init_fun(rng, input_shape):
        del rng
        if ndim is not None:
            _shape(input_shape, ndim, op_name)
        return out_shape(tuple(input_shape)), ()

    def apply_fun(params, x, **kwargs):
        del params
        return getattr(_ops(kwargs), op_name)(x, **options)

    return init_fun, apply_fun


def _pool(op_name: str, ndim: int, window, stride, padding, **options):
    window = _window.ints(window, "window", ndim)
    stride = window if stride is None else _window.ints(stride, "stride", ndim)
    if not isinstance(padding, str):  # "SAME" always satisfies the rule; explicit amounts are checked now
        _window.check_pool_padding(padding, _window.padding(padding, (1,) * ndim, window, stride, (1,) * ndim),
                                   window)

    def out_shape(shape):
        n, *spatial, c = shape
        win = _window.parse(tuple(spatial), window, stride, padding, kernel_name="window", pool=True)
        return (n, *win.out_size, c)

    return _stateless(op_name, out_shape, ndim + 2, window=window, stride=stride, padding=padding, **options)


def MaxPool(window, stride=None, padding="VALID"):
    """Max pooling, :func:`jaxconv.max_pool2d` (docs/pooling.md §4); ``stride=None`` means the window.

    :func:`MaxPool1D` and :func:`MaxPool3D` pool ``(N, W, C)`` and ``(N, D, H, W, C)``."""
    return _pool("max_pool2d", 2, window, stride, padding)


def AvgPool(window, stride=None, padding="VALID", count_include_pad=True):
    """Average pooling, :func:`jaxconv.avg_pool2d` (docs/pooling.md §2).

    :func:`AvgPool1D` and :func:`AvgPool3D` pool ``(N, W, C)`` and ``(N, D, H, W, C)``."""
    return _pool("avg_pool2d", 2, window, stride, padding, count_include_pad=bool(count_include_pad))


def MaxPool1D(window, stride=None, padding="VALID"):
    """Max pooling over ``(N, W, C)``, :func:`jaxconv.max_pool1d`."""
    return _pool("max_pool1d", 1, window, stride, padding)


def MaxPool3D(window, stride=None, padding="VALID"):
    """Max pooling over ``(N, D, H, W, C)``, :func:`jaxconv.max_pool3d`."""
    return _pool("max_pool3d", 3, window, stride, padding)


def AvgPool1D(window, stride=None, padding="VALID", count_include_pad=True):
    """Average pooling over ``(N, W, C)``, :func:`jaxconv.avg_pool1d`."""
    return _pool("avg_pool1d", 1, window, stride, padding, count_include_pad=bool(count_include_pad))


def AvgPool3D(window, stride=None, padding="VALID", count_include_pad=True):
    """Average pooling over ``(N, D, H, W, C)``, :func:`jaxconv.avg_pool3d`."""
    return _pool("avg_pool3d", 3, window, stride, padding, count_include_pad=bool(count_include_pad))


#: The 2-D pooling layers, :func:`MaxPool` and :func:`AvgPool`.
MaxPool2D, AvgPool2D = MaxPool, AvgPool


def LRN(size=5, kappa=2.0, alpha=1e-4, beta=0.75):
    """Local response normalisation across channels, :func:`jaxconv.lrn` (AlexNet; docs/layers.md)."""
    lrn_module = local_response
    # Validate now, with lrn's own checks, rather than at the first apply.
    _args.positive_int(size, "size")
    lrn_module._real(kappa, "kappa", minimum=0.0)
    lrn_module._real(alpha, "alpha", minimum=0.0)
    lrn_module._real(beta, "beta")
    return _stateless("lrn", lambda shape: shape, 4, size=size, kappa=kappa, alpha=alpha, beta=beta)


#: ReLU, :func:`jaxconv.relu` (docs/layers.md, ReLU); any shape.
Relu = _stateless("relu", lambda shape: shape)


def _flat_shape(shape):
    if len(shape) < 1 or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"Flatten: `input_shape` (={shape!r}) must be (N, ...) with int dimensions.")
    return (shape[0], math.prod(shape[1:]))


#: ``(N, ...) -> (N, prod(...))``, row-major, :func:`jaxconv.flatten` (docs/layers.md, Flatten and vectorisation).
Flatten = _stateless("flatten", _flat_shape)


def _global_avg_pool():
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


#: Global average pooling ``(N, H, W, C) -> (N, C)``: an :func:`jaxconv.avg_pool2d`
#: whose window is the whole image, then :func:`jaxconv.flatten` (ResNet's ``AvPool, 512``; docs/pooling.md §3).
#: Backward: each pixel gets ``g_{n,c} / (H W)``.
GlobalAvgPool = _global_avg_pool()


# --- combinators ----------------------------------------------------------------


def serial(*layers):
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


def parallel(*layers):
    """Apply layer ``i`` to input ``i`` of a tuple; params are a list, one per layer."""
    if not layers:
        raise ValueError("parallel: needs at least one layer.")
    init_funs, apply_funs = zip(*layers)

    def init_fun(rng, input_shape):
        if not isinstance(input_shape, (tuple, list)) or len(input_shape) != len(layers) or not all(
            isinstance(s, (tuple, list)) for s in input_shape
        ):
            raise ValueError(f"parallel: `input_shape` (={input_shape!r}) must be a tuple of {len(layers)} shapes.")
        outputs = [init(key, shape) for init, key, shape in zip(init_funs, jax.random.split(rng, len(layers)), input_shape)]
        return tuple(shape for shape, _ in outputs), [p for _, p in outputs]

    def apply_fun(params, xs, **kwargs):
        return tuple(apply(p, x, **kwargs) for apply, p, x in zip(apply_funs, params, xs))

    return init_fun, apply_fun


def FanOut(num):
    """``x -> (x, ..., x)``, ``num`` copies (their gradients add)."""
    num = _args.positive_int(num, "num")
    return (lambda rng, input_shape: ((tuple(input_shape),) * num, ())), (lambda params, x, **kwargs: (x,) * num)


def _fan_in_sum():
    def init_fun(rng, input_shapes):
        shapes = {tuple(s) for s in input_shapes}
        if len(shapes) != 1:
            raise ValueError(f"FanInSum: the branches' shapes differ: {list(input_shapes)!r}.")
        return shapes.pop(), ()

    def apply_fun(params, xs, **kwargs):
        return sum(xs[1:], xs[0])

    return init_fun, apply_fun


#: ``(x_1, ..., x_k) -> x_1 + ... + x_k``; the branches must have one shape.
FanInSum = _fan_in_sum()

#: ``x -> x``.
Identity = (lambda rng, input_shape: (tuple(input_shape), ())), (lambda params, x, **kwargs: x)


def residual(*layers, shortcut=None):
    """``x -> serial(*layers)(x) + shortcut(x)`` (He et al. 2016's residual block).

    ``shortcut`` defaults to :data:`Identity`; give a layer (e.g. a strided 1x1
    :func:`Conv`) where the main branch changes the shape.  Params:
    ``[(), [main_params, shortcut_params], ()]``.
    """
    return serial(FanOut(2), parallel(serial(*layers), Identity if shortcut is None else shortcut), FanInSum)
