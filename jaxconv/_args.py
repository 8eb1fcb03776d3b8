"""Argument normalisation and validation shared by every op.

Every public op calls these helpers before it traces anything, so a bad
argument fails with a ``ValueError`` (a ``TypeError`` for something that is
not an array at all) that names the argument and its value, at trace time,
whatever the backend.  Nothing here touches array values: only shapes, dtypes
and static configuration, so the checks run once per trace under ``jit`` and
cost nothing at run time.

**Size limits.**  Every size an op is configured with (a window or kernel
extent, a stride, a dilation, a padding amount) and every spatial size it
derives (the padded input, the output) must be at most :data:`MAX_DIM`
``= 2**31 - 1``, and every array an op builds at a size its arguments choose
(the padded input, the output) must hold at most :data:`MAX_ELEMENTS`
``= 2**31 - 1`` elements.  ``2**31 - 1`` is the int32 index space: XLA's
shape arithmetic is int64 and overflows (an abort of the whole process, not an
exception) on products of sizes such as ``padding=2**40``; MLIR rejects sizes
past int64 (``stride=2**70``); and one array of ``2**31`` elements is already
8 GiB of float32, 16 GiB of float64, no layer of a convnet this library
trains.  A larger batch must be split.  The limits are checked with Python
ints, before anything is traced, so an absurd size is a ``ValueError`` that
names the argument and the offending size.
"""

from __future__ import annotations

import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Pair = tuple[int, int]
Padding2D = tuple[tuple[int, int], tuple[int, int]]

#: The largest size of one dimension, and of each configured size (window,
#: stride, dilation, padding amount): int32's maximum (module docstring).
MAX_DIM = 2**31 - 1
#: The most elements one array that an op builds (padded input, output) may hold.
MAX_ELEMENTS = 2**31 - 1


def _is_int(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def pair(value, name: str, *, minimum: int = 1) -> Pair:
    """An int or a pair of ints, each ``>= minimum``, as a pair."""
    if _is_int(value):
        items = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
        _is_int(v) for v in value
    ):
        items = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"`{name}` (={value!r}) must be an int or a pair of ints.")
    if min(items) < minimum:
        raise ValueError(f"`{name}` (={value!r}) must be >= {minimum} in every dimension.")
    if max(items) > MAX_DIM:
        raise ValueError(f"`{name}` (={value!r}) must be <= {MAX_DIM} (2**31 - 1, jaxconv._args.MAX_DIM) "
                         "in every dimension.")
    return items


def _type_name(x) -> str:
    return type(x).__name__


def as_array(x, name: str, what: str = "an array"):
    """``x`` if it is an array (a JAX array or tracer, a NumPy array or scalar), else
    ``jnp.asarray(x)`` for what converts to a numeric array (a Python number, a
    nested list or tuple of numbers, an object with ``__array__``).  Anything
    else (``None``, a string, a dict, an arbitrary object) is a ``TypeError``
    naming the argument and the type it got."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    convertible = (
        isinstance(x, (int, float, list, tuple)) or hasattr(x, "__array__") or hasattr(x, "__jax_array__")
    ) and not isinstance(x, (str, bytes))
    if convertible:
        try:
            return jnp.asarray(x)
        except (TypeError, ValueError, OverflowError) as error:
            raise TypeError(f"`{name}` must be {what}, got a {_type_name(x)} that is not one ({error}).") from None
    raise TypeError(f"`{name}` must be {what}, got {_type_name(x)}.")


def check_float_array(x, name: str, ndim: int | None = None):
    """``x`` as a JAX array of a floating dtype, of rank ``ndim`` if given.

    Not an array at all (``None``, a string, a dict, an object): ``TypeError``
    naming the argument and the type (see :func:`as_array`); a wrong rank or a
    non-floating dtype: ``ValueError``."""
    x = as_array(x, name, "an array of a floating dtype")
    shape, dtype = x.shape, x.dtype
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"`{name}` must have rank {ndim}, got shape {tuple(shape)} (rank {len(shape)}).")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must have a floating dtype, got dtype {dtype}.")
    return x


def check_same_dtype(**arrays) -> None:
    """All the named arrays share one dtype (no silent promotion inside a rule)."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"`{n}` {d}" for n, d in dtypes.items())
        raise ValueError(f"dtypes must match, got {listed}.")


def padding_2d(padding, in_hw: Pair, window_hw: Pair, stride: Pair, dilation: Pair = (1, 1)) -> Padding2D:
    """Normalise ``padding`` to ``((top, bottom), (left, right))``.

    Accepts ``"VALID"``, ``"SAME"`` (output ``ceil(H / stride)``, the extra
    row going to the bottom/right as in XLA), an int, a pair ``(ph, pw)``, or
    ``((top, bottom), (left, right))``.  Every amount must be ``>= 0``.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(in_hw, window_hw, stride, dilation):
                extent = d * (k - 1) + 1
                out = -(-size // s)
                total = max((out - 1) * s + extent - size, 0)
                pads.append((total // 2, total - total // 2))
            return (pads[0], pads[1])
        raise ValueError(f"`padding` (={padding!r}) must be 'VALID', 'SAME', an int, a pair or ((top, bottom), (left, right)).")
    if _is_int(padding):
        p = int(padding)
        result = ((p, p), (p, p))
    elif isinstance(padding, Sequence) and len(padding) == 2 and all(_is_int(v) for v in padding):
        result = ((int(padding[0]),) * 2, (int(padding[1]),) * 2)
    elif (
        isinstance(padding, Sequence)
        and len(padding) == 2
        and all(isinstance(v, Sequence) and len(v) == 2 and all(_is_int(u) for u in v) for v in padding)
    ):
        result = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    else:
        raise ValueError(f"`padding` (={padding!r}) must be 'VALID', 'SAME', an int, a pair or ((top, bottom), (left, right)).")
    if min(min(result[0]), min(result[1])) < 0:
        raise ValueError(f"`padding` (={padding!r}) must be non-negative.")
    if max(max(result[0]), max(result[1])) > MAX_DIM:
        raise ValueError(f"`padding` (={padding!r}) must be <= {MAX_DIM} (2**31 - 1, jaxconv._args.MAX_DIM) "
                         "on every side.")
    return result


def check_pool_padding(padding, pads: Padding2D, window_hw: Pair) -> None:
    """PyTorch's pooling rule: each side's padding at most half the window,
    ``pad <= window // 2`` per spatial dimension and side.

    Then every window holds at least one input pixel (of an input at least
    1x1), so no max-pool output is the ``-inf`` of padding alone and no
    ``count_include_pad=False`` divisor is 0.  ``"SAME"`` always satisfies it:
    its total padding ``(out - 1) * s + k - size`` is at most ``k - 1`` (as
    ``(out - 1) * s < size`` for ``out = ceil(size / s)``), and its larger,
    bottom/right side is ``ceil(total / 2) <= k // 2``."""
    for axis, ((lo, hi), k) in enumerate(zip(pads, window_hw)):
        for side, amount in zip(("top", "bottom") if axis == 0 else ("left", "right"), (lo, hi)):
            if amount > k // 2:
                raise ValueError(
                    f"`padding` (={padding!r}) puts {amount} on the {side}, more than half the window "
                    f"(window {tuple(window_hw)}: at most {k // 2} = {k} // 2 in "
                    f"{'height' if axis == 0 else 'width'}); a pooling window must hold an input pixel."
                )


def output_size(size: int, lo: int, hi: int, k: int, stride: int, dilation: int = 1) -> int:
    """``floor((size + lo + hi - dilation*(k-1) - 1) / stride) + 1``."""
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def check_window_fits(in_hw: Pair, pads: Padding2D, window_hw: Pair, dilation: Pair, name: str) -> None:
    """``ValueError`` if the (dilated) window is larger than the padded input, or
    the padded input or the window's extent is past :data:`MAX_DIM`."""
    for axis, (size, (lo, hi), k, d) in enumerate(zip(in_hw, pads, window_hw, dilation)):
        which = "height" if axis == 0 else "width"
        if size + lo + hi > MAX_DIM:
            raise ValueError(
                f"`padding` ({lo}, {hi}) makes the padded {which} {size} + {lo} + {hi} = {size + lo + hi}, "
                f"more than {MAX_DIM} (2**31 - 1, jaxconv._args.MAX_DIM)."
            )
        extent = d * (k - 1) + 1
        if extent > size + lo + hi:
            raise ValueError(
                f"`{name}` (={tuple(window_hw)}, dilation {tuple(dilation)}) spans {extent} in {which}, "
                f"larger than the padded input ({size} + {lo} + {hi} = {size + lo + hi})."
            )


def check_elements(shape, name: str, what: str) -> None:
    """``ValueError`` naming ``name`` if an array of ``shape`` (``what`` it is) would
    hold more than :data:`MAX_ELEMENTS` elements."""
    count = 1
    for size in shape:  # a symbolic dimension (jax.export) counts as 1: its size is known only at run time
        count *= int(size) if isinstance(size, (int, np.integer)) else 1
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"{name} make {what} of shape {tuple(shape)}: {count} elements, more than "
            f"{MAX_ELEMENTS} (2**31 - 1, jaxconv._args.MAX_ELEMENTS) in one array."
        )


def check_window_op_sizes(x_shape, pads: Padding2D, out_hw: Pair, out_channels: int, name: str) -> None:
    """The padded input ``(N, H + top + bottom, W + left + right, C)`` and the output
    ``(N, Ho, Wo, out_channels)`` of a windowed op each within :data:`MAX_ELEMENTS`."""
    n, h, w, c = x_shape
    (top, bottom), (left, right) = pads
    check_elements((n, h + top + bottom, w + left + right, c), "`padding` and `x`'s shape", "the padded input")
    check_elements((n, *out_hw, out_channels), name, "the output")


_JAX_FORWARD_MODE_MESSAGE = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


def reverse_mode_rule(op):
    """Decorate a public op whose derivative is a ``custom_vjp`` rule: forward mode gets a clear error.

    JAX cannot run a ``custom_vjp`` rule in pure forward mode (``jax.jvp``,
    ``jax.jacfwd``); its own message says only that.  This names the op and
    what works instead.  Forward-over-reverse (``jax.jvp`` of ``jax.grad``,
    ``jax.hessian``) is reverse mode first and works.  Under ``jax.jit`` of a
    ``jax.jvp``, JAX raises its own message later, when the program is built.
    """
    import functools

    @functools.wraps(op)
    def wrapped(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except TypeError as err:
            if _JAX_FORWARD_MODE_MESSAGE not in str(err):
                raise
            raise TypeError(
                f"jaxconv.{op.__name__}: its derivative is a hand-written reverse-mode rule (jax.custom_vjp), "
                f"which JAX cannot run in forward mode (jax.jvp, jax.jacfwd, jax.linearize). Use reverse mode "
                f"(jax.grad, jax.vjp, jax.jacrev); forward-over-reverse (jax.jvp of jax.grad, jax.hessian) works. "
                f"For forward mode itself use jaxconv.reference.{op.__name__}, the same op in plain lax."
            ) from err

    return wrapped
