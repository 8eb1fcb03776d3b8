"""The hand rules: every op is a ``jax.custom_vjp`` whose backward is a derived formula."""

from .conv import conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d
from .layers import flatten, linear, relu
from .local_response import (
    lrn,
    lrn_params_from_caffe,
    lrn_params_from_pytorch,
    lrn_params_from_pytorch_mirrored,
    lrn_params_from_tensorflow,
)
from .losses import l2_penalty, log_loss, softmax, softmax_cross_entropy
from .norm import batch_norm
from .pool import avg_pool1d, avg_pool2d, avg_pool3d, max_pool1d, max_pool2d, max_pool3d

__all__ = [
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
    "linear",
    "log_loss",
    "lrn",
    "lrn_params_from_caffe",
    "lrn_params_from_pytorch",
    "lrn_params_from_pytorch_mirrored",
    "lrn_params_from_tensorflow",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "relu",
    "softmax",
    "softmax_cross_entropy",
]
