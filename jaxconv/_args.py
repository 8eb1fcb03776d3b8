"""Argument normalisation and validation shared by every op.

Every public op calls these helpers before it traces anything, so a bad
argument fails with a ``ValueError`` that names the argument and its value,
at trace time, whatever the backend.  Nothing here touches array values:
only shapes, dtypes and static configuration, so the checks run once per
trace under ``jit`` and cost nothing at run time.
"""

from __future__ import annotations

import operator
from typing import Sequence

import jax.numpy as jnp
import numpy as np

Pair = tuple[int, int]
Padding2D = tuple[tuple[int, int], tuple[int, int]]


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
    return items


def check_float_array(x, name: str, ndim: int | None = None):
    """``x`` as a JAX array of a floating dtype, of rank ``ndim`` if given."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        x = jnp.asarray(x)
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
    return result


def output_size(size: int, lo: int, hi: int, k: int, stride: int, dilation: int = 1) -> int:
    """``floor((size + lo + hi - dilation*(k-1) - 1) / stride) + 1``."""
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def check_window_fits(in_hw: Pair, pads: Padding2D, window_hw: Pair, dilation: Pair, name: str) -> None:
    """``ValueError`` if the (dilated) window is larger than the padded input."""
    for axis, (size, (lo, hi), k, d) in enumerate(zip(in_hw, pads, window_hw, dilation)):
        extent = d * (k - 1) + 1
        if extent > size + lo + hi:
            which = "height" if axis == 0 else "width"
            raise ValueError(
                f"`{name}` (={tuple(window_hw)}, dilation {tuple(dilation)}) spans {extent} in {which}, "
                f"larger than the padded input ({size} + {lo} + {hi} = {size + lo + hi})."
            )
