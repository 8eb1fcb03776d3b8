r"""Window geometry over any number of spatial dimensions, once for every windowed op.

Convolution, transposed convolution, both poolings, the matrix views and the
layers' shape inference all slide a window over the spatial axes of a
channels-last array ``(N, *spatial, C)``.  Everything they share lives here:

* :class:`Window`: the parsed, validated configuration of one op on one input,
  ``(in_size, kernel, stride, padding, dilation)``, one entry per spatial
  dimension, and the sizes it implies (padded input, window extent, output,
  stride remainder);
* :func:`parse`: arguments as users write them (``"SAME"``, an int, one value
  per dimension, ``(lo, hi)`` pairs) into a :class:`Window`, every bad value a
  ``ValueError`` naming the argument;
* :func:`patches` and :func:`unpatches`: ``phi`` (im2row, unflattened) and its
  adjoint ``phi*`` (row2im), docs/convolution.md §2.

Per spatial dimension, with input size ``n``, padding ``(lo, hi)``, kernel
``k``, stride ``s`` and dilation ``d``:

.. math::

    \text{extent} = d(k-1) + 1, \qquad
    \text{out} = \Big\lfloor \frac{n + lo + hi - \text{extent}}{s} \Big\rfloor + 1, \qquad
    \text{remainder} = (n + lo + hi - \text{extent}) \bmod s,

output ``i`` reads padded positions ``s i + d t`` for ``0 <= t < k``, and the
``remainder`` padded positions past the last window are read by none.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from .args import MAX_DIM, _is_int, check_elements

__all__ = ["Window", "dim_names", "ints", "output_size", "parse", "patches", "unpatches"]

Sizes = tuple[int, ...]
Pads = tuple[tuple[int, int], ...]
#: A size as users give it: an int (every spatial dimension alike) or one per dimension.
SizeLike = int | Sequence[int]
#: Padding as users give it: "VALID", "SAME", an int, one per dimension, or one (lo, hi) pair per dimension.
PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]

_COUNT_WORDS = {1: "one int", 2: "a pair of ints", 3: "a triple of ints"}


def dim_names(ndim: int) -> tuple[str, ...]:
    """What to call each spatial dimension in a message: width; height, width; depth, height, width."""
    return ("depth", "height", "width")[-ndim:] if ndim <= 3 else tuple(f"dimension {i}" for i in range(ndim))


def _side_names(ndim: int) -> tuple[tuple[str, str], ...]:
    sides = {"depth": ("front", "back"), "height": ("top", "bottom"), "width": ("left", "right")}
    return tuple(sides.get(name, ("low", "high")) for name in dim_names(ndim))


def ints(value, name: str, ndim: int, *, minimum: int = 1) -> Sizes:
    """An int or ``ndim`` ints, each in ``[minimum, MAX_DIM]``, as an ``ndim``-tuple."""
    if _is_int(value):
        items = (int(value),) * ndim
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == ndim
        and all(_is_int(v) for v in value)
    ):
        items = tuple(int(v) for v in value)
    else:
        many = _COUNT_WORDS.get(ndim, f"{ndim} ints")
        raise ValueError(
            f"`{name}` (={value!r}) must be an int or {many}{' (one per spatial dimension)' if ndim != 2 else ''}."
        )
    if min(items) < minimum:
        raise ValueError(f"`{name}` (={value!r}) must be >= {minimum} in every dimension.")
    if max(items) > MAX_DIM:
        raise ValueError(
            f"`{name}` (={value!r}) must be <= {MAX_DIM} (2**31 - 1, jaxconv._core.args.MAX_DIM) in every dimension."
        )
    return items


def output_size(size, lo: int, hi: int, k: int, stride: int, dilation: int = 1):
    """``floor((size + lo + hi - dilation*(k-1) - 1) / stride) + 1``."""
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def _padding_forms(ndim: int) -> str:
    sides = " ".join(f"({a}, {b})" for a, b in _side_names(ndim))
    per_dim = "a pair (ph, pw)" if ndim == 2 else f"{ndim} ints"
    return f"'VALID', 'SAME', an int, {per_dim} or one (lo, hi) per dimension ({sides})"


def padding(value, in_size: Sequence, kernel: Sizes, stride: Sizes, dilation: Sizes) -> Pads:
    """``value`` as one ``(lo, hi)`` pair per spatial dimension.

    ``"VALID"`` is no padding; ``"SAME"`` gives output ``ceil(n / s)``, the extra
    amount going to the high side (bottom, right) as in XLA; an int pads every
    side alike; ``ndim`` ints pad each dimension alike on both sides; ``ndim``
    ``(lo, hi)`` pairs give every side.  Every amount ``>= 0`` and ``<= MAX_DIM``.
    """
    ndim = len(kernel)
    if isinstance(value, str):
        mode = value.upper()
        if mode == "VALID":
            return ((0, 0),) * ndim
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(in_size, kernel, stride, dilation):
                out = -(-size // s)
                total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"`padding` (={value!r}) must be {_padding_forms(ndim)}.")
    is_pair = lambda v: (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) == 2  # noqa: E731
        and all(_is_int(u) for u in v)
    )
    if _is_int(value):
        result = ((int(value), int(value)),) * ndim
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == ndim
        and all(_is_int(v) for v in value)
    ):
        result = tuple((int(v), int(v)) for v in value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == ndim
        and all(is_pair(v) for v in value)
    ):
        result = tuple((int(lo), int(hi)) for lo, hi in value)
    else:
        raise ValueError(f"`padding` (={value!r}) must be {_padding_forms(ndim)}.")
    amounts = [a for side in result for a in side]
    if min(amounts) < 0:
        raise ValueError(f"`padding` (={value!r}) must be non-negative.")
    if max(amounts) > MAX_DIM:
        raise ValueError(
            f"`padding` (={value!r}) must be <= {MAX_DIM} (2**31 - 1, jaxconv._core.args.MAX_DIM) on every side."
        )
    return result


class Window(NamedTuple):
    """One windowed op on one input: every size per spatial dimension."""

    in_size: tuple  # spatial input size (a jax.export symbolic dimension allowed)
    kernel: Sizes  # window entries per dimension
    stride: Sizes
    padding: Pads  # (lo, hi) per dimension
    dilation: Sizes

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def extent(self) -> Sizes:
        """The dilated window's span, ``d(k-1) + 1``."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def padded(self) -> tuple:
        """The padded input's size, ``n + lo + hi``."""
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.in_size, self.padding))

    @property
    def out_size(self) -> tuple:
        return tuple(
            output_size(n, lo, hi, k, s, d)
            for n, (lo, hi), k, s, d in zip(self.in_size, self.padding, self.kernel, self.stride, self.dilation)
        )

    @property
    def remainder(self) -> tuple:
        """Padded positions past the last window, ``(n + lo + hi - extent) mod s``, per dimension."""
        return tuple((p - e) % s for p, e, s in zip(self.padded, self.extent, self.stride))

    @property
    def volume(self) -> int:
        """Entries in one window, ``prod(kernel)``."""
        return math.prod(self.kernel)


def parse(
    in_size: Sequence,
    kernel,
    stride,
    padding_value,
    dilation=1,
    *,
    kernel_name: str = "kernel_size",
    pool: bool = False,
) -> Window:
    """Validate the arguments of a windowed op on an input of spatial size ``in_size`` into a :class:`Window`.

    ``kernel`` is a tuple already read from an array's shape, or a user's
    ``window``/``kernel_size`` (int or one per dimension), named ``kernel_name``
    in messages.  ``pool=True`` adds pooling's rule: each side's padding at
    most half the window (:func:`check_pool_padding`).  The dilated window must
    fit in the padded input, and every size stays within ``MAX_DIM``.
    """
    ndim = len(in_size)
    kernel = ints(kernel, kernel_name, ndim)
    stride = ints(stride, "stride", ndim)
    dilation = ints(dilation, "dilation", ndim)
    pads = padding(padding_value, in_size, kernel, stride, dilation)
    if pool:
        check_pool_padding(padding_value, pads, kernel)
    window = Window(tuple(in_size), kernel, stride, pads, dilation)
    check_fits(window, kernel_name)
    return window


def parse_transpose(
    out_size: Sequence,
    kernel: Sizes,
    stride,
    padding_value,
    output_padding=0,
    dilation=1,
    *,
    kernel_name: str = "kernel",
) -> Window:
    """The geometry of the convolution a transposed convolution is the adjoint of, as a :class:`Window`.

    ``out_size`` is the transposed convolution's input (``y``) size, the
    convolution's output size ``m``; the Window's ``in_size`` is the size the
    transposed convolution produces.  Per dimension:

    * explicit padding (an int, one per dimension, ``(lo, hi)`` pairs,
      ``"VALID"`` = 0): ``(m - 1) s - lo - hi + d (k - 1) + 1 + output_padding``;
    * ``"SAME"``: the smallest size a ``"SAME"`` convolution maps to ``m``,
      ``(m - 1) s + 1``, plus ``output_padding``, with the padding
      :func:`padding` gives that convolution (``output_padding = s - 1``: the
      size ``m s``).

    ``0 <= output_padding < stride``: the output sizes the convolution maps to
    ``m`` are exactly those.  Every bad value: ``ValueError`` naming it.
    """
    ndim = len(kernel)
    stride = ints(stride, "stride", ndim)
    dilation = ints(dilation, "dilation", ndim)
    output_padding = ints(output_padding, "output_padding", ndim, minimum=0)
    for op, s in zip(output_padding, stride):
        if op >= s:
            raise ValueError(
                f"`output_padding` (={output_padding}) must be smaller than `stride` (={stride}) "
                "in every dimension: only then is the output the adjoint of a convolution whose "
                "output has y's size."
            )
    if isinstance(padding_value, str) and padding_value.upper() == "SAME":
        sizes = [(m - 1) * s + 1 + op for m, s, op in zip(out_size, stride, output_padding)]
        pads = padding(padding_value, sizes, kernel, stride, dilation)
    else:
        pads = padding(padding_value, (1,) * ndim, kernel, stride, dilation)
        sizes = []
        for size, (lo, hi), k, s, d, op, name in zip(
            out_size, pads, kernel, stride, dilation, output_padding, dim_names(ndim)
        ):
            full = (size - 1) * s + d * (k - 1) + 1 + op
            if full - lo - hi < 1:
                raise ValueError(
                    f"`padding` (={padding_value!r}) crops {lo} + {hi} from the {name}, but the transposed "
                    f"convolution of `y` (size {size}) with this kernel, stride and dilation spans only {full}: "
                    "no output is left."
                )
            sizes.append(full - lo - hi)
    window = Window(tuple(sizes), kernel, stride, pads, dilation)
    check_fits(window, kernel_name)
    return window


def check_pool_padding(value, pads: Pads, kernel: Sizes) -> None:
    """PyTorch's pooling rule: each side's padding at most half the window, ``pad <= k // 2``.

    Then every window holds at least one input entry (of an input at least 1
    per dimension), so no max-pool output is the ``-inf`` of padding alone and
    no ``count_include_pad=False`` divisor is 0.  ``"SAME"`` always satisfies
    it: its total padding ``(out - 1) s + k - n`` is at most ``k - 1`` (as
    ``(out - 1) s < n`` for ``out = ceil(n / s)``), and its larger, high side is
    ``ceil(total / 2) <= k // 2``.
    """
    for (lo, hi), k, name, sides in zip(pads, kernel, dim_names(len(kernel)), _side_names(len(kernel))):
        for side, amount in zip(sides, (lo, hi)):
            if amount > k // 2:
                raise ValueError(
                    f"`padding` (={value!r}) puts {amount} on the {side}, more than half the window "
                    f"(window {tuple(kernel)}: at most {k // 2} = {k} // 2 in {name}); "
                    "a pooling window must hold an input pixel."
                )


def check_fits(window: Window, kernel_name: str) -> None:
    """``ValueError`` if the dilated window spans more than the padded input, or the
    padded input is past :data:`MAX_DIM`."""
    for size, (lo, hi), extent, name in zip(window.in_size, window.padding, window.extent, dim_names(window.ndim)):
        if size + lo + hi > MAX_DIM:
            raise ValueError(
                f"`padding` ({lo}, {hi}) makes the padded {name} {size} + {lo} + {hi} = {size + lo + hi}, "
                f"more than {MAX_DIM} (2**31 - 1, jaxconv._core.args.MAX_DIM)."
            )
        if extent > size + lo + hi:
            raise ValueError(
                f"`{kernel_name}` (={window.kernel}, dilation {window.dilation}) spans {extent} in {name}, "
                f"larger than the padded input ({size} + {lo} + {hi} = {size + lo + hi})."
            )


def check_sizes(window: Window, batch, channels, out_channels, name: str) -> None:
    """The padded input ``(N, *padded, C)`` and the output ``(N, *out, out_channels)``
    each within ``MAX_ELEMENTS``."""
    check_elements((batch, *window.padded, channels), "`padding` and `x`'s shape", "the padded input")
    check_elements((batch, *window.out_size, out_channels), name, "the output")


# --- phi and phi* --------------------------------------------------------------------
# A Python loop over the prod(kernel) window offsets (not over entries): each
# offset is one strided slice of the padded input, and its adjoint one
# interior-padded lax.pad.


def _offsets(window: Window):
    return itertools.product(*(range(k) for k in window.kernel))


def patches(x, window: Window, fill=0):
    """``phi(x)`` unflattened: ``(N, *in_size, C) -> (N, *out_size, *kernel, C)``.

    Entry ``[n, i..., t..., c]`` is padded ``x[n, s*i + d*t, c]`` per dimension,
    padding ``fill``.
    """
    n, c = x.shape[0], x.shape[-1]
    out = window.out_size
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in window.padding), (0, 0, 0)))
    pieces = []
    for offset in _offsets(window):
        start = tuple(d * t for d, t in zip(window.dilation, offset))
        limit = tuple(b + s * (m - 1) + 1 for b, s, m in zip(start, window.stride, out))
        pieces.append(lax.slice(xp, (0, *start, 0), (n, *limit, c), (1, *window.stride, 1)))
    return jnp.stack(pieces, axis=window.ndim + 1).reshape(n, *out, *window.kernel, c)


def unpatches(rows, window: Window):
    """``phi*(rows)``: ``(N, *out_size, *kernel, C) -> (N, *in_size, C)``, the adjoint of :func:`patches`.

    The entry of offset ``t`` at output ``i`` came from padded position
    ``s i + d t``, i.e. unpadded ``s i + d t - lo``: a pad with ``s - 1``
    interior zeros and low edge ``d t - lo`` puts every entry back in place;
    negative edges crop what came from padding.  Overlapping windows add.
    """
    ndim = window.ndim
    out = window.out_size
    zero = jnp.zeros((), rows.dtype)
    total = None
    for offset in _offsets(window):
        cfg = []
        for size, (lo, _), s, d, t, m in zip(
            window.in_size, window.padding, window.stride, window.dilation, offset, out
        ):
            low = d * t - lo
            cfg.append((low, size - low - s * (m - 1) - 1, s - 1))
        piece = rows[(slice(None),) * (ndim + 1) + offset]
        piece = lax.pad(piece, zero, ((0, 0, 0), *cfg, (0, 0, 0)))
        total = piece if total is None else total + piece
    return total


# --- one XLA convolution shape the CPU compiler cannot take --------------------------------
#
# XLA's algebraic simplifier swaps a convolution's operands when the kernel is
# the larger (SwapConvOperands).  It keeps unchanged every spatial dimension it
# takes for a "group" dimension: no padding, no window dilation, no reversal,
# lhs (base) dilation equal to the window size k and stride k - 1.  It does not
# check that the input has size k there, so when it does not, the swapped
# convolution's window no longer matches its new kernel and the compiler dies
# on a failed CHECK ("Window dimensions do not match RHS shape"), a process
# abort, not an exception.  jax.grad of our backward formulas emits such
# convolutions (JAX's transposes of a convolution trade strides for lhs
# dilation), e.g. the second derivative of a strided, dilated transposed
# convolution.  A window of one more tap, a zero, read one more padded entry
# at the high end: the same values, and a shape outside that pattern for the
# convolution and for the transposes autodiff derives from it.


def _dilated(n: int, d: int) -> int:
    return 0 if n == 0 else 1 + d * (n - 1)


def _xla_group_swap_hazard(
    lhs: int, k: int, stride: int, lo: int, hi: int, lhs_dil: int, rhs_dil: int, depth: int
) -> bool:
    """Whether one spatial dimension of ``lax.conv_general_dilated``, or of the convolutions JAX's transpose rules
    derive from it (``depth`` levels of them: one per further derivative), has the shape XLA's operand swap
    mishandles: ``rhs_dil == 1``, no padding, ``lhs_dil == k``, ``stride == k - 1``, an input not of size ``k``."""
    span = _dilated(lhs, lhs_dil) + lo + hi - _dilated(k, rhs_dil)
    if lhs <= 0 or k <= 0 or span < 0:
        return False
    out = span // stride + 1
    if rhs_dil == 1 and lo == hi == 0 and lhs_dil == k and stride == k - 1 and lhs != k:
        return True
    if depth == 0:
        return False
    # jax's conv_general_dilated transpose rules: the cotangent correlated with the reversed kernel (for the
    # lhs; strides and lhs dilation trade places), and the lhs correlated with the cotangent (for the rhs;
    # strides and rhs dilation trade places), with the paddings jax computes for each.
    pad_before = _dilated(k, rhs_dil) - lo - 1
    pad_after = _dilated(lhs, lhs_dil) + _dilated(k, rhs_dil) - 1 - _dilated(out, stride) - pad_before
    rhs_hi = _dilated(out, stride) - _dilated(lhs, lhs_dil) + _dilated(k, rhs_dil) - lo - 1
    return _xla_group_swap_hazard(
        out, k, lhs_dil, pad_before, pad_after, stride, rhs_dil, depth - 1
    ) or _xla_group_swap_hazard(lhs, out, rhs_dil, lo, rhs_hi, lhs_dil, stride, depth - 1)


def xla_extra_taps(
    lhs: int, k: int, stride: int, lo: int, hi: int, lhs_dil: int = 1, rhs_dil: int = 1, depth: int = 2
) -> int:
    """How many zero taps to append to a convolution's window along one spatial dimension (its high padding
    growing by ``rhs_dil`` per tap, so every output stays the same) so that neither the convolution nor the
    convolutions ``depth`` levels of autodiff derive from it take XLA's mishandled operand-swap shape
    (:func:`_xla_group_swap_hazard`).  0 for every other convolution."""
    for taps in range(4):
        if not _xla_group_swap_hazard(lhs, k + taps, stride, lo, hi + taps * rhs_dil, lhs_dil, rhs_dil, depth):
            return taps
    # One tap clears every shape of sizes 1-7, kernels 1-5, strides and dilations 1-4, paddings -2..4; past
    # them, should three taps not clear every level, clear the first, the one a second derivative meets.
    for taps in range(1, 4):
        if not _xla_group_swap_hazard(lhs, k + taps, stride, lo, hi + taps * rhs_dil, lhs_dil, rhs_dil, 1):
            return taps
    return 1
