"""Array and dtype validation and the size limits shared by every op.

(The window geometry — kernel, stride, padding, dilation, output sizes — is
``jaxconv._core.window``'s.)

Every public op calls these helpers before it traces anything, so a bad
argument fails with a ``ValueError`` (a ``TypeError`` for something that is
not an array at all, and for arrays whose dtypes differ) that names the argument and its value, at trace time,
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

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


#: A precision as every multiplying op stores it in its static configuration (hashable):
#: ``None`` (lax's default, ``jax_default_matmul_precision``), a pair of
#: :class:`jax.lax.Precision` (left operand, right operand), or a
#: :class:`jax.lax.DotAlgorithmPreset` / :class:`jax.lax.DotAlgorithm`.
Precision = tuple | Any | None


def precision(value, name: str = "precision") -> Precision:
    """``value``, any precision ``lax.dot_general`` and ``lax.conv_general_dilated`` accept, in one hashable form.

    ``None`` stays ``None`` (lax's default, resolved by lax itself, exactly as
    when the op is called with ``precision=None``); a :class:`jax.lax.Precision`
    or its name (``"highest"``, ``"float32"``, ...) becomes the pair
    ``(p, p)``; a pair of them stays a pair; a :class:`jax.lax.DotAlgorithmPreset`
    (or its name) and a :class:`jax.lax.DotAlgorithm` pass through.  Anything
    else: ``ValueError`` naming the argument and its value.
    """
    if value is None or isinstance(value, (lax.DotAlgorithm, lax.DotAlgorithmPreset)):
        return value
    if isinstance(value, (str, lax.Precision)):
        one = _one_precision(value)
        if one is not None:
            return (one, one)
        if isinstance(value, str) and value in lax.DotAlgorithmPreset.__members__:
            return lax.DotAlgorithmPreset[value]
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(_one_precision(v) if isinstance(v, (str, lax.Precision)) else None for v in value)
        if None not in pair:
            return pair
    raise ValueError(
        f"`{name}` (={value!r}) must be None, a jax.lax.Precision or its name "
        f"({', '.join(repr(p.name.lower()) for p in lax.Precision)}, ...), a pair of them, "
        "or a jax.lax.DotAlgorithmPreset / jax.lax.DotAlgorithm."
    )


def _one_precision(value):
    if isinstance(value, lax.Precision):
        return value
    try:
        return lax.Precision(value)
    except (ValueError, KeyError, TypeError):
        return None


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (default 1; not a bool); else ``ValueError`` naming the argument and
    its value.  The one check of every integer count an op or layer takes (groups, channels, sizes)."""
    if not _is_int(value) or int(value) < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{name}` (={value!r}) must be {what}.")
    return int(value)


def _type_name(x) -> str:
    return type(x).__name__


def as_array(x, name: str, what: str = "an array") -> Any:
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


def check_float_array(x, name: str, ndim: int | None = None) -> jax.Array:
    """``x`` as a JAX array of a floating dtype, of rank ``ndim`` if given.

    Not an array at all (``None``, a string, a dict, an object): ``TypeError``
    naming the argument and the type (see :func:`as_array`); a wrong rank or a
    non-floating dtype: ``ValueError``.  (A NumPy array comes back as given:
    typed ``jax.Array`` for its shape and dtype, which it shares.)"""
    x = as_array(x, name, "an array of a floating dtype")
    shape, dtype = x.shape, x.dtype
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"`{name}` must have rank {ndim}, got shape {tuple(shape)} (rank {len(shape)}).")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must have a floating dtype, got dtype {dtype}.")
    return x


def check_same_dtype(**arrays) -> None:
    """All the named arrays share one dtype (no silent promotion inside a rule).

    A mismatch is a ``TypeError``, as lax gives for its own operands, naming
    every argument and its dtype."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"`{n}` {d}" for n, d in dtypes.items())
        raise TypeError(f"dtypes must match, got {listed}.")


def check_elements(shape, name: str, what: str) -> None:
    """``ValueError`` naming ``name`` if an array of ``shape`` (``what`` it is) would
    hold more than :data:`MAX_ELEMENTS` elements."""
    count = 1
    for size in shape:  # a symbolic dimension (jax.export) counts as 1: its size is known only at run time
        count *= int(size) if isinstance(size, (int, np.integer)) else 1
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"{name} make {what} of shape {tuple(shape)}: {count} elements, more than "
            f"{MAX_ELEMENTS} (2**31 - 1, jaxconv._core.args.MAX_ELEMENTS) in one array."
        )


_JAX_FORWARD_MODE_MESSAGE = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"
_OUR_FORWARD_MODE_MESSAGE = (
    "its derivative is a hand-written reverse-mode rule (jax.custom_vjp), which JAX cannot run in forward mode"
)


def reverse_mode_rule(op=None, *, name: str | None = None, instead: str | None = None):
    """Decorate a public op whose derivative is a ``custom_vjp`` rule: forward mode gets a clear error.

    JAX cannot run a ``custom_vjp`` rule in pure forward mode (``jax.jvp``,
    ``jax.jacfwd``); its own message says only that.  This names the op and
    what works instead.  Forward-over-reverse (``jax.jvp`` of ``jax.grad``,
    ``jax.hessian``) is reverse mode first and works.  Under ``jax.jit`` of a
    ``jax.jvp``, JAX raises its own message later, when the program is built.
    ``name`` is the op's public name under ``jaxconv.`` (default: its
    ``__name__``) and ``instead`` the plain-lax op that runs in forward mode
    (default: ``jaxconv.reference.<name>``); an op built on other decorated
    ops (the ``jaxconv.lax`` drop-ins) reports itself, not the op it calls.
    """
    if op is None:
        return functools.partial(reverse_mode_rule, name=name, instead=instead)
    public = name or op.__name__
    alternative = instead or f"jaxconv.reference.{op.__name__}, the same op in plain lax"

    @functools.wraps(op)
    def wrapped(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except TypeError as err:
            text = str(err)
            if _JAX_FORWARD_MODE_MESSAGE not in text and _OUR_FORWARD_MODE_MESSAGE not in text:
                raise
            raise TypeError(
                f"jaxconv.{public}: {_OUR_FORWARD_MODE_MESSAGE} (jax.jvp, jax.jacfwd, jax.linearize). Use reverse mode "
                f"(jax.grad, jax.vjp, jax.jacrev); forward-over-reverse (jax.jvp of jax.grad, jax.hessian) works. "
                f"For forward mode itself use {alternative}."
            ) from err.__cause__ if _OUR_FORWARD_MODE_MESSAGE in text else err

    # tests/test_conformance.py: every such op is in jaxconv.verify.registry.REGISTRY.  A function attribute, which
    # mypy cannot declare on the functools.wraps result.
    wrapped.is_hand_rule = True  # type: ignore[attr-defined]
    return wrapped
