"""jaxconv.train.data never reads what a header does not promise, nor anything but a regular file, and refuses
data no training could start on: scenarios with real files written here (sparse files, gzip bombs,
directories, FIFOs, devices)."""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import resource
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest

from jaxconv.train import data

from ._datasets import cifar_dir, mnist_dir, write_cifar, write_idx

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------


def _idx_header(dims, type_code=0x08) -> bytes:
    return struct.pack(">I", (type_code << 8) | len(dims)) + b"".join(struct.pack(">I", d) for d in dims)


def _gzip_members(path, *payloads, level=6):
    """One gzip member per payload, concatenated (what ``cat a.gz b.gz`` gives; gzip reads them as one stream)."""
    path.write_bytes(b"".join(gzip.compress(p, compresslevel=level) for p in payloads))


def _gzip_of_zeros(path, prefix: bytes, n_zeros: int, chunk: int = 1 << 24):
    """A valid single-member gzip of ``prefix`` + ``n_zeros`` zero bytes, built in about a second for 4 GB.

    After a full flush deflate forgets its history, so every ``chunk`` of zeros that follows one compresses to
    the same bytes: compress one, repeat it, then the remainder, and write the trailer (CRC-32, ISIZE) by hand.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    block = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + block)
        for _ in range(n_zeros // chunk):
            f.write(repeated)
            crc = zlib.crc32(zeros, crc)
        remainder = bytes(n_zeros % chunk)
        f.write(deflate.compress(remainder) + deflate.flush())
        crc = zlib.crc32(remainder, crc)
        f.write(struct.pack("<II", crc, (len(prefix) + n_zeros) % 2**32))


def _peak_bytes(fn, *args):
    """``(exception raised by fn(*args), peak bytes allocated meanwhile)``; numpy's buffers are traced too."""
    tracemalloc.start()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - the caller checks which
        return err, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    raise AssertionError(f"{fn.__name__}{args} raised nothing")


_CAPPED = """
import resource, sys
from jaxconv.train import data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    getattr(data, sys.argv[1])(sys.argv[2])
    print("returned")
except Exception as err:
    print(f"{type(err).__name__}: {err}")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # Linux: KiB
"""


def _call_capped(function: str, path) -> tuple[str, int]:
    """``data.<function>(path)`` in a Python limited to 2 GiB of address space and 60 s, so that a reader that
    blocks or reads without end fails the test instead of hanging it or exhausting memory.

    Returns ``(what it raised, "TypeName: message", or "returned"; growth of its peak resident memory in bytes)``.
    """

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    done = subprocess.run(
        [sys.executable, "-c", _CAPPED, function, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=cap,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, growth = done.stdout.strip().rsplit("\n", 1)
    return outcome, int(growth)


def test_gzip_of_zeros_helper_writes_a_valid_gzip(tmp_path):
    """The bombs below are what they claim: gzip itself inflates the helper's file, CRC and length checked."""
    _gzip_of_zeros(tmp_path / "z.gz", b"head", 3 * 4096 + 5, chunk=4096)
    assert gzip.decompress((tmp_path / "z.gz").read_bytes()) == b"head" + bytes(3 * 4096 + 5)


# --- raw IDX: the size from stat, checked before any data is read -----------------------


def test_a_6gb_sparse_file_is_refused_from_its_header_without_reading_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(_idx_header((10, 28, 28)) + bytes(7840))
        f.truncate(6_000_000_000)  # sparse: no disk used
    err, peak = _peak_bytes(data.read_idx, path)
    assert isinstance(err, ValueError)
    assert str(err) == (
        f"{path}: is 6000000000 bytes, but its header (10, 28, 28) of uint8 needs 7856: it has "
        f"trailing bytes (it is larger than its header declares)."
    )
    assert peak < 1 << 20


@pytest.mark.parametrize("dims", [(2**31, 2**31, 4), (4_000_000_000,) * 3, (2**32 - 1,) * 2])
@pytest.mark.parametrize("gz", [False, True])
def test_sizes_past_int64_are_computed_exactly(tmp_path, dims, gz):
    """(2^31, 2^31, 4) wrapped to 0 in int64 and (4e9,)*3 to a negative size; now exact Python ints."""
    needed = 4 + 4 * len(dims) + math.prod(dims)
    payload = _idx_header(dims) + bytes(100)
    path = tmp_path / ("x.gz" if gz else "x")
    if gz:
        path.write_bytes(gzip.compress(payload))
        size = path.stat().st_size
        match = (
            f"{path}: its header {dims} of uint8 declares {needed} bytes, but a {size}-byte gzip file inflates "
            f"to at most {1032 * size} (deflate's limit is 1032:1)"
        )
    else:
        path.write_bytes(payload)
        match = f"{path}: is {len(payload)} bytes, but its header {dims} of uint8 needs {needed}: truncated."
    with pytest.raises(ValueError) as info:
        data.read_idx(path)
    assert str(info.value).startswith(match)


# --- gzip IDX: streamed, stopped one byte past the promise -------------------------------


@pytest.mark.parametrize("extra", [2**31, 2**32], ids=["trailer-disagrees", "trailer-agrees-mod-2^32"])
def test_a_gzip_bomb_is_refused_after_a_few_kb(tmp_path, extra):
    """A header promising 10 images, then 2 or 4 GiB of zeros: a 2-4 MB file, refused in little memory.

    With 4 GiB of extra zeros the trailer's ISIZE (length mod 2^32) agrees with the header: only streaming,
    stopped one byte past the declared size, catches it.
    """
    mnist_dir(tmp_path, n_train=10, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_of_zeros(path, _idx_header((10, 28, 28)) + bytes(range(256)) * 30 + bytes(160), extra)
    assert path.stat().st_size < 5_000_000
    outcome, growth = _call_capped("load_mnist", tmp_path)
    assert outcome == (
        f"ValueError: {path}: inflates to at least 7857 bytes, but its header (10, 28, 28) of uint8 "
        f"needs 7856: it has trailing bytes (it is larger than its header declares)."
    )
    assert growth < 64 << 20


def test_a_gzip_header_promising_more_than_deflate_can_give_is_refused_from_the_header(tmp_path):
    mnist_dir(tmp_path, n_train=10, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    path.write_bytes(gzip.compress(_idx_header((60000, 28, 28)) + images.tobytes()))
    with pytest.raises(
        ValueError,
        match=rf"train-images-idx3-ubyte.gz: its header \(60000, 28, 28\) of uint8 "
        rf"declares 47040016 bytes, but a {path.stat().st_size}-byte gzip file "
        rf"inflates to at most \d+ .*most of the data is missing",
    ):
        data.load_mnist(tmp_path)


def _tiled(nbytes: int) -> bytes:
    """Compressible (a repeated random 4 KiB) but far from deflate's limit."""
    tile = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return (tile * (nbytes // 4096 + 1))[:nbytes]


def test_a_gzip_whose_trailer_disagrees_with_its_header_is_counted_not_loaded(tmp_path):
    """40 MB promised, one byte missing: the trailer says so, the data is counted in a 1 MiB buffer, never kept."""
    dims = (1000, 200, 200)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_idx_header(dims) + _tiled(40_000_000 - 1), compresslevel=1))
    err, peak = _peak_bytes(data.read_idx, path)
    assert str(err) == f"{path}: inflates to 40000015 bytes, but its header {dims} of uint8 needs 40000016: truncated."
    assert peak < 8 << 20


def test_a_multi_member_gzip_is_read_whole(tmp_path):
    """Concatenated members: the trailer's ISIZE covers only the last one, so the reader counts, then reads."""
    written = mnist_dir(tmp_path, gz=True)
    images = written["train"][0]
    payload = _idx_header(images.shape) + images.tobytes()
    _gzip_members(tmp_path / "train-images-idx3-ubyte.gz", payload[:5000], payload[5000:])
    ds = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(np.round(ds.train_images[..., 0] * 255), images)


def test_a_last_member_forged_to_agree_with_a_4gb_header_costs_only_the_data_that_is_there(tmp_path):
    """A header promising 4 GiB (plausible for a 5 MB file), data for 5 MB, then a last member of 1000 bytes whose
    ISIZE agrees with the promise mod 2^32: the buffer grows only as data arrives, never to the 4 GiB declared."""
    dims = (8, 536_871_035, 1)
    needed = 16 + math.prod(dims)
    assert needed % 2**32 == 1000
    body = np.random.default_rng(2).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "x.gz"
    _gzip_members(path, _idx_header(dims) + body, bytes(1000), level=1)
    err, peak = _peak_bytes(data.read_idx, path)
    assert str(err) == (
        f"{path}: inflates to {16 + len(body) + 1000} bytes, but its header {dims} of uint8 needs {needed}: truncated."
    )
    assert peak < 64 << 20


@pytest.mark.parametrize("damage", ["short", "long"])
def test_single_member_gzip_lengths_name_the_file(tmp_path, damage):
    written = mnist_dir(tmp_path, gz=True)
    labels = written["t10k"][1]
    payload = _idx_header(labels.shape) + labels.tobytes()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(payload[:-1] if damage == "short" else payload + b"\0"))
    expected = {
        "short": "inflates to 12 bytes, but its header (5,) of uint8 needs 13: truncated.",
        "long": "inflates to at least 14 bytes, but its header (5,) of uint8 needs 13: it has trailing bytes",
    }
    with pytest.raises(ValueError) as info:
        data.load_mnist(tmp_path)
    assert str(info.value).startswith(f"{path}: {expected[damage]}")


# --- only regular files -----------------------------------------------------------------


def test_a_directory_where_an_idx_file_should_be_is_named_as_such(tmp_path):
    mnist_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        data.load_mnist(tmp_path)
    assert str(info.value) == f"{path} is a directory, not a data file."
    with pytest.raises(IsADirectoryError, match="is a directory, not a data file"):
        data.read_idx(path)


def test_a_directory_beside_the_gz_file_is_passed_over(tmp_path):
    written = mnist_dir(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte").mkdir()
    np.testing.assert_array_equal(data.load_mnist(tmp_path).train_labels, written["train"][1])


def test_a_directory_where_a_cifar_file_should_be_is_named_as_such(tmp_path):
    cifar_dir(tmp_path)
    path = tmp_path / "data_batch_4.bin"
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        data.load_dataset("cifar10", tmp_path)
    assert str(info.value) == f"{path} is a directory, not a data file."


def test_a_file_given_as_the_data_directory(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"data directory '.*file' is not a directory"):
        data.load_mnist(tmp_path / "file")


@pytest.mark.parametrize(
    "loader,name,kind",
    [
        ("load_mnist", "t10k-labels-idx1-ubyte", "fifo"),
        ("load_mnist", "train-images-idx3-ubyte", "/dev/zero"),
        ("load_mnist", "train-images-idx3-ubyte.gz", "/dev/urandom"),
        ("load_cifar10", "test_batch.bin", "fifo"),
        ("load_cifar10", "data_batch_1.bin", "/dev/zero"),
        ("read_idx", "x", "fifo"),
    ],
)
def test_fifos_and_devices_are_refused_without_blocking_or_reading(tmp_path, loader, name, kind):
    if loader == "load_mnist":
        mnist_dir(tmp_path, gz=name.endswith(".gz"))
    elif loader == "load_cifar10":
        cifar_dir(tmp_path)
    path = tmp_path / name
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)  # no writer: opening it to read would block for ever
    else:
        path.symlink_to(kind)  # reading it would never end
    outcome, _ = _call_capped(loader, tmp_path if loader != "read_idx" else path)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert outcome == f"ValueError: {path} is {what}, not a data file (only regular files are read)."


def test_a_6gb_sparse_cifar_file_is_refused_from_its_size(tmp_path):
    cifar_dir(tmp_path)
    path = tmp_path / "data_batch_1.bin"
    with open(path, "r+b") as f:
        f.truncate(6_000_000_000)
    err, peak = _peak_bytes(data.load_cifar10, tmp_path)
    assert str(err).startswith(f"{path}: 6000000000 bytes is not a whole number of 3073-byte records")
    assert peak < 1 << 20


# --- data a training run can start on ---------------------------------------------------


def _replace_split(directory, prefix, images, labels=None):
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
    labels = np.zeros(len(images), np.uint8) if labels is None else labels
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize(
    "prefix,images,message",
    [
        ("train", np.zeros((0, 28, 28)), "train-images-idx3-ubyte: 0 training images: the training split is empty."),
        ("t10k", np.zeros((0, 28, 28)), "t10k-images-idx3-ubyte: 0 test images: the test split is empty."),
        (
            "train",
            np.zeros((12, 0, 0)),
            "train-images-idx3-ubyte: its training images are 0x0x1 (H x W x C): zero-size images.",
        ),
        (
            "t10k",
            np.zeros((5, 28, 0)),
            "t10k-images-idx3-ubyte: its test images are 28x0x1 (H x W x C): zero-size images.",
        ),
        ("t10k", np.ones((5, 6, 5)), "train-images-idx3-ubyte: training images (28, 28, 1), but "),
        (
            "train",
            np.zeros((12, 28, 28)),
            "train-images-idx3-ubyte: every pixel of its 12 training images is 0: constant images",
        ),
        (
            "train",
            np.full((12, 28, 28), 255),
            "train-images-idx3-ubyte: every pixel of its 12 training images is 1: constant images",
        ),
    ],
)
@pytest.mark.parametrize("via", ["load_mnist", "load_dataset"])
def test_idx_splits_no_training_can_start_on_are_refused_naming_the_file(tmp_path, prefix, images, message, via):
    mnist_dir(tmp_path)
    _replace_split(tmp_path, prefix, images)
    with pytest.raises(ValueError) as info:
        data.load_mnist(tmp_path) if via == "load_mnist" else data.load_dataset("fashion-mnist", tmp_path)
    assert str(info.value).startswith(f"{tmp_path}/{message}")


def test_constant_test_images_are_allowed(tmp_path):
    """Standardisation uses the training split's statistics only; an all-black test split is data."""
    mnist_dir(tmp_path)
    _replace_split(tmp_path, "t10k", np.zeros((5, 28, 28)))
    assert data.load_mnist(tmp_path).test_images.max() == 0.0


def test_a_constant_cifar_training_split_names_its_five_files(tmp_path):
    for name in data.CIFAR10_TRAIN_FILES:
        write_cifar(tmp_path / name, np.full((2, 32, 32, 3), 7), [1, 2])
    cifar_dir(tmp_path / "varied")
    (tmp_path / "varied" / data.CIFAR10_TEST_FILE).rename(tmp_path / data.CIFAR10_TEST_FILE)
    files = ", ".join(str(tmp_path / name) for name in data.CIFAR10_TRAIN_FILES)
    with pytest.raises(ValueError) as info:
        data.load_dataset("cifar10", tmp_path)
    assert str(info.value).startswith(f"{files}: every pixel of its 10 training images is {7 / 255:g}: constant")
    # One constant file among varied ones is data.
    write_cifar(tmp_path / "data_batch_1.bin", np.arange(32 * 32 * 3).reshape(1, 32, 32, 3) % 256, [3])
    assert data.load_cifar10(tmp_path).train_images.shape == (9, 32, 32, 3)
