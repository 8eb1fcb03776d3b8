"""Image classification data: the bundled 8x8 digits, MNIST / Fashion-MNIST IDX files, CIFAR-10 binary.

Every loader returns a :class:`Dataset`: float32 NHWC images scaled to ``[0, 1]``
and int32 class labels ``(N,)``, a train and a test part.  Nothing is ever
downloaded: the digits ship with scikit-learn, the others are read from a
directory the user names.  Nothing is unpickled either: MNIST is parsed from its
IDX headers, CIFAR-10 from its fixed-size binary records, with numpy.

A loader never reads more than a file's header promises (plus one byte, to
see that the file ends there):

* Only regular files are opened.  A directory, FIFO, device or socket where a
  data file should be is refused from ``stat`` before it is opened (so a FIFO
  cannot block and ``/dev/zero`` cannot stream forever).
* An IDX header is parsed first (``4 + 4 * ndim`` bytes) and its data size
  ``prod(dims) * itemsize`` computed with Python ints (no overflow).  A raw file
  must be exactly that long: checked against its size from ``stat`` before any
  data is read.  A ``.gz`` file cannot know its inflated size in advance, so:
  a header declaring more than deflate's 1032:1 limit allows for the compressed
  size is refused from the header alone; where the gzip trailer's ISIZE (the
  last member's length mod 2**32) disagrees with the declared size, the data is
  first counted in constant memory (a multi-member file may still be right);
  and the data is inflated in chunks into a buffer grown as it arrives, stopping
  one byte past the declared size: a small file that inflates to gigabytes
  is refused there, in a few MB of memory.  Nothing is allocated for a size
  merely declared.
* A CIFAR-10 file's size from ``stat`` must be a whole number of records before
  it is read.
* Every loader's result then passes a sanity check, so that training never
  starts on data it cannot learn from: no empty split, no zero-size images, the
  same image size in both splits, and training images that are not all one
  value (standardising them would divide by zero).

Errors a caller (e.g. the CLI) should expect, each naming the file:

* ``FileNotFoundError``: a missing directory or data file.
* ``IsADirectoryError``: a directory where a data file should be;
  ``NotADirectoryError``: the data directory is a file.
* ``ValueError``: a FIFO, device or socket where a data file should be; a file
  whose contents are wrong (magic number, dimensions, length, truncated or
  trailing data, an unreadable gzip, label count, label range); a split that is
  empty, of zero-size or constant images.
* other ``OSError``\\ s (e.g. ``PermissionError``) as the OS raises them.

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

import contextlib
import gzip
import io
import math
import pathlib
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from . import files as _files

__all__ = [
    "DATASETS",
    "Dataset",
    "batches",
    "epoch_batches",
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


def _checked(dataset: Dataset, train_source: str, test_source: str) -> Dataset:
    """``dataset`` if training can start on it, else a ``ValueError`` naming the file(s) the bad split came from."""
    splits = (("training", dataset.train_images, train_source), ("test", dataset.test_images, test_source))
    for split, images, source in splits:
        if images.shape[0] == 0:
            raise ValueError(f"{source}: 0 {split} images: the {split} split is empty.")
        if 0 in images.shape[1:]:
            size = "x".join(map(str, images.shape[1:]))
            raise ValueError(f"{source}: its {split} images are {size} (H x W x C): zero-size images.")
    if dataset.train_images.shape[1:] != dataset.test_images.shape[1:]:
        raise ValueError(
            f"{train_source}: training images {dataset.train_images.shape[1:]}, but {test_source}: "
            f"test images {dataset.test_images.shape[1:]}: the two splits differ in image size."
        )
    low, high = float(dataset.train_images.min()), float(dataset.train_images.max())
    if low == high:
        raise ValueError(
            f"{train_source}: every pixel of its {dataset.train_images.shape[0]} training images is "
            f"{low:g}: constant images (their standard deviation is 0; standardising them would divide "
            f"by zero)."
        )
    return dataset


def _unit_float(pixels: np.ndarray) -> np.ndarray:
    """Unsigned-byte pixels as float32 in ``[0, 1]``."""
    out = pixels.astype(np.float32)
    out /= 255.0
    return out


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
    source = "scikit-learn's bundled digits"
    return _checked(Dataset("digits", x_train, y_train, x_test, y_test, 10), source, source)


# --- reading regular files, never past what was promised ----------------------------------

#: Bytes asked of a file per read: bounds what one read of a gzip stream inflates at a time.
_READ_CHUNK = 1 << 20
#: A buffer for data of unknown extent (inflated gzip) starts at this size and doubles as data arrives.
_GROW_FROM = 1 << 24
#: Deflate's largest inflation: 258 bytes from a 2-bit length/distance pair, 1032:1 (gzip adds 18 bytes more).
_DEFLATE_MAX_RATIO = 1032


def _refusal(path: pathlib.Path) -> Callable[[str], Exception]:
    def refuse(kind: str) -> Exception:
        if kind == "directory":
            return IsADirectoryError(f"{path} is a directory, not a data file.")
        kind = "FIFO (named pipe)" if kind == "FIFO" else kind
        return ValueError(f"{path} is a {kind}, not a data file (only regular files are read).")

    return refuse


@contextlib.contextmanager
def _open_regular(path: pathlib.Path) -> Iterator[tuple[io.BufferedIOBase, int]]:
    """``(file, size)`` of the regular file ``path``; read errors become a ``ValueError`` naming it."""
    try:
        with _files.open_regular(path, _refusal(path)) as (f, size):
            try:
                yield f, size
            except (EOFError, OSError, zlib.error) as err:  # FileNotFoundError included: only stat's is missing
                hint = "; truncated or not gzip?" if path.suffix == ".gz" else ""
                raise ValueError(f"{path}: cannot read it ({type(err).__name__}: {err}){hint}") from err
    except FileNotFoundError:
        raise FileNotFoundError(f"missing data file: {str(path)!r} does not exist.") from None


def _read_upto(f: io.BufferedIOBase, limit: int, *, grow_from: int) -> np.ndarray:
    """At most ``limit`` bytes of ``f`` (fewer at its end) as uint8.

    The buffer starts at ``grow_from`` bytes and doubles only as data arrives,
    so a size merely declared is never allocated before the data is there.
    """
    buf = np.empty(min(limit, grow_from), np.uint8)
    total = 0
    while total < limit:
        if total == buf.size:
            buf = np.concatenate([buf, np.empty(min(buf.size, limit - buf.size), np.uint8)])
        n = f.readinto(buf.data[total : min(buf.size, total + _READ_CHUNK)])
        if not n:
            break
        total += n
    return buf[:total]


def _count_upto(f: io.BufferedIOBase, limit: int) -> int:
    """How many bytes are left in ``f``, counting no further than ``limit``; constant memory."""
    scratch = memoryview(bytearray(min(limit, _READ_CHUNK)))
    total = 0
    while total < limit:
        n = f.readinto(scratch[: limit - total])
        if not n:
            break
        total += n
    return total


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class _IdxHeader(NamedTuple):
    dtype: np.dtype
    dims: tuple[int, ...]
    size: int  # bytes: 4 + 4 * ndim

    @property
    def total(self) -> int:
        """The file length the header promises, in Python ints (no overflow)."""
        return self.size + math.prod(self.dims) * self.dtype.itemsize

    def describe(self) -> str:
        return f"its header {self.dims} of {self.dtype} needs {self.total}"


def _idx_header(f: io.BufferedIOBase, path: pathlib.Path) -> _IdxHeader:
    """Read and check the magic number and dimensions, and nothing more."""
    magic = f.read(4)
    if len(magic) < 4:
        raise ValueError(f"{path}: {len(magic)} bytes, too short for an IDX header (truncated?).")
    zero, type_code, ndim = int.from_bytes(magic[:2], "big"), magic[2], magic[3]
    if zero != 0 or type_code not in _IDX_TYPES or ndim < 1:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(magic, 'big'):08x} (expected 0x0000TTNN: "
            f"two zero bytes, a type code in {sorted(hex(t) for t in _IDX_TYPES)}, a dimension count >= 1)."
        )
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(
            f"{path}: {4 + len(raw_dims)} bytes, too short for the {ndim} dimensions of its header (truncated?)."
        )
    return _IdxHeader(_IDX_TYPES[type_code], struct.unpack(f">{ndim}I", raw_dims), 4 + 4 * ndim)


def _length_error(path: pathlib.Path, header: _IdxHeader, found: int, *, inflated: bool) -> ValueError:
    """``found``: the file's length, or for a stream read one byte past the header's promise, a lower bound."""
    if found < header.total:
        length, verdict = f"{found}", "truncated"
    else:
        length = f"at least {found}" if inflated else f"{found}"
        verdict = "it has trailing bytes (it is larger than its header declares)"
    what = "inflates to" if inflated else "is"
    return ValueError(f"{path}: {what} {length} bytes, but {header.describe()}: {verdict}.")


def _idx_data(
    f: io.BufferedIOBase, path: pathlib.Path, header: _IdxHeader, *, grow_from: int, inflated: bool
) -> np.ndarray:
    """The data after ``header``: exactly as many bytes as it promises, and then the end of the file."""
    nbytes = header.total - header.size
    data = _read_upto(f, nbytes + 1, grow_from=grow_from)
    if data.size != nbytes:
        raise _length_error(path, header, header.size + data.size, inflated=inflated)
    return data.view(header.dtype).reshape(header.dims)


def _gzip_isize(f: io.BufferedIOBase, size: int) -> int | None:
    """The gzip trailer's ISIZE: the last member's inflated length mod 2**32 (``f`` left at its start)."""
    if size < 4:
        return None
    f.seek(size - 4)
    isize = int.from_bytes(f.read(4), "little")
    f.seek(0)
    return isize


def _read_idx_gzip(f: io.BufferedIOBase, size: int, path: pathlib.Path) -> np.ndarray:
    isize = _gzip_isize(f, size)
    with gzip.GzipFile(fileobj=f, mode="rb") as stream:
        header = _idx_header(stream, path)
        if header.total > _DEFLATE_MAX_RATIO * size:
            raise ValueError(
                f"{path}: its header {header.dims} of {header.dtype} declares {header.total} bytes, but a {size}-byte "
                f"gzip file inflates to at most {_DEFLATE_MAX_RATIO * size} (deflate's limit is "
                f"{_DEFLATE_MAX_RATIO}:1): a damaged header, or most of the data is missing."
            )
        if isize is not None and isize != header.total % 2**32:
            # Wrong, unless several gzip members were concatenated (ISIZE covers the last one): count to be sure.
            nbytes = header.total - header.size
            found = header.size + _count_upto(stream, nbytes + 1)
            if found != header.total:
                raise _length_error(path, header, found, inflated=True)
            stream.seek(header.size)
        return _idx_data(stream, path, header, grow_from=_GROW_FROM, inflated=True)


def read_idx(path) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) into an array of its declared type and dimensions.

    Checks the two zero bytes of the magic number, the type code, and that the
    file is exactly ``4 + 4 * ndim + prod(dims) * itemsize`` bytes long (inflated,
    for ``.gz``), without reading more than that plus one byte: see the module
    docstring.
    """
    path = pathlib.Path(path)
    with _open_regular(path) as (f, size):
        if path.suffix == ".gz":
            return _read_idx_gzip(f, size, path)
        header = _idx_header(f, path)
        if size != header.total:
            raise _length_error(path, header, size, inflated=False)
        return _idx_data(f, path, header, grow_from=size, inflated=False)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    """``directory/stem``, or else ``directory/stem.gz``: the first that is a regular file."""
    candidates = [directory / stem, directory / (stem + ".gz")]
    existing = [c for c in candidates if c.exists()]
    regular = [c for c in existing if c.is_file()]
    if regular:
        return regular[0]
    if existing:
        # What it is instead (None only if it became a regular file since is_file).
        kind = _files.special_kind(existing[0].stat().st_mode) or "special file"
        raise _refusal(existing[0])(kind)
    raise FileNotFoundError(f"missing data file: none of {[str(c) for c in candidates]} exists.")


def _directory(directory) -> pathlib.Path:
    if directory is None:
        raise ValueError("`data_dir` (=None): this dataset is read from files; name their directory.")
    path = pathlib.Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data directory {str(path)!r} does not exist.")
    if not path.is_dir():
        raise NotADirectoryError(f"data directory {str(path)!r} is not a directory.")
    return path


def _idx_pair(directory: pathlib.Path, prefix: str, num_classes: int):
    """``(images, labels, images_path)`` of the ``prefix`` split."""
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected unsigned-byte images (N, H, W), got {images.dtype} {images.shape}.")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected unsigned-byte labels (N,), got {labels.dtype} {labels.shape}.")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels, but {images_path} has {images.shape[0]} images.")
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside [0, {num_classes}).")
    return _unit_float(images)[..., None], labels.astype(np.int32), images_path


def load_mnist(directory, *, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST (same format) from the four IDX files in ``directory``.

    Images ``(N, 28, 28, 1)`` (any ``H x W`` the headers declare), pixels / 255;
    60000 train and 10000 test images in the full data sets.
    """
    directory = _directory(directory)
    x_train, y_train, train_source = _idx_pair(directory, "train", 10)
    x_test, y_test, test_source = _idx_pair(directory, "t10k", 10)
    return _checked(Dataset(name, x_train, y_train, x_test, y_test, 10), str(train_source), str(test_source))


# --- CIFAR-10 binary --------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_file(path: pathlib.Path):
    with _open_regular(path) as (f, size):
        if size == 0 or size % _CIFAR_RECORD:
            raise ValueError(
                f"{path}: {size} bytes is not a whole number of {_CIFAR_RECORD}-byte records "
                f"(1 label byte + 3x32x32 pixels): truncated or not the CIFAR-10 binary version."
            )
        data = _read_upto(f, size + 1, grow_from=size + 1)
    if data.size != size:
        raise ValueError(f"{path}: {data.size} bytes read, but it was {size} bytes long: it changed while being read.")
    records = data.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if int(labels.max()) >= 10:
        bad = int(np.argmax(labels >= 10))
        raise ValueError(f"{path}: record {bad} has label {int(labels[bad])}, outside [0, 10) (not CIFAR-10?).")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _unit_float(images), labels.astype(np.int32)


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
    train_source = ", ".join(str(directory / name) for name in CIFAR10_TRAIN_FILES)
    return _checked(
        Dataset("cifar10", x_train, y_train, x_test, y_test, 10), train_source, str(directory / CIFAR10_TEST_FILE)
    )


# --- by name ---------------------------------------------------------------------------

#: The names :func:`load_dataset` (and ``python -m jaxconv train --dataset``) accepts.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


def load_dataset(name: str, data_dir=None) -> Dataset:
    """``"digits"`` (bundled; ``data_dir`` ignored), or ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` from
    ``data_dir``.

    The result has passed the loaders' sanity check (see the module docstring).
    """
    if name == "digits":
        return load_digits()
    if name in ("mnist", "fashion-mnist"):
        return load_mnist(data_dir, name=name)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"`name` (={name!r}) must be one of {list(DATASETS)}.")


# --- mini-batches ------------------------------------------------------------------------


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = True):
    """The index arrays of one epoch's mini-batches, a shuffle fixed by ``(seed, epoch)``.

    ``drop_last=True`` drops the last partial batch (one compiled shape, and a
    batch size divisible by the devices stays so); the dropped examples differ
    from epoch to epoch.  Resuming at ``epoch`` gives the same batches as an
    uninterrupted run.
    """
    if batch_size < 1 or num_examples < 1:
        raise ValueError(f"`batch_size` (={batch_size}) and `num_examples` (={num_examples}) must be >= 1.")
    if drop_last and batch_size > num_examples:
        raise ValueError(f"`batch_size` (={batch_size}) exceeds `num_examples` (={num_examples}) with drop_last.")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def batches(
    images, labels, batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's ``(images, labels)`` mini-batches in a shuffled order fixed by ``(seed, epoch)``.

    The order is :func:`epoch_batches`' (a generator seeded with
    ``[seed, epoch]``), so a run resumed at ``epoch`` sees exactly the batches an
    uninterrupted run sees.  ``drop_last`` drops the final partial batch.
    """
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
