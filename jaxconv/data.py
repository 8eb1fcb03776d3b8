"""Image classification data: the bundled 8x8 digits, MNIST / Fashion-MNIST IDX files, CIFAR-10 binary.

Every loader returns a :class:`Dataset`: float32 NHWC images scaled to ``[0, 1]``
and int32 class labels ``(N,)``, a train and a test part.  Nothing is ever
downloaded: the digits ship with scikit-learn, the others are read from a
directory the user names.  Nothing is unpickled either: MNIST is parsed from its
IDX headers, CIFAR-10 from its fixed-size binary records, with numpy.

A missing directory or file raises ``FileNotFoundError`` with the path; a file
whose contents are wrong (magic number, dimensions, length, label count, label
range) raises ``ValueError`` naming the file and what is wrong with it.

Formats:

* IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 type
  ndim``, then ``ndim`` big-endian uint32 dimensions, then the data in row-major
  order.  Images are type ``0x08`` (unsigned byte) with 3 dimensions
  ``(N, 28, 28)``: magic ``0x00000803``; labels ``0x00000801``, ``(N,)``.
  Files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or ``.gz``.
* CIFAR-10 binary version (https://www.cs.toronto.edu/~kriz/cifar.html):
  ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``, each a
  sequence of 3073-byte records: one label byte (0-9), then 3072 pixel bytes, the
  red plane, the green, the blue, each 32x32 row-major (CHW), converted here to HWC.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "num_batches",
    "read_idx",
]


class Dataset(NamedTuple):
    """Train and test images ``(N, H, W, C)`` float32 in ``[0, 1]``, labels ``(N,)`` int32 in ``[0, num_classes)``."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


# --- the bundled digits -----------------------------------------------------------------

#: Size of the fixed digits test split (20% of the 1797 images).
DIGITS_TEST_SIZE = 360


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), nothing downloaded.

    Pixels (0-16 in the source) are divided by 16; images ``(N, 8, 8, 1)``.  The
    split is fixed: ``train_test_split(test_size=360, random_state=0,
    stratify=labels)``, 1437 train and 360 test images, every class in the same
    proportion in both.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = _sk_load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------

_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read it ({type(err).__name__}: {err}); truncated or not gzip?") from err


def read_idx(path) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) into an array of its declared type and dimensions.

    Checks the two zero bytes of the magic number, the type code, and that the
    file is exactly ``4 + 4 * ndim + prod(dims) * itemsize`` bytes long.
    """
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (truncated?).")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_TYPES or ndim < 1:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x} (expected 0x0000TTNN: "
            f"two zero bytes, a type code in {sorted(hex(t) for t in _IDX_TYPES)}, a dimension count >= 1)."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, too short for the {ndim} dimensions of its header (truncated?).")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[type_code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: {len(data)} bytes, but its header {dims} of {dtype} needs {expected}: {kind}.")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    candidates = [directory / stem, directory / (stem + ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing data file: none of {[str(c) for c in candidates]} exists.")


def _directory(directory) -> pathlib.Path:
    if directory is None:
        raise ValueError("`data_dir` (=None): this dataset is read from files; name their directory.")
    path = pathlib.Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist or is not a directory.")
    return path


def _idx_pair(directory: pathlib.Path, prefix: str, num_classes: int):
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected unsigned-byte images (N, H, W), got {images.dtype} {images.shape}.")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected unsigned-byte labels (N,), got {labels.dtype} {labels.shape}.")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: {labels.shape[0]} labels, but {images_path} has {images.shape[0]} images."
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside [0, {num_classes}).")
    return (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)


def load_mnist(directory, *, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST (same format) from the four IDX files in ``directory``.

    Images ``(N, 28, 28, 1)`` (any ``H x W`` the headers declare), pixels / 255;
    60000 train and 10000 test images in the full data sets.
    """
    directory = _directory(directory)
    x_train, y_train = _idx_pair(directory, "train", 10)
    x_test, y_test = _idx_pair(directory, "t10k", 10)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{directory}: train images {x_train.shape[1:3]} and test images {x_test.shape[1:3]} differ in size.")
    return Dataset(name, x_train, y_train, x_test, y_test, 10)


# --- CIFAR-10 binary --------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_file(path: pathlib.Path):
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {str(path)!r} does not exist.")
    data = path.read_bytes()
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte records "
            f"(1 label byte + 3x32x32 pixels): truncated or not the CIFAR-10 binary version."
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if int(labels.max()) >= 10:
        bad = int(np.argmax(labels >= 10))
        raise ValueError(f"{path}: record {bad} has label {int(labels[bad])}, outside [0, 10) (not CIFAR-10?).")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return (images.astype(np.float32) / 255.0), labels.astype(np.int32)


def load_cifar10(directory) -> Dataset:
    """CIFAR-10, binary version, from ``directory`` (or its ``cifar-10-batches-bin`` subdirectory).

    Images ``(N, 32, 32, 3)`` (CHW records transposed to HWC), pixels / 255;
    50000 train and 10000 test images in the full data set.
    """
    directory = _directory(directory)
    if not (directory / CIFAR10_TEST_FILE).exists() and (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    train = [_cifar_file(directory / name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _cifar_file(directory / CIFAR10_TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10)


# --- by name ---------------------------------------------------------------------------

#: The names :func:`load_dataset` (and ``python -m jaxconv train --dataset``) accepts.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


def load_dataset(name: str, data_dir=None) -> Dataset:
    """``"digits"`` (bundled; ``data_dir`` ignored), ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` from ``data_dir``."""
    if name == "digits":
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        return load_mnist(data_dir, name=name)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"`name` (={name!r}) must be one of {list(DATASETS)}.")


# --- mini-batches ------------------------------------------------------------------------


def batches(images, labels, batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's ``(images, labels)`` mini-batches in a shuffled order fixed by ``(seed, epoch)``.

    The order is :func:`jaxconv.train.epoch_batches`' (a generator seeded with
    ``[seed, epoch]``), so a run resumed at ``epoch`` sees exactly the batches an
    uninterrupted run sees.  ``drop_last`` drops the final partial batch.
    """
    from .train import epoch_batches

    n = int(np.shape(images)[0])
    if np.shape(labels) != (n,):
        raise ValueError(f"`labels` {np.shape(labels)} must be (N,) with N = {n} images.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` (={batch_size!r}) must be a positive int.")
    for idx in epoch_batches(n, int(batch_size), seed=seed, epoch=epoch, drop_last=drop_last):
        yield images[idx], labels[idx]


def num_batches(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches :func:`batches` yields per epoch."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)

