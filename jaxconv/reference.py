"""Every op again in plain ``lax``/``jnp``, differentiated by ``jax.grad``: the oracle.

Nothing here has a custom rule.  Each function takes the same arguments as its
public counterpart and normalises them with the same helpers, so a test can call
``jax.vjp(reference.op, ...)`` next to ``jax.vjp(jaxconv.op, ...)``.
"""

from __future__ import annotations

from jax import lax

from . import _args


# --- convolution -------------------------------------------------------------

def conv2d(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1):
    """Plain ``lax.conv_general_dilated``; its gradient is XLA's autodiff."""
    stride = _args.pair(stride, "stride")
    dilation = _args.pair(dilation, "dilation")
    pads = _args.padding_2d(padding, x.shape[1:3], w.shape[:2], stride, dilation)
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    return y if b is None else y + b


# --- pooling (avg_pool2d, max_pool2d) ---------------------------------------


# --- local response normalisation --------------------------------------------


# --- layers (relu, linear, flatten) ------------------------------------------


# --- losses (softmax, log_loss, softmax_cross_entropy, l2_penalty) -----------
