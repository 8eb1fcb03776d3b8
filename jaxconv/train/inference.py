"""Using a trained run: load its checkpoint, evaluate it on a data split, classify images.

Everything here works from a checkpoint alone (``python -m jaxconv evaluate``
and ``predict`` call these): the checkpoint written by :func:`jaxconv.train.fit`
names its model, its number of classes, its input shape and the mean and
standard deviation its training images were standardised with.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ..nn import models
from ..ops import losses
from . import checkpoint, data, plots
from .images import read_image
from .step import build_optimizer, evaluate, init_optimizer, init_params, standardize

__all__ = ["checkpoint_path", "confusion_png_path", "evaluate_run", "load_trained", "predict", "standardized"]


def checkpoint_path(run: str | os.PathLike, best: bool = False) -> pathlib.Path:
    """The checkpoint file of ``run``: a run directory (its last or, ``best=True``, its best-on-validation
    checkpoint) or a checkpoint file.  ``FileNotFoundError`` / ``ValueError`` if there is no such checkpoint."""
    path = pathlib.Path(run)
    if path.is_dir():
        path = path / ("best.safetensors" if best else "checkpoint.safetensors")
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: {run} holds no such checkpoint"
                + (" (was the run trained with --val-fraction 0?)" if best else "")
                + "."
            )
    elif best:
        raise ValueError(f"--best needs a run directory, got the file {run}.")
    return path


def load_trained(run: str | os.PathLike, *, best: bool = False) -> tuple[Callable, Any, dict]:
    """``(apply_fun, params, metadata)`` from a checkpoint :func:`jaxconv.train.fit` wrote: everything evaluation needs.

    ``run`` is a checkpoint file or a run directory (its ``checkpoint.safetensors``,
    or with ``best=True`` its ``best.safetensors``).  The model is rebuilt from
    the metadata's ``model`` entry and the parameters restored into it
    (checksums verified).  Standardise inputs with :func:`standardized`.
    ``apply_fun(params, x)`` runs in evaluation mode (batch normalisation with
    its running statistics).  ``ValueError`` if the file is not such a checkpoint.
    """
    path = checkpoint_path(run, best)
    meta = checkpoint.read_metadata(path)
    model, config, stats = meta.get("model"), meta.get("config"), meta.get("standardization")
    if not (isinstance(model, dict) and isinstance(config, dict) and isinstance(stats, dict)):
        raise ValueError(
            f"{path}: no 'model', 'config' and 'standardization' in its metadata: not a checkpoint "
            f"written by `python -m jaxconv train` of this version."
        )
    name, classes, input_shape = checkpoint.check_model_entry(path, model)  # bounded before anything is built
    _check_standardization(path, stats)
    if name in models.MODELS:
        try:
            models.check_input_shape(name, input_shape)
        except ValueError as err:
            raise ValueError(f"{path}: its metadata's input_shape does not fit its model: {err}") from err
    try:
        init_fun, apply_fun = models.MODELS[name](classes)
        optimizer = build_optimizer(config, int(model["steps_per_epoch"]))

        def template():
            params = init_params(init_fun, (-1, *input_shape), seed=0)[1]
            return {"params": params, "opt_state": init_optimizer(optimizer, params)}

        abstract = jax.eval_shape(template)  # shapes only: nothing the metadata declares is allocated
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its metadata does not describe a model and optimizer ({err!r}).") from err
    state, meta = checkpoint.restore(path, abstract)
    bad = [
        leaf
        for leaf, value in jax.tree_util.tree_leaves_with_path(state["params"])
        if not np.all(np.isfinite(np.asarray(value)))
    ]
    if bad:
        raise ValueError(
            f"{path}: its weights are not finite (NaN or infinity in {len(bad)} parameter array(s), "
            f"the first ['params']{jax.tree_util.keystr(bad[0])}): the model cannot be evaluated or used; "
            f"train again, or use the run's best checkpoint (--best) if it has one."
        )
    return apply_fun, state["params"], meta


def _check_standardization(path, stats: dict) -> None:
    """``ValueError`` unless the checkpoint's standardisation is a finite ``mean`` and a finite ``std > 0``."""
    values: dict[str, float] = {}
    for key in ("mean", "std"):
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"{path}: its metadata's standardization {key} (={value!r}) is not a finite number "
                f"(the file was edited or is not a checkpoint written by `python -m jaxconv train`)."
            )
        values[key] = value
    if values["std"] <= 0:
        raise ValueError(
            f"{path}: its metadata's standardization std (={values['std']!r}) must be > 0 "
            f"(the file was edited or is not a checkpoint written by `python -m jaxconv train`)."
        )


def standardized(images: ArrayLike, metadata: dict) -> np.ndarray:
    """``images`` standardised with the mean and std the checkpoint's model was trained with."""
    stats = metadata["standardization"]
    return standardize(images, stats=(stats["mean"], stats["std"]))[0]


def confusion_png_path(confusion_png: str | os.PathLike, split: str = "test") -> pathlib.Path:
    """Where :func:`evaluate_run` draws its confusion matrix: ``confusion_png`` itself, a ``.png`` file name,
    or ``confusion_png/confusion-<split>.png`` when it is an existing directory.  ``ValueError`` for another
    name (e.g. ``x.txt``): the file written is a PNG, and its name says so."""
    path = pathlib.Path(confusion_png)
    if path.is_dir():
        return path / f"confusion-{split}.png"
    if path.suffix.lower() != ".png":
        raise ValueError(
            f"the confusion matrix (={str(confusion_png)!r}) is written as a PNG: name a .png file "
            f"or an existing directory."
        )
    return path


def evaluate_run(
    run: str | os.PathLike,
    *,
    best: bool = False,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    confusion_png: str | os.PathLike | None = None,
) -> dict:
    """Accuracy, loss and confusion matrix of a trained run on a data split.

    Args:
      run: a run directory or a checkpoint file.
      best: the run's best-on-validation checkpoint, not its last.
      dataset: a :data:`jaxconv.train.data.DATASETS` name; default: the one the run was trained on.
      data_dir: the data set's directory (not needed for ``"digits"``).
      split: ``"test"`` or ``"train"``.
      confusion_png: where to draw the confusion matrix (needs matplotlib): a ``.png`` file, or an existing
        directory (its ``confusion-<split>.png``; :func:`confusion_png_path`); ``None`` draws nothing.

    Returns ``{"checkpoint", "epoch", "model", "dataset", "split", "images",
    "accuracy", "loss", "confusion_matrix" (a list of rows), "confusion_png",
    "confusion_note"}``: ``confusion_png`` is the file written (``None`` if
    none was), ``confusion_note`` why a requested PNG was not written (the
    directory is read-only, matplotlib is missing; ``None`` otherwise): the
    evaluation itself does not fail for it.  ``ValueError`` / ``OSError`` for
    a missing or foreign checkpoint (non-finite weights, a standardisation or
    data set name that is not the one ``python -m jaxconv train`` writes), data
    that cannot be read or does not fit the model, or a PNG name that is not
    a ``.png`` file or a directory.
    """
    if split not in ("test", "train"):
        raise ValueError(f"`split` (={split!r}) must be 'test' or 'train'.")
    png = None if confusion_png is None else confusion_png_path(confusion_png, split)
    path = checkpoint_path(run, best)
    apply_fun, params, meta = load_trained(path)
    name = dataset
    if name is None:
        name = meta["config"].get("dataset")
        if not isinstance(name, str) or name not in data.DATASETS:
            raise ValueError(
                f"{path}: its metadata's config names no data set (dataset={name!r}; expected one of "
                f"{list(data.DATASETS)}): name one with --dataset (`dataset`)."
            )
    if name != "digits" and data_dir is None:
        raise ValueError(f"the {name} files are read from a directory: name it with --data-dir (`data_dir`).")
    loaded = data.load_dataset(name, data_dir)
    images, labels = (
        (loaded.test_images, loaded.test_labels) if split == "test" else (loaded.train_images, loaded.train_labels)
    )
    expected = tuple(meta["model"]["input_shape"])
    if images.shape[1:] != expected:
        models.check_input_shape(meta["model"]["name"], tuple(int(d) for d in images.shape[1:]))
        raise ValueError(f"{name} images are {images.shape[1:]}, the model takes {expected}.")
    x = standardized(images, meta)
    result = evaluate(apply_fun, params, x, labels, batch_size=512)
    predict_batch = jax.jit(lambda p, batch: jnp.argmax(apply_fun(p, batch), axis=-1))
    predictions = np.concatenate([np.asarray(predict_batch(params, x[i : i + 512])) for i in range(0, len(x), 512)])
    matrix = plots.confusion_matrix(labels, predictions, loaded.num_classes)
    note = None
    if png is not None:
        title = f"{meta['model']['name']}, epoch {meta.get('epoch')}, {name} {split}: {result['accuracy']:.2%}"
        try:
            plots.plot_confusion(matrix, png, title=title)
        except (OSError, ImportError) as err:  # a read-only run directory, no matplotlib: the numbers stand
            note = f"the confusion matrix was not written to {png}: {err}"
            png = None
    return {
        "checkpoint": str(path),
        "epoch": meta.get("epoch"),
        "model": meta["model"]["name"],
        "dataset": name,
        "split": split,
        "images": len(labels),
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "confusion_matrix": matrix.tolist(),
        "confusion_png": None if png is None else str(png),
        "confusion_note": note,
    }


def predict(
    run: str | os.PathLike, images: Sequence[str | os.PathLike], *, best: bool = False, top_k: int = 3
) -> list[dict]:
    """The ``top_k`` classes and their probabilities for each image file, by a trained run.

    ``images`` are ``.png`` or ``.npy`` files (:func:`read_image`) of the
    model's input size.  Returns one ``{"image": str(path), "top": [{"class",
    "probability"}, ...]}`` per image, most probable first.  ``ValueError`` /
    ``OSError`` for a missing or foreign checkpoint or an unreadable image.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` (={top_k!r}) must be an int >= 1.")
    if isinstance(images, (str, os.PathLike)) or not len(images):
        raise ValueError(f"`images` (={images!r}) must be a non-empty list of image files.")
    apply_fun, params, meta = load_trained(checkpoint_path(run, best))
    shape = tuple(meta["model"]["input_shape"])
    x = standardized(np.stack([read_image(p, shape) for p in images]), meta)
    probabilities = np.asarray(jax.jit(lambda p, b: losses.softmax(apply_fun(p, b)))(params, x), np.float64)
    k = min(top_k, probabilities.shape[1])
    results = []
    for name, probs in zip(images, probabilities):
        top = np.argsort(-probs, kind="stable")[:k]
        results.append({"image": str(name), "top": [{"class": int(c), "probability": float(probs[c])} for c in top]})
    return results
