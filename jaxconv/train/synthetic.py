"""Realistic stand-ins for MNIST and CIFAR-10, written in their real file formats.

No data set can be downloaded here, yet the command line's defaults must learn
on 28x28 grey-scale (MNIST-format) and 32x32 colour (CIFAR-format) images.
These writers make such images from scikit-learn's bundled 8x8 digits, so
that the real loaders (:func:`jaxconv.train.data.load_mnist`,
:func:`jaxconv.train.data.load_cifar10`) read them from real files:

* **MNIST format** (:func:`write_mnist_like`): each digit is resampled
  (bilinear) to a random size of 16-22 pixels, placed up to 3 pixels off the
  centre of a 28x28 frame (MNIST's digits are about 20x20 in a 28x28 frame), blurred by the
  resampling, with Gaussian pixel noise; four IDX files, unsigned bytes.
* **CIFAR format** (:func:`write_cifar_like`): the same digits at 16-24
  pixels, up to 4 pixels off the centre of a 32x32 frame, drawn in a random light colour over a random darker
  background colour with a colour gradient and noise (the class is the shape,
  not the colour); the six ``.bin`` files of 3073-byte records.

The train images come only from the digits' training split and the test
images only from its test split (:func:`jaxconv.train.data.load_digits`), so a test
image is never a variant of a training image.  Deterministic in ``seed``.

``python -m jaxconv synth {mnist,cifar10} DIR`` writes them from the command line.

A user's files are never touched: the writers refuse a directory that already
holds any of the files they would write, raw or ``.gz`` (a raw file written
beside a real ``.gz`` one would shadow it: the loaders read the raw one first),
or a symbolic link at one of those names, with a :class:`FileExistsError`
listing them; nothing is written then.  ``DIR`` must be a directory (or not
exist yet: it is created); a file or a dangling symbolic link there gets its
own message.  Each file is written to a temporary file and linked to its name
(``os.link`` fails on any existing name, and follows no link), so a file at
the name appearing meanwhile is not overwritten either; a failure part way
(a full disk, :class:`jaxconv.train.files.WriteError`) removes the files this
call wrote, leaving the directory as it was.  At most :data:`MAX_IMAGES` images
per split (more than MNIST's 60000 and CIFAR-10's 50000).
"""

from __future__ import annotations

import errno
import gzip
import os
import pathlib
import struct
import tempfile

import numpy as np

from . import files as _files
from .data import load_digits

__all__ = ["MAX_IMAGES", "digit_variants", "write_cifar_like", "write_mnist_like"]

#: The most images per split the writers make (memory grows with it; MNIST has 60000 training images).
MAX_IMAGES = 100_000

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)


def _check_counts(num_train, num_test, low_train: int) -> None:
    for name, value, low in (("num_train", num_train, low_train), ("num_test", num_test, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`{name}` (={value!r}) must be an integer.")
        if not low <= value <= MAX_IMAGES:
            raise ValueError(
                f"`{name}` (={value}) must lie in [{low}, {MAX_IMAGES}] (MNIST has 60000 training "
                f"images; more would only take memory and disk)."
            )


def _prepare_directory(directory) -> pathlib.Path:
    """``directory`` as a Path, created if missing; clear errors for a file or a dangling link there."""
    directory = pathlib.Path(directory)
    if os.path.islink(directory) and not directory.exists():
        raise FileNotFoundError(
            errno.ENOENT,
            f"{str(directory)!r} is a symbolic link to "
            f"{os.readlink(directory)!r}, which does not exist (a dangling link); "
            f"nothing is written through it.",
        )
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"{str(directory)!r} exists and is not a directory: name a directory "
            f"to write the files into (it is created if missing).",
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _files.write_error(directory, err, "the directory") from err
    return directory


def _refuse_existing(directory: pathlib.Path, names) -> None:
    """``FileExistsError`` if any of ``names`` (or its ``.gz``) is in ``directory`` (a link too)."""
    taken = [n for name in names for n in (name, name + ".gz") if os.path.lexists(directory / n)]
    if taken:
        raise FileExistsError(
            errno.EEXIST,
            f"{str(directory)!r} already holds {', '.join(taken)}; nothing was "
            f"written (these files are never overwritten, and a raw file beside a "
            f".gz one would hide it from the loader). Choose an empty directory.",
        )


def _write_new_files(directory: pathlib.Path, contents: dict[str, bytes]) -> None:
    """Write each ``{name: bytes}`` as a new file: all of them, or (on an error) none."""
    written = []
    try:
        for name, data in contents.items():
            _write_new(directory / name, data)
            written.append(directory / name)
    except BaseException:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _write_new(path: pathlib.Path, data: bytes) -> None:
    """``data`` as the new file ``path``: a temporary file, fsynced, hard-linked to the name (never replacing)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    except OSError as err:
        raise _files.write_error(path, err) from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST,
                f"{str(path)!r} appeared while the data was written; it is not overwritten and nothing was written.",
            ) from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            _write_exclusive(path, data)  # a file system without hard links
    except FileExistsError:
        raise
    except OSError as err:
        raise _files.write_error(path, err) from err
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _write_exclusive(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(path)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resampling of a square ``(h, h)`` image to ``(size, size)`` (pixel centres aligned)."""
    h = image.shape[0]
    coords = (np.arange(size) + 0.5) * h / size - 0.5
    coords = np.clip(coords, 0, h - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, h - 1)
    frac = coords - lo
    rows = image[lo] * (1 - frac)[:, None] + image[hi] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None, :] + rows[:, hi] * frac[None, :]


def digit_variants(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    frame: int,
    sizes: tuple[int, int],
    shift: float,
    noise: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` digits in ``[0, 1]``, ``(count, frame, frame)``, each a random source image resampled to a
    random size in ``sizes``, placed off the frame's centre by up to ``shift`` pixels each way, plus
    Gaussian noise of standard deviation ``noise``."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(images), size=count)
    out = np.zeros((count, frame, frame), np.float32)
    for i, j in enumerate(source):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        digit = _resize(np.asarray(images[j], np.float64).reshape(8, 8), size)
        centre = (frame - size) / 2
        top, left = (int(np.clip(round(centre + rng.uniform(-shift, shift)), 0, frame - size)) for _ in range(2))
        out[i, top : top + size, left : left + size] = digit
    out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0), np.asarray(labels)[source].astype(np.uint8)


def _digits_splits():

    digits = load_digits()
    return (digits.train_images[..., 0], digits.train_labels), (digits.test_images[..., 0], digits.test_labels)


def _to_bytes(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _idx_bytes(array: np.ndarray, *, compress: bool) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    return gzip.compress(data, mtime=0) if compress else data


def write_mnist_like(
    directory, *, num_train: int = 4000, num_test: int = 1000, seed: int = 0, compress: bool = False
) -> pathlib.Path:
    """Write MNIST-format (IDX) 28x28 digits to ``directory``: ``train-images-idx3-ubyte`` and the other three.

    ``compress=True`` writes ``.gz`` files, as MNIST is distributed.  Returns the directory.
    Refuses (``FileExistsError``, nothing written) a directory already holding
    any of these files, raw or ``.gz``; see the module docstring.
    """
    _check_counts(num_train, num_test, 1)
    directory = _prepare_directory(directory)
    _refuse_existing(directory, MNIST_FILES)
    (train_x, train_y), (test_x, test_y) = _digits_splits()
    contents = {}
    suffix = ".gz" if compress else ""
    for prefix, (x, y), count, stream in (
        ("train", (train_x, train_y), num_train, 0),
        ("t10k", (test_x, test_y), num_test, 1),
    ):
        images, labels = digit_variants(
            x, y, count, frame=28, sizes=(16, 22), shift=3, noise=0.08, seed=seed * 2 + stream
        )
        contents[f"{prefix}-images-idx3-ubyte{suffix}"] = _idx_bytes(_to_bytes(images), compress=compress)
        contents[f"{prefix}-labels-idx1-ubyte{suffix}"] = _idx_bytes(labels, compress=compress)
    _write_new_files(directory, contents)
    return directory


def _colour(images: np.ndarray, seed: int) -> np.ndarray:
    """Grey ``(N, 32, 32)`` digits in ``[0, 1]`` as colour ``(N, 32, 32, 3)``: random foreground over a
    random background with a gradient, plus noise."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    # Colours vary freely per channel, but the digit is the lighter part of the image (as MNIST's
    # strokes are): a dark stroke on a light ground is a different image to a small network.
    bg = rng.uniform(0.0, 0.45, (n, 1, 1, 3))
    fg = rng.uniform(0.55, 1.0, (n, 1, 1, 3))
    ramp = np.linspace(-0.5, 0.5, w)[None, None, :, None] * rng.uniform(-0.3, 0.3, (n, 1, 1, 3))
    alpha = images[..., None]
    out = alpha * fg + (1 - alpha) * (bg + ramp)
    out += rng.normal(0.0, 0.05, out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_cifar_like(directory, *, num_train: int = 5000, num_test: int = 1000, seed: int = 0) -> pathlib.Path:
    """Write CIFAR-10-format 32x32 colour images to ``directory``: ``data_batch_1.bin`` ... ``data_batch_5.bin``
    and ``test_batch.bin`` (records: a label byte, then the red, green and blue 32x32 planes).

    ``num_train`` is split over the five training files (it must be at least 5).  Returns the directory.
    """
    _check_counts(num_train, num_test, 5)
    directory = _prepare_directory(directory)
    _refuse_existing(directory, CIFAR_FILES)
    (train_x, train_y), (test_x, test_y) = _digits_splits()

    def records(x, y, count, stream):
        grey, labels = digit_variants(x, y, count, frame=32, sizes=(16, 24), shift=4, noise=0.0, seed=seed * 2 + stream)
        rgb = _to_bytes(_colour(grey, seed * 2 + stream + 1000))
        planes = rgb.transpose(0, 3, 1, 2).reshape(count, -1)  # HWC -> CHW, as the records store them
        return np.concatenate([labels[:, None], planes], axis=1)

    train = records(train_x, train_y, num_train, 0)
    contents = {f"data_batch_{i}.bin": part.tobytes() for i, part in enumerate(np.array_split(train, 5), start=1)}
    contents["test_batch.bin"] = records(test_x, test_y, num_test, 1).tobytes()
    _write_new_files(directory, contents)
    return directory
