"""jaxconv.train.data: the digits split, IDX and CIFAR-10 binary readers on files written here, clear errors,
batch order."""

from __future__ import annotations

import numpy as np
import pytest

from jaxconv.train import data

from ._datasets import cifar_dir, mnist_dir, write_idx

# --- digits --------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    ds = data.load_digits()
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() == 1.0
    # Stratified: each class's share of the test set is its share of the whole, to one image.
    all_labels = np.concatenate([ds.train_labels, ds.test_labels])
    np.testing.assert_allclose(
        np.bincount(ds.test_labels, minlength=10), np.bincount(all_labels, minlength=10) * 360 / 1797, atol=1
    )
    # Fixed: a second load is identical, and the split is a partition of sklearn's images.
    again = data.load_digits()
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)
    from sklearn.datasets import load_digits

    source = np.sort((load_digits().images / 16.0).reshape(1797, -1), axis=0)
    both = np.sort(np.concatenate([ds.train_images, ds.test_images]).reshape(1797, -1), axis=0)
    np.testing.assert_array_equal(both, source.astype(np.float32))


# --- IDX ------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_roundtrip(tmp_path, gz):
    written = mnist_dir(tmp_path, gz=gz)
    ds = data.load_mnist(tmp_path, name="fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.test_images.shape == (5, 28, 28, 1)
    assert ds.train_images.dtype == np.float32 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0] * 255, written["train"][0].astype(np.float32))
    np.testing.assert_array_equal(ds.train_labels, written["train"][1])
    np.testing.assert_array_equal(np.round(ds.test_images[..., 0] * 255), written["t10k"][0])
    np.testing.assert_array_equal(ds.test_labels, written["t10k"][1])


def test_read_idx_declared_dims_and_row_major_order(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x"), array)


def test_load_dataset_by_name(tmp_path):
    mnist_dir(tmp_path, hw=(6, 5))
    assert data.load_dataset("mnist", tmp_path).train_images.shape == (12, 6, 5, 1)
    assert data.load_dataset("digits").name == "digits"
    with pytest.raises(ValueError, match=r"`name` \(='svhn'\)"):
        data.load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match=r"`data_dir` \(=None\)"):
        data.load_dataset("mnist")


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_mnist(tmp_path / "nowhere")
    mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize(
    "damage,file,match",
    [
        ("truncate", "train-images-idx3-ubyte", r"train-images-idx3-ubyte: .* bytes, but its header .* truncated"),
        ("trailing", "t10k-images-idx3-ubyte", r"t10k-images-idx3-ubyte: .* trailing bytes"),
        ("magic", "train-labels-idx1-ubyte", r"train-labels-idx1-ubyte: bad IDX magic number 0x01000801"),
        ("header", "train-images-idx3-ubyte", r"train-images-idx3-ubyte: 2 bytes, too short"),
        ("count", "train-labels-idx1-ubyte", r"train-labels-idx1-ubyte: 11 labels, but .*train-images.* 12 images"),
        ("label", "t10k-labels-idx1-ubyte", r"t10k-labels-idx1-ubyte: label 10 outside \[0, 10\)"),
        ("ndim", "train-images-idx3-ubyte", r"train-images-idx3-ubyte: expected unsigned-byte images \(N, H, W\)"),
    ],
)
def test_corrupt_idx_files_are_named(tmp_path, damage, file, match):
    mnist_dir(tmp_path)
    path = tmp_path / file
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-7])
    elif damage == "trailing":
        path.write_bytes(raw + b"\0")
    elif damage == "magic":
        path.write_bytes(b"\x01" + raw[1:])
    elif damage == "header":
        path.write_bytes(raw[:2])
    elif damage == "count":
        write_idx(path, np.zeros(11, np.uint8))
    elif damage == "label":
        write_idx(path, np.array([0, 1, 10, 2, 3], np.uint8))
    elif damage == "ndim":
        write_idx(path, np.zeros((12, 784), np.uint8))
    with pytest.raises(ValueError, match=match):
        data.load_mnist(tmp_path)


def test_truncated_gzip_is_named(tmp_path):
    mnist_dir(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: cannot read it"):
        data.load_mnist(tmp_path)


# --- CIFAR-10 binary -------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_reader_roundtrip_chw_to_hwc(tmp_path, nested):
    written = cifar_dir(tmp_path / "cifar-10-batches-bin" if nested else tmp_path)
    ds = data.load_cifar10(tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    train_images = np.concatenate([written[n][0] for n in data.CIFAR10_TRAIN_FILES])
    np.testing.assert_array_equal(np.round(ds.train_images * 255), train_images)
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([written[n][1] for n in data.CIFAR10_TRAIN_FILES]))
    np.testing.assert_array_equal(np.round(ds.test_images * 255), written[data.CIFAR10_TEST_FILE][0])


def test_cifar_record_layout_by_hand(tmp_path):
    """A pure red image of label 7: the first 1024 pixel bytes are the R plane."""
    record = bytes([7]) + bytes([255] * 1024) + bytes(2048)
    for name in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
        (tmp_path / name).write_bytes(record)
    ds = data.load_cifar10(tmp_path)
    assert ds.test_labels.tolist() == [7]
    np.testing.assert_array_equal(ds.test_images[0, :, :, 0], 1.0)
    np.testing.assert_array_equal(ds.test_images[0, :, :, 1:], 0.0)


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        data.load_cifar10(tmp_path / "absent")
    cifar_dir(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.bin"):
        data.load_cifar10(tmp_path)
    cifar_dir(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"data_batch_2.bin: .* not a whole number of 3073-byte records"):
        data.load_cifar10(tmp_path)
    cifar_dir(tmp_path)
    raw = bytearray((tmp_path / "test_batch.bin").read_bytes())
    raw[3073] = 11
    (tmp_path / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"test_batch.bin: record 1 has label 11"):
        data.load_cifar10(tmp_path)


# --- batches ----------------------------------------------------------------------------


def test_batches_cover_an_epoch_once_in_an_order_fixed_by_seed_and_epoch():
    images = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    labels = np.arange(50, dtype=np.int32)

    def order(**kw):
        return np.concatenate([y for _, y in data.batches(images, labels, 8, **kw)])

    epoch1 = list(data.batches(images, labels, 8, seed=3, epoch=1))
    assert len(epoch1) == data.num_batches(50, 8) == 6
    for x, y in epoch1:
        assert x.shape == (8, 1, 1, 1) and y.shape == (8,)
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images and labels stay paired
    seen = order(seed=3, epoch=1)
    assert len(set(seen.tolist())) == 48
    np.testing.assert_array_equal(seen, order(seed=3, epoch=1))  # what a resumed run sees
    assert not np.array_equal(seen, order(seed=3, epoch=2))
    assert not np.array_equal(seen, order(seed=4, epoch=1))
    everything = order(seed=3, epoch=1, drop_last=False)
    assert sorted(everything.tolist()) == list(range(50)) and data.num_batches(50, 8, drop_last=False) == 7


def test_batches_bad_arguments():
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"`batch_size` \(=0\)"):
        next(data.batches(x, y, 0, seed=0, epoch=0))
    with pytest.raises(ValueError, match=r"`labels` \(3,\)"):
        next(data.batches(x, y[:3], 2, seed=0, epoch=0))
