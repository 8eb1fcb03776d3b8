"""Writers of the real dataset formats (IDX, gzipped or not; CIFAR-10's binary records), independent of
jaxconv.train.data's readers: the files the data and CLI tests read back."""

from __future__ import annotations

import gzip
import struct

import numpy as np

from jaxconv.train import data


def write_idx(path, array: np.ndarray, *, gz=False, magic=None):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">I", magic if magic is not None else (0x0800 | array.ndim))
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def mnist_dir(tmp_path, *, n_train=12, n_test=5, hw=(28, 28), gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar(path, images_hwc: np.ndarray, labels):
    """Records of 1 label byte + the R, G, B planes, each 32x32 row-major."""
    records = [
        bytes([int(label)]) + np.asarray(img, np.uint8).transpose(2, 0, 1).tobytes()
        for img, label in zip(images_hwc, labels)
    ]
    path.write_bytes(b"".join(records))


def cifar_dir(directory, *, per_file=3, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
        images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file)
        write_cifar(directory / name, images, labels)
        written[name] = (images, labels)
    return written
