"""Small convnets built from :mod:`jaxconv.nn`, each ``(init_fun, apply_fun)``.

Every model maps NHWC images ``(N, H, W, C)`` to logits ``(N, num_classes)``;
the softmax is in the loss (:func:`jaxconv.softmax_cross_entropy`, the fused,
stable ``-log softmax(s)[y]``).  All accept any image size from 8x8 up
(the bundled 8x8 digits, 28x28 MNIST, 32x32x3 CIFAR-10): every layer that
would otherwise shrink a small image below its window uses SAME padding.

``MODELS`` maps the command-line names to the constructors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax

from . import layers as nn
from .layers import Layer

__all__ = [
    "MODELS",
    "alexnet_small",
    "check_input_shape",
    "dd2424_net",
    "lenet5",
    "min_input_size",
    "resnet_small",
    "resnet_small_nobn",
]


def _classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` (={num_classes!r}) must be a positive int.")
    return num_classes


def dd2424_net(num_classes: int = 10, *, num_filters: int = 16, filter_size: int = 3) -> Layer:
    """The DD2424 course network: one conv layer, ReLU, one FC layer.

    ``S_i = X * F_i + b_i`` (``n_F = num_filters`` filters ``f x f x C``, VALID),
    ``H = max(0, S)``, ``s = W vec(H) + b``; ``p = SOFTMAX(s)`` and the
    cross-entropy + L2 objective are the training loss's (``make_train_step(..., l2=lam)``).
    For a ``w x h`` image ``W`` is ``(w-f+1)(h-f+1) n_F x C`` (the transpose of
    the column-vector form; rows of ``vec(H)`` are row-major here, see :func:`jaxconv.flatten`).
    """
    return nn.serial(
        nn.Conv(num_filters, filter_size),
        nn.Relu,
        nn.Flatten,
        nn.Dense(_classes(num_classes)),
    )


def lenet5(num_classes: int = 10) -> Layer:
    """LeNet-5 (LeCun et al. 1998) with ReLU: conv 6@5x5, avg-pool 2, conv 16@5x5, avg-pool 2, FC 120, 84, C.

    Both convolutions are SAME so 8x8 digits fit (8 -> 4 -> 2); on 28x28 the
    flattened features are 7x7x16, on 32x32 8x8x16.  The subsampling layers are
    average pooling, as in the original.
    """
    return nn.serial(
        nn.Conv(6, 5, padding="SAME"),
        nn.Relu,
        nn.AvgPool(2, padding="SAME"),
        nn.Conv(16, 5, padding="SAME"),
        nn.Relu,
        nn.AvgPool(2, padding="SAME"),
        nn.Flatten,
        nn.Dense(120),
        nn.Relu,
        nn.Dense(84),
        nn.Relu,
        nn.Dense(_classes(num_classes)),
    )


def alexnet_small(num_classes: int = 10, *, width: int = 32) -> Layer:
    """A scaled-down AlexNet (Krizhevsky et al. 2012): conv-ReLU-LRN-overlapping max-pool, twice; three convs; FC.

    ``conv w@5x5 - ReLU - LRN - maxpool 3/2 - conv 2w@3x3 - ReLU - LRN - maxpool 3/2 -
    conv 3w@3x3 - ReLU - conv 2w@3x3 - ReLU - maxpool 3/2 - FC 128 - ReLU - FC C``,
    all SAME, so an 8x8 image ends 1x1 and a 32x32 one 4x4.  LRN has AlexNet's
    ``size=5, kappa=2, alpha=1e-4, beta=0.75`` (MatConvNet convention).
    """
    return nn.serial(
        nn.Conv(width, 5, padding="SAME"),
        nn.Relu,
        nn.LRN(),
        nn.MaxPool(3, stride=2, padding="SAME"),
        nn.Conv(2 * width, 3, padding="SAME"),
        nn.Relu,
        nn.LRN(),
        nn.MaxPool(3, stride=2, padding="SAME"),
        nn.Conv(3 * width, 3, padding="SAME"),
        nn.Relu,
        nn.Conv(2 * width, 3, padding="SAME"),
        nn.Relu,
        nn.MaxPool(3, stride=2, padding="SAME"),
        nn.Flatten,
        nn.Dense(128),
        nn.Relu,
        nn.Dense(_classes(num_classes)),
    )


def _conv_bn(channels, kernel, stride=1, *, batch_norm: bool, last: bool = False):
    """``conv`` (no bias) then ``BatchNorm``, or a biased ``conv`` alone.

    The last normalisation of a residual branch starts with ``scale = 0`` (Goyal
    et al. 2017), so each block starts as its shortcut; without batch norm the
    branch's last convolution starts at zero instead, to the same effect.
    """
    if batch_norm:
        return [
            nn.Conv(channels, kernel, stride=stride, padding="SAME", bias=False),
            nn.BatchNorm(scale_init=nn.zeros if last else None),
        ]
    return [nn.Conv(channels, kernel, stride=stride, padding="SAME", w_init=nn.zeros if last else nn.he_normal)]


def _block(channels, stride, *, batch_norm: bool, project: bool):
    """``relu(branch(x) + shortcut(x))``, ``branch = conv3x3_s-[BN]-ReLU-conv3x3-[BN]``.

    The shortcut is the identity, or a strided 1x1 convolution (and BN) where
    the shape changes (``project``).
    """
    main = (
        *_conv_bn(channels, 3, stride, batch_norm=batch_norm),
        nn.Relu,
        *_conv_bn(channels, 3, batch_norm=batch_norm, last=True),
    )
    if project:
        shortcut = (
            nn.serial(nn.Conv(channels, 1, stride=stride, bias=False), nn.BatchNorm())
            if batch_norm
            else nn.Conv(channels, 1, stride=stride)
        )
    else:
        shortcut = None
    return nn.serial(nn.residual(*main, shortcut=shortcut), nn.Relu)


def resnet_small(num_classes: int = 10, *, widths: Sequence[int] = (16, 32, 64), batch_norm: bool = True) -> Layer:
    """A small ResNet (He et al. 2016): stem conv, one basic block per stage, global average pool, FC.

    ``conv w0@3x3 - BN - ReLU``, then per stage ``i`` a residual block of two
    3x3 convolutions, each followed by batch normalisation (conv-BN-ReLU, as
    ResNets are built; stride 2 and a strided 1x1 conv-BN projection shortcut
    from the second stage on), then :data:`jaxconv.nn.GlobalAvgPool`
    (docs/pooling.md §3; ResNet's ``AvPool, 512`` head) and ``FC C``.
    8x8 -> 8, 4, 2 spatially; 28x28 -> 28, 14, 7; 32x32 -> 32, 16, 8.

    ``batch_norm=False`` is the same network without normalisation (biased
    convolutions; the last convolution of each branch starts at zero), the
    ``resnet_small_nobn`` of the command line.
    """
    layers = [
        *_conv_bn(widths[0], 3, batch_norm=batch_norm),
        nn.Relu,
        _block(widths[0], 1, batch_norm=batch_norm, project=False),
    ]
    for width in widths[1:]:
        layers.append(_block(width, 2, batch_norm=batch_norm, project=True))
    layers += [nn.GlobalAvgPool, nn.Dense(_classes(num_classes))]
    return nn.serial(*layers)


def resnet_small_nobn(num_classes: int = 10, *, widths: Sequence[int] = (16, 32, 64)) -> Layer:
    """:func:`resnet_small` without batch normalisation."""
    return resnet_small(num_classes, widths=widths, batch_norm=False)


MODELS: dict[str, Callable[..., Layer]] = {
    "dd2424_net": dd2424_net,
    "lenet5": lenet5,
    "alexnet_small": alexnet_small,
    "resnet_small": resnet_small,
    "resnet_small_nobn": resnet_small_nobn,
}
"""Command-line name -> constructor ``f(num_classes=10) -> (init_fun, apply_fun)``."""


#: The largest image side :func:`min_input_size` tries.
MAX_MIN_SIDE = 512


def _builds(name: str, side: int, channels: int) -> bool:
    """Whether ``MODELS[name]`` accepts ``(side, side, channels)`` images (shapes only, nothing allocated)."""
    init_fun, _ = MODELS[name](10)
    try:
        jax.eval_shape(lambda: init_fun(jax.random.key(0), (1, side, side, channels)))
    except ValueError:  # a window larger than its (padded) input, a negative output size
        return False
    return True


@functools.cache
def min_input_size(name: str, channels: int = 1) -> int:
    """The smallest image side ``s`` such that the model ``name`` (a :data:`MODELS` key) takes ``s x s`` images.

    Found by building the model on ``(s, s, channels)`` shapes (``jax.eval_shape``:
    nothing is computed); the SAME-padded models take 1x1 images, ``dd2424_net``
    (a VALID 3x3 convolution) at least 3x3.  ``ValueError`` for an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"`name` (={name!r}) must be one of {sorted(MODELS)}.")
    low, high = 1, MAX_MIN_SIDE
    if not _builds(name, high, channels):
        raise ValueError(f"model {name!r} takes no image of up to {high}x{high}x{channels}.")
    while low < high:  # every model here takes every size from its minimum up: bisect
        mid = (low + high) // 2
        low, high = (low, mid) if _builds(name, mid, channels) else (mid + 1, high)
    return low


def check_input_shape(name: str, shape: Sequence[int]) -> None:
    """``ValueError`` naming the model and its minimum size if ``MODELS[name]`` cannot take ``(H, W, C)`` images.

    Call it where images meet a model (training, evaluation): a 1x1 image with
    ``dd2424_net`` is refused as ``model 'dd2424_net' needs images of at least
    3x3, got 1x1`` rather than by the failing convolution deep inside.
    """
    if name not in MODELS:
        raise ValueError(f"`model` (={name!r}) must be one of {sorted(MODELS)}.")
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"`shape` (={tuple(shape)!r}) must be an image shape (H, W, C) of positive ints.")
    h, w, c = shape
    side = min_input_size(name, c)
    if h < side or w < side:
        raise ValueError(
            f"model {name!r} needs images of at least {side}x{side}, got {h}x{w} (input shape {tuple(shape)})."
        )
