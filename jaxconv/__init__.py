"""jaxconv: convnet layers whose backward passes are hand-derived, verified custom_vjp rules.

The ops are re-exported here from :mod:`jaxconv.ops`; the wings are
:mod:`jaxconv.plan` (which computational form runs), :mod:`jaxconv.reference`
(every op in plain ``lax``), :mod:`jaxconv.matrix` (the matrix views),
:mod:`jaxconv.verify` (the checkers), :mod:`jaxconv.nn` (layers and models) and
:mod:`jaxconv.train` (steps, ``fit``, data, checkpoints); :mod:`jaxconv.lax` has
drop-ins with ``jax.lax``'s and Flax's signatures (docs/interop.md).
"""

from . import lax, matrix, nn, plan, reference, train, verify
from ._core.version import __version__
from .ops import (
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    batch_norm,
    conv1d,
    conv2d,
    conv3d,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    flatten,
    l2_penalty,
    linear,
    log_loss,
    lrn,
    lrn_params_from_caffe,
    lrn_params_from_pytorch,
    lrn_params_from_pytorch_mirrored,
    lrn_params_from_tensorflow,
    max_pool1d,
    max_pool2d,
    max_pool3d,
    relu,
    softmax,
    softmax_cross_entropy,
)

__all__ = [
    "__version__",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "flatten",
    "l2_penalty",
    "lax",
    "linear",
    "log_loss",
    "lrn",
    "lrn_params_from_caffe",
    "lrn_params_from_pytorch",
    "lrn_params_from_pytorch_mirrored",
    "lrn_params_from_tensorflow",
    "matrix",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "nn",
    "plan",
    "reference",
    "relu",
    "softmax",
    "softmax_cross_entropy",
    "train",
    "verify",
]
