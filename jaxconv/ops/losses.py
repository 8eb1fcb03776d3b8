r"""Softmax, the log-loss, the fused softmax cross-entropy and the L2 penalty, each
with its hand-derived backward.

* ``softmax`` (docs/losses.md, Softmax), over the last axis:
  ``p_k = e^{s_k} / sum_t e^{s_t}``; the simplified backward
  ``dz/ds_d = p_d (g_d - sum_k g_k p_k)`` with ``g = dz/dp``.  Residual: ``p``.
* ``log_loss`` (docs/losses.md, Log-loss): ``L = -(1/N) sum_n log p[n, c_n]`` for
  probabilities ``p`` ``(N, D)`` and classes ``c``; ``dL/dp[n, k] = -[k = c_n] /
  (N p[n, c_n])``.  Residual: the ``N`` picked probabilities.
* ``softmax_cross_entropy`` (docs/losses.md, Softmax cross-entropy; softmax and
  log-loss composed): ``L = (1/N) sum_n (logsumexp(s_n) - s[n, c_n])``, computed with the
  row maximum subtracted so that it is finite for logits of any finite size
  (``|s| ~ 1e4`` included).  The composition's backward collapses to
  ``dL/ds_n = (p_n - onehot(c_n)) / N``: with ``g = -[k = c] / p_c``
  from the log-loss, the softmax backward gives ``p_d (g_d - sum_k g_k p_k) = p_d (-[d = c]/p_c + 1)
  = p_d - [d = c]``.  Residual: ``p``.
* ``l2_penalty`` (docs/losses.md, L2 penalty):
  ``R = lam * sum over the leaves of sum(w^2)``; ``dR/dw = 2 lam w``,
  ``dR/dlam = sum(w^2)``.

Labels are integer class indices of shape ``(N,)`` in ``[0, D)``.  Dtype and
shape are checked at trace time; the range is checked too when the labels are
concrete (a NumPy or JAX array, not a tracer: under ``jit``, pass them as an
argument and the range check cannot run; an out-of-range label then gives a NaN
loss, never a silently wrong class).  ``log_loss``'s probabilities are checked
the same way (:func:`check_probabilities`).

NaN: a NaN in an input gives a NaN loss whenever the loss reads it, eager and
under ``jit``: any NaN logit of ``softmax_cross_entropy`` (its row's
normaliser), any NaN score of ``softmax`` (its whole row), ``log_loss``'s
``p[n, labels[n]]`` (its other entries are never read), any NaN leaf entry or
traced ``lam`` of ``l2_penalty``.  Non-array arguments (``None``, strings,
dicts, objects) are a ``TypeError`` naming the argument.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from .._core import args as _args

__all__ = ["l2_penalty", "log_loss", "softmax", "softmax_cross_entropy"]


def check_labels(labels, batch: int, num_classes: int, name: str = "labels"):
    """Integer class indices of shape ``(batch,)``, in ``[0, num_classes)`` when concrete."""
    labels = _args.as_array(labels, name, "an array of integer class indices")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"`{name}` must have an integer dtype (class indices), got dtype {labels.dtype}.")
    if tuple(labels.shape) != (batch,):
        raise ValueError(
            f"`{name}` must have shape ({batch},), one class per example, got shape {tuple(labels.shape)}."
        )
    if not isinstance(labels, jax.core.Tracer) and batch > 0:
        values = np.asarray(labels)
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(
                f"`{name}` (={values[index]} at index {index}) must lie in [0, {num_classes}), the number of classes."
            )
    return labels


def check_probabilities(p, labels, name: str = "p") -> None:
    """When ``p`` and ``labels`` are concrete (not tracers): every entry of ``p`` in
    ``[0, 1]`` and each labelled one, ``p[n, labels[n]]``, in ``(0, 1]``; else a
    ``ValueError`` naming ``name``, the value and its index.  A NaN is let through
    (NaN in, NaN out).  Tracers (under ``jit``, ``grad``, ``vmap``) have no
    values: nothing is checked (see :func:`log_loss` for what then happens)."""
    if isinstance(p, jax.core.Tracer) or p.size == 0:
        return
    values = np.asarray(p)
    bad = (values < 0) | (values > 1)  # False at NaN
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), values.shape)
        raise ValueError(
            f"`{name}` (={values[index].item()!r} at index {tuple(int(i) for i in index)}) must be a probability "
            "in [0, 1]."
        )
    if isinstance(labels, jax.core.Tracer):
        return
    picked = values[np.arange(values.shape[0]), np.asarray(labels)]
    zero = picked == 0
    if zero.any():
        n = int(np.argmax(zero))
        raise ValueError(
            f"`{name}` (={picked[n].item()!r} at index ({n}, {int(np.asarray(labels)[n])}), the labelled class of "
            "example "
            f"{n}) must be in (0, 1]: its -log is inf."
        )


def _pick(values, labels):
    """``values[n, labels[n]]``; NaN for a label out of range (only possible under jit)."""
    return jnp.take_along_axis(
        values, labels[:, None], axis=1, mode="fill", fill_value=jnp.nan, wrap_negative_indices=False
    )[:, 0]


def _onehot(labels, num_classes: int, dtype):
    return (labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)).astype(dtype)


# --- softmax -------------------------------------------------------------------


@_args.reverse_mode_rule
def softmax(s: ArrayLike) -> Array:
    """Softmax over the last axis, ``p = exp(s) / sum(exp(s))`` (docs/losses.md, Softmax).

    Args:
      s: scores, shape ``(..., D)`` with ``D >= 1``, floating dtype.

    Returns:
      ``p``, same shape; computed with the maximum subtracted (stable).  NaN:
      a NaN score makes its whole row NaN (through the normaliser), eager and
      under ``jit``; other rows are unaffected.

    Backward, for ``g = dL/dp``: ``dL/ds = p * (g - sum(g * p, axis=-1, keepdims=True))``.
    """
    s = _args.check_float_array(s, "s")
    if s.ndim < 1 or s.shape[-1] < 1:
        raise ValueError(f"`s` must have a last (class) axis of length >= 1, got shape {tuple(s.shape)}.")
    return _softmax(s)


def _softmax_forward(s):
    e = jnp.exp(s - lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@jax.custom_vjp
def _softmax(s):
    return _softmax_forward(s)


def _softmax_fwd(s):
    p = _softmax_forward(s)
    return p, p


def _softmax_bwd(p, g):
    return (p * (g - (g * p).sum(axis=-1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


# --- log-loss ------------------------------------------------------------------


@_args.reverse_mode_rule
def log_loss(p: ArrayLike, labels: ArrayLike) -> Array:
    """Mean over the batch of ``-log p[n, labels[n]]`` (docs/losses.md, Log-loss).

    Args:
      p: probabilities, shape ``(N, D)``, floating dtype: every entry in
        ``[0, 1]``, the labelled ones ``p[n, labels[n]]`` in ``(0, 1]``, checked
        when concrete (``ValueError`` naming the value and its index; a NaN
        passes, see below).  Not checked to sum to 1: the loss and its gradient
        only read the labelled entries.
      labels: integer class indices, shape ``(N,)``, in ``[0, D)`` (checked when
        concrete).

    Returns:
      A scalar of ``p``'s dtype.  NaN: NaN exactly when some ``p[n, labels[n]]``
      is NaN, eager and under ``jit`` (the other entries are never read).

    Under ``jit`` (and ``grad``, ``vmap``: ``p`` a tracer) the values are unknown
    at trace time and nothing is checked.  Then, per example, the loss term is
    ``-log p[n, labels[n]]`` as IEEE arithmetic gives it: ``+inf`` for a
    labelled 0 (gradient ``-inf`` there, for ``g > 0``), NaN for a labelled
    negative value (finite gradient), a negative term for a labelled value
    above 1; an unlabelled entry out of range changes neither the loss nor the
    gradient (0 there).  An out-of-range label gives NaN.

    Backward: ``dL/dp[n, k] = -[k == labels[n]] / (N * p[n, labels[n]])``.
    """
    p = _args.check_float_array(p, "p", 2)
    labels = check_labels(labels, p.shape[0], p.shape[1])
    check_probabilities(p, labels)
    return _log_loss(p.shape[1], p, labels)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _log_loss(num_classes: int, p, labels):
    return -jnp.mean(jnp.log(_pick(p, labels)))


def _log_loss_fwd(num_classes: int, p, labels):
    picked = _pick(p, labels)
    # The N picked probabilities, not p: the gradient is zero everywhere else.
    return -jnp.mean(jnp.log(picked)), (picked, labels)


def _log_loss_bwd(num_classes: int, residuals, g):
    picked, labels = residuals
    n = picked.shape[0]
    dp = _onehot(labels, num_classes, picked.dtype) * (-g / (n * picked))[:, None]
    return dp, None


_log_loss.defvjp(_log_loss_fwd, _log_loss_bwd)


# --- fused softmax cross-entropy -----------------------------------------------


@_args.reverse_mode_rule
def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Mean over the batch of ``-log softmax(logits)[n, labels[n]]``, fused and stable.

    ``L = (1/N) sum_n (m_n + log sum_k exp(s[n, k] - m_n) - s[n, labels[n]])``
    with ``m_n = max_k s[n, k]``: finite for any finite logits (tested at 1e4).

    Args:
      logits: scores, shape ``(N, D)``, floating dtype.
      labels: integer class indices, shape ``(N,)``, in ``[0, D)`` (checked when
        concrete).

    Returns:
      A scalar of ``logits``' dtype; NaN if any logit is NaN (every logit of a
      row enters its normaliser), eager and under ``jit``.

    Backward (docs/losses.md, Softmax cross-entropy): ``dL/ds = (softmax(s) - onehot(labels)) / N``.
    """
    logits = _args.check_float_array(logits, "logits", 2)
    labels = check_labels(labels, logits.shape[0], logits.shape[1])
    return _softmax_cross_entropy(logits, labels)


def _cross_entropy_forward(logits, labels):
    # One exp pass gives both the loss and softmax(s) for the backward; taking
    # exp(log_p) instead costs a second pass over (N, D) (1.6x autodiff's time).
    # The shift is subtracted inside the exp and from the picked scores only: an
    # (N, D) array `logits - m` would be materialized as a pass of its own.
    m = lax.stop_gradient(logits.max(axis=1, keepdims=True))
    e = jnp.exp(logits - m)
    norm = e.sum(axis=1, keepdims=True)
    return jnp.mean(jnp.log(norm[:, 0]) - (_pick(logits, labels) - m[:, 0])), e / norm


@jax.custom_vjp
def _softmax_cross_entropy(logits, labels):
    return _cross_entropy_forward(logits, labels)[0]


def _softmax_cross_entropy_fwd(logits, labels):
    loss, p = _cross_entropy_forward(logits, labels)
    return loss, (p, labels)


def _softmax_cross_entropy_bwd(residuals, g):
    p, labels = residuals
    n, d = p.shape
    # (g/N)(p - onehot) as (g/N) p with g/N taken off at each label: a
    # 1-per-row scatter-add, as autodiff does it; the one-hot as a comparison
    # fused into the (N, D) product made the backward 1.3x slower (XLA CPU).
    # Out-of-range labels (possible only under jit) are dropped, as the
    # one-hot would drop them.
    scale = (g / n).astype(p.dtype)
    rows = jnp.arange(n)
    return (scale * p).at[rows, labels].add(-scale, mode="drop", wrap_negative_indices=False), None


_softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)


# --- L2 penalty ----------------------------------------------------------------


@_args.reverse_mode_rule
def l2_penalty(params: Any, lam: float | Array) -> Array:
    """``lam * sum over the leaves of params of sum(leaf ** 2)`` (docs/losses.md, L2 penalty).

    Args:
      params: a pytree of floating arrays (at least one leaf).  ``None`` leaves
        are skipped, as in every JAX pytree.
      lam: the weight, a scalar (a Python number or a 0-d floating array, which
        may be traced; when concrete it must be finite and ``>= 0``).

    Returns:
      A scalar of the leaves' common (promoted) dtype; NaN if any leaf holds a
      NaN (or a traced ``lam`` is NaN).

    Backward, for ``g = dL/dR``: ``dL/dw = 2 lam g w`` for every leaf ``w``
    (in its own dtype), ``dL/dlam = g * sum(w^2)``.
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves_with_paths:
        raise ValueError(f"`params` (={params!r}) has no array leaves to penalise.")
    for path, leaf in leaves_with_paths:
        _args.check_float_array(leaf, "params" + jax.tree_util.keystr(path))
    dtype = jnp.result_type(*[leaf for _, leaf in leaves_with_paths])
    if isinstance(lam, bool) or not (
        isinstance(lam, (int, float)) or (hasattr(lam, "dtype") and jnp.issubdtype(lam.dtype, jnp.floating))
    ):
        raise ValueError(f"`lam` (={lam!r}) must be a real scalar.")
    if jnp.shape(lam) != ():
        raise ValueError(f"`lam` must be a scalar, got shape {jnp.shape(lam)}.")
    if not isinstance(lam, jax.core.Tracer):
        value = float(lam)
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"`lam` (={lam!r}) must be finite and >= 0.")
    params = jax.tree.map(jnp.asarray, params)
    return _l2_penalty(params, jnp.asarray(lam, dtype))


def _sum_of_squares(params, dtype):
    return sum((jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jax.tree.leaves(params)), jnp.zeros((), dtype))


@jax.custom_vjp
def _l2_penalty(params, lam):
    return lam * _sum_of_squares(params, lam.dtype)


def _l2_penalty_fwd(params, lam):
    total = _sum_of_squares(params, lam.dtype)
    return lam * total, (params, lam, total)


def _l2_penalty_bwd(residuals, g):
    params, lam, total = residuals
    scale = 2 * lam * g
    dparams = jax.tree.map(lambda w: (scale * w).astype(w.dtype), params)
    return dparams, g * total


_l2_penalty.defvjp(_l2_penalty_fwd, _l2_penalty_bwd)
