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
from functools import partial

import jax
import jax.numpy as jnp

from . import _args

__all__ = [
    "AvgPool",
    "Conv",
    "Dense",
    "FanInSum",
    "FanOut",
    "Flatten",
    "GlobalAvgPool",
    "Identity",
    "LRN",
    "MaxPool",
    "Relu",
    "he_normal",
    "parallel",
    "residual",
    "serial",
    "zeros",
]


_OP_MODULES = {
    "conv2d": "conv",
    "avg_pool2d": "pool",
    "max_pool2d": "pool",
    "lrn": "lrn",
    "relu": "layers",
    "linear": "layers",
    "flatten": "layers",
}


class _HandOps:
    """The hand-rule ops, looked up at call time in the ``jaxconv`` package, else
    in their own module (so a rule patched in either place is the one used)."""

    def __getattr__(self, name):
        import importlib

        import jaxconv

        if hasattr(jaxconv, name):
            return getattr(jaxconv, name)
        if name in _OP_MODULES:
            return getattr(importlib.import_module(f"jaxconv.{_OP_MODULES[name]}"), name)
        raise AttributeError(name)


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
        layout = "(N, H, W, C)" if ndim == 4 else "(N, D)"
        raise ValueError(
            f"{layer}: `input_shape` (={input_shape!r}) must be {layout} with positive ints "
            f"(the batch may be -1)."
        )
    return shape


def _positive_int(value, name: str) -> int:
    if not _args._is_int(value) or int(value) < 1:
        raise ValueError(f"`{name}` (={value!r}) must be a positive int.")
    return int(value)


def _dtype(dtype):
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype` (={dtype}) must be a floating dtype.")
    return dtype


# --- layers with parameters -----------------------------------------------------


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
    """
    out_channels = _positive_int(out_channels, "out_channels")
    kernel = _args.pair(kernel, "kernel")
    stride = _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    groups = _positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"`groups` (={groups}) must divide `out_channels` (={out_channels}).")
    dtype = _dtype(dtype)
    _args.padding_2d(padding, (1, 1), kernel, stride, dilation)  # validates the form early

    def init_fun(rng, input_shape):
        n, h, w, c = _shape(input_shape, 4, "Conv")
        if c % groups:
            raise ValueError(f"Conv: input channels (={c}) must be divisible by `groups` (={groups}).")
        pads = _args.padding_2d(padding, (h, w), kernel, stride, dilation)
        _args.check_window_fits((h, w), pads, kernel, dilation, "kernel")
        out_hw = tuple(
            _args.output_size(size, lo, hi, k, s, d)
            for size, (lo, hi), k, s, d in zip((h, w), pads, kernel, stride, dilation)
        )
        w_shape = (*kernel, c // groups, out_channels)
        params = {"w": w_init(rng, w_shape, dtype, kernel[0] * kernel[1] * (c // groups))}
        if bias:
            params["b"] = jnp.zeros((out_channels,), dtype)
        return (n, *out_hw, out_channels), params

    def apply_fun(params, x, **kwargs):
        return _ops(kwargs).conv2d(
            x, params["w"], params.get("b"), stride=stride, padding=padding, dilation=dilation, groups=groups
        )

    return init_fun, apply_fun


def Dense(out_dim, *, bias=True, w_init=he_normal, dtype=jnp.float32):
    """A fully connected layer ``y = x @ w + b`` (``s = W vec(H) + b``, as rows; docs/layers.md, Fully connected layer).

    Input ``(N, D_in)`` (put :data:`Flatten` before it); params
    ``{"w": (D_in, out_dim), "b": (out_dim,)}``; He-normal ``w`` with ``fan_in = D_in``.
    """
    out_dim = _positive_int(out_dim, "out_dim")
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


def _pool(op_name: str, window, stride, padding, **options):
    window = _args.pair(window, "window")
    stride = window if stride is None else _args.pair(stride, "stride")
    if not isinstance(padding, str):  # "SAME" always satisfies the rule; explicit amounts are checked now
        _args.check_pool_padding(padding, _args.padding_2d(padding, (1, 1), window, stride), window)

    def out_shape(shape):
        n, h, w, c = shape
        pads = _args.padding_2d(padding, (h, w), window, stride)
        _args.check_window_fits((h, w), pads, window, (1, 1), "window")
        out_hw = tuple(_args.output_size(size, lo, hi, k, s) for size, (lo, hi), k, s in zip((h, w), pads, window, stride))
        return (n, *out_hw, c)

    return _stateless(op_name, out_shape, 4, window=window, stride=stride, padding=padding, **options)


def MaxPool(window, stride=None, padding="VALID"):
    """Max pooling, :func:`jaxconv.max_pool2d` (docs/pooling.md §4); ``stride=None`` means the window."""
    return _pool("max_pool2d", window, stride, padding)


def AvgPool(window, stride=None, padding="VALID", count_include_pad=True):
    """Average pooling, :func:`jaxconv.avg_pool2d` (docs/pooling.md §2)."""
    return _pool("avg_pool2d", window, stride, padding, count_include_pad=bool(count_include_pad))


def LRN(size=5, kappa=2.0, alpha=1e-4, beta=0.75):
    """Local response normalisation across channels, :func:`jaxconv.lrn` (AlexNet; docs/layers.md)."""
    import importlib

    lrn_module = importlib.import_module("jaxconv.lrn")  # the package's `lrn` attribute is the function
    # Validate now, with lrn's own checks, rather than at the first apply.
    lrn_module._positive_int(size, "size")
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
    num = _positive_int(num, "num")
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
