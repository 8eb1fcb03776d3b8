"""``read_image`` on real crafted files: a PNG or NPY is checked from its header before anything is decoded."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from jaxconv.train import images


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(pixels: np.ndarray | None = None, *, size=None, colour=None, idat: bytes | None = None) -> bytes:
    """A real PNG (8-bit, no filtering) of ``pixels`` (H, W) grey or (H, W, 3) RGB uint8."""
    if pixels is not None:
        height, width = pixels.shape[:2]
        colour = 0 if pixels.ndim == 2 else 2
        rows = pixels.reshape(height, -1)
        idat = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))
    else:
        height, width = size
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A real, valid 20000x20000 grey PNG of zeros: about 400 KB on disk, 400 MB decoded."""
    height = width = 20000
    compressor = zlib.compressobj(9)
    block = (b"\x00" * (width + 1)) * 1000
    idat = b"".join(compressor.compress(block) for _ in range(height // 1000)) + compressor.flush()
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(_png(size=(height, width), colour=0, idat=idat))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    import matplotlib.image

    def refuse(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(matplotlib.image, "imread", refuse)


def test_a_grey_and_a_colour_png_read_as_before(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    (tmp_path / "g.png").write_bytes(_png(grey))
    out = images.read_image(tmp_path / "g.png", (28, 28, 1))
    assert out.dtype == np.float32 and out.shape == (28, 28, 1)
    np.testing.assert_allclose(out[..., 0], grey / 255.0, atol=1e-6)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "c.png").write_bytes(_png(rgb))
    np.testing.assert_allclose(images.read_image(tmp_path / "c.png", (32, 32, 3)), rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(
        images.read_image(tmp_path / "c.png", (32, 32, 1))[..., 0], rgb.mean(-1) / 255.0, atol=1e-6
    )


def test_a_20000_pixel_png_is_refused_from_its_header_without_decoding(bomb, no_decoding):
    assert bomb.stat().st_size < 1_000_000
    start = time.monotonic()
    with pytest.raises(ValueError, match="declares 20000x20000 pixels, more than 4096 on a side; not read"):
        images.read_image(bomb, (28, 28, 1))
    assert time.monotonic() - start < 2


def test_a_png_of_another_size_is_refused_from_its_header(tmp_path, no_decoding):
    (tmp_path / "big.png").write_bytes(_png(np.zeros((100, 90), np.uint8)))
    with pytest.raises(ValueError, match="image 100x90, but the model takes 28x28; not read"):
        images.read_image(tmp_path / "big.png", (28, 28, 1))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"hello, I am text\n", "not a PNG file .*a text file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated PNG"),
        (b"\x89PNG\r\n\x1a\n" + _chunk(b"IEND", b"") + b"\x00" * 20, "its first chunk is b'IEND'"),
    ],
)
def test_broken_pngs_are_clear_value_errors(tmp_path, content, message):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        images.read_image(tmp_path / "x.png", (28, 28, 1))


def test_a_forged_ihdr_checksum_and_bad_depth_are_refused(tmp_path):
    good = _png(np.zeros((28, 28), np.uint8))
    forged = bytearray(good)
    forged[24] = 16  # bit depth 16: checksum no longer matches
    (tmp_path / "f.png").write_bytes(bytes(forged))
    with pytest.raises(ValueError, match="checksum does not match"):
        images.read_image(tmp_path / "f.png", (28, 28, 1))
    ihdr = struct.pack(">IIBBBBB", 28, 28, 3, 0, 0, 0, 0)  # grey with 3 bits per pixel: not a PNG depth
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr))
    with pytest.raises(ValueError, match="colour type 0 with bit depth 3"):
        images.read_image(tmp_path / "d.png", (28, 28, 1))


def test_a_truncated_png_stream_is_a_value_error(tmp_path):
    whole = _png(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
    (tmp_path / "t.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cannot decode the PNG"):
        images.read_image(tmp_path / "t.png", (28, 28, 1))


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_dev_zero_and_a_directory_are_refused(tmp_path, suffix):
    os.symlink("/dev/zero", tmp_path / f"zero{suffix}")
    with pytest.raises(ValueError, match="is a character device, not an image file"):
        images.read_image(tmp_path / f"zero{suffix}", (28, 28, 1))
    (tmp_path / f"dir{suffix}").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        images.read_image(tmp_path / f"dir{suffix}", (28, 28, 1))


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_a_fifo_is_refused_promptly(tmp_path, suffix):
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            images.read_image(fifo, (28, 28, 1))
        except Exception as err:  # noqa: BLE001 - the test looks at it below
            outcome.append(err)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_image blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError) and "FIFO" in str(outcome[0])


def test_a_missing_file_and_a_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.read_image(tmp_path / "none.png", (28, 28, 1))
    (tmp_path / "x.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .png or .npy"):
        images.read_image(tmp_path / "x.jpg", (28, 28, 1))


# --- NPY ---------------------------------------------------------------------------------------------


def _npy_header(shape, descr="<f4", fortran=False) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return stream.getvalue()


def test_npy_arrays_read_as_before(tmp_path):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    np.save(tmp_path / "u.npy", u8)
    np.testing.assert_allclose(images.read_image(tmp_path / "u.npy", (28, 28, 1))[..., 0], u8 / 255.0, atol=1e-7)
    f = rng.uniform(size=(32, 32, 3))
    np.save(tmp_path / "f.npy", np.asfortranarray(f))
    np.testing.assert_array_equal(images.read_image(tmp_path / "f.npy", (32, 32, 3)), f.astype(np.float32))


def test_a_two_to_the_31_squared_npy_header_is_refused_without_allocating(tmp_path):
    (tmp_path / "huge.npy").write_bytes(_npy_header((2**31, 2**31)) + b"\x00" * 64)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"declares an array of shape \(2147483648, 2147483648\).*Not read"):
        images.read_image(tmp_path / "huge.npy", (28, 28, 1))
    assert time.monotonic() - start < 1
    (tmp_path / "wide.npy").write_bytes(_npy_header((28, 28, 2**40)) + b"\x00" * 64)
    with pytest.raises(ValueError, match="C <= 4"):
        images.read_image(tmp_path / "wide.npy", (28, 28, 1))


def test_a_truncated_npy_is_refused_by_its_declared_size(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((28, 28), np.float32))
    whole = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(whole[:-10])
    with pytest.raises(ValueError, match=r"declares float32\[28, 28\] \(3136 bytes of data\) but holds 3126"):
        images.read_image(tmp_path / "t.npy", (28, 28, 1))


def test_npy_of_another_size_object_dtype_and_foreign_files(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError, match="image 100x100, but the model takes 28x28"):
        images.read_image(tmp_path / "s.npy", (28, 28, 1))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * 4, dtype=object).reshape(2, 2), allow_pickle=True)
    with pytest.raises(ValueError, match="holds object, not pixel values"):
        images.read_image(tmp_path / "o.npy", (28, 28, 1))
    (tmp_path / "p.npy").write_bytes(b"\x80\x04\x95 a pickle, not an npy")
    with pytest.raises(ValueError, match="not an NPY file"):
        images.read_image(tmp_path / "p.npy", (28, 28, 1))
    (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4',")
    with pytest.raises(ValueError, match="NPY"):
        images.read_image(tmp_path / "h.npy", (28, 28, 1))


def test_values_outside_zero_one_are_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.full((28, 28), 2.0))
    with pytest.raises(ValueError, match=r"finite and in \[0, 1\]"):
        images.read_image(tmp_path / "v.npy", (28, 28, 1))
