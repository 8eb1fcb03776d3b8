"""PNG plots of a training run (matplotlib, Agg backend: no display needed).

* :func:`plot_curves`: loss and accuracy per epoch, train and test, two panels.
* :func:`plot_filters`: the first convolution layer's filters as a grid of
  images, the way learnt filters are usually shown.
* :func:`plot_confusion`: a confusion matrix (:func:`confusion_matrix`) as a
  heat map with its counts.

Each PNG is rendered in memory and written atomically
(:func:`jaxconv.train.checkpoint.atomic_write_bytes`): a symbolic link at the
name is replaced, never followed, and a failed write (a full disk) raises
:class:`jaxconv.train.files.WriteError` naming the file, leaving what was there.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from .checkpoint import atomic_write_bytes

__all__ = ["confusion_matrix", "first_conv_kernel", "plot_confusion", "plot_curves", "plot_filters"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path, *, title: str = "") -> pathlib.Path:
    """Loss (left) and accuracy (right) against the epoch; writes ``path`` (PNG) and returns it.

    ``history``: one dict per epoch with ``"epoch"`` and any of ``"train_loss"``,
    ``"test_loss"``, ``"train_accuracy"``, ``"test_accuracy"``.
    """
    if not history:
        raise ValueError("`history` is empty: nothing to plot.")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for part, style in (("train", "o-"), ("val", "^:"), ("test", "s--")):
            key = f"{part}_{metric}"
            if all(key in h for h in history):
                ax.plot(epochs, [h[key] for h in history], style, label=part, markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")
    ax_acc.set_ylim(top=1.0)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def first_conv_kernel(params):
    """The first 4-D leaf of ``params`` (in pytree order: a ``serial`` network's first conv's HWIO kernel), or None."""

    for leaf in jax.tree.leaves(params):
        if np.ndim(leaf) == 4:
            return np.asarray(leaf)
    return None


def plot_filters(kernel, path, *, title: str = "first-layer filters") -> pathlib.Path:
    """A grid of the ``O`` filters of an HWIO ``kernel`` ``(KH, KW, C, O)``; writes ``path`` (PNG).

    Three input channels are shown as RGB; one as grey; any other number side by
    side within each filter's cell.  Each filter is scaled to ``[0, 1]`` on its own
    (the shapes matter, not the magnitudes).
    """
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"`kernel` must be HWIO (KH, KW, C, O), got shape {kernel.shape}.")
    plt = _pyplot()
    kh, kw, c, o = kernel.shape
    cols = math.ceil(math.sqrt(o))
    rows = math.ceil(o / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols * (1 if c in (1, 3) else c), 1.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= o:
            continue
        f = kernel[..., i]
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        if c == 3:
            ax.imshow(f, interpolation="nearest")
        else:
            # (KH, KW, C) -> (KH, C * KW): the channels side by side.
            ax.imshow(f.transpose(0, 2, 1).reshape(kh, c * kw), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    fig.suptitle(f"{title} ({o} x {kh}x{kw}x{c})")
    return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
    """Lay out, write ``fig`` to ``path`` (creating its folder) atomically, close it; the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = pathlib.Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=100, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # a link at the name is replaced, not followed
    return path


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """``C[i, j]``: how many examples of class ``i`` were predicted as class ``j`` (int64, ``(K, K)``)."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"`labels` {labels.shape} and `predictions` {predictions.shape} must be one 1-D shape.")
    for name, a in (("labels", labels), ("predictions", predictions)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"`{name}` must lie in [0, {num_classes}).")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_confusion(matrix, path, *, title: str = "", class_names: Sequence[str] | None = None) -> pathlib.Path:
    """The confusion matrix ``matrix`` (true class per row, predicted per column) with its counts; writes ``path``."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"`matrix` must be square (K, K), got shape {matrix.shape}.")
    k = matrix.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else list(class_names)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax.imshow(matrix, cmap="Blues")
    high = matrix.max() if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if high and matrix[i, j] > high / 2 else "black",
            )
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
