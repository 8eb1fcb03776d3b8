"""jaxconv: convnet layers whose backward passes are hand-derived, verified custom_vjp rules."""

from . import onednn, plan, reference, verify, winograd
from . import matrix
from .conv import conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d
from .layers import flatten, linear, relu
from .norm import batch_norm
from .losses import l2_penalty, log_loss, softmax, softmax_cross_entropy
from .pool import avg_pool1d, avg_pool2d, avg_pool3d, max_pool1d, max_pool2d, max_pool3d
from . import nn, models, train
from . import checkpoint, data, plots, testing
from .lrn import (
    lrn,
    lrn_params_from_caffe,
    lrn_params_from_pytorch,
    lrn_params_from_pytorch_mirrored,
    lrn_params_from_tensorflow,
)

__version__ = "0.1.0"

__all__ = [
    "avg_pool1d",
    "batch_norm",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "flatten",
    "l2_penalty",
    "linear",
    "log_loss",
    "lrn",
    "lrn_params_from_caffe",
    "lrn_params_from_pytorch",
    "lrn_params_from_pytorch_mirrored",
    "lrn_params_from_tensorflow",
    "relu",
    "softmax",
    "softmax_cross_entropy",
    "matrix",
    "models",
    "nn",
    "train",
    "checkpoint",
    "data",
    "onednn",
    "plan",
    "plots",
    "reference",
    "testing",
    "verify",
    "winograd",
    "__version__",
]
