"""Reading an image file a user named, without trusting it: a PNG or NPY checked before it is decoded.

:func:`read_image` is what ``python -m jaxconv predict`` reads its images with.
Nothing is decoded or allocated on the word of the file alone:

* the path must be a regular file (checked with ``stat`` before it is opened
  and with ``fstat`` after a non-blocking open: a FIFO never blocks, a device
  such as ``/dev/zero`` is never read) of at most :data:`MAX_FILE_BYTES`; the
  whole file is read once and everything below works on those bytes;
* a PNG's signature and ``IHDR`` header (width, height, bit depth, colour
  type, checksum) are checked first: an image larger than
  :data:`MAX_SIDE` on a side, or of another size than the model takes, is
  refused from its 33-byte header, before a pixel is decompressed (a small
  file can declare an image of gigabytes);
* an NPY's header is parsed with :mod:`numpy.lib.format` (no pickle), and the
  shape it declares must fit :data:`MAX_SIDE` and agree with the number of
  bytes the file holds before the array is built from them.

Errors: ``FileNotFoundError`` for a missing file; ``ValueError`` naming the
file and what is wrong for everything else (a FIFO, a directory, an empty,
text or truncated file, a header out of bounds, the wrong size, values
outside ``[0, 1]``).
"""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
from numpy.lib import format as npy_format

from . import files as _files

__all__ = ["MAX_FILE_BYTES", "MAX_SIDE", "read_image"]

#: The largest image file read (bytes).
MAX_FILE_BYTES = 64 * 2**20
#: The largest height or width an image file may declare.
MAX_SIDE = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> (its name, the bit depths it allows, channels).
_PNG_COLOUR = {
    0: ("grey", (1, 2, 4, 8, 16), 1),
    2: ("RGB", (8, 16), 3),
    3: ("palette", (1, 2, 4, 8), 3),
    4: ("grey+alpha", (8, 16), 2),
    6: ("RGBA", (8, 16), 4),
}


def read_image(path, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file (PNG, or NPY with values in [0, 1] or uint8) as float32 ``shape`` ``(H, W, C)`` in [0, 1].

    A colour image (RGB or RGBA, alpha dropped) for a one-channel model is
    averaged to grey; a 2-D array or a grey PNG gets its channel axis.  See the
    module docstring for what is checked before decoding.
    """
    path = pathlib.Path(path)
    h, w, c = (int(d) for d in shape)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise ValueError(f"{path}: not a .png or .npy file.")
    raw = _read_file(path)
    if suffix == ".png":
        array = _decode_png(path, raw, (h, w))
    else:
        array = _decode_npy(path, raw, (h, w))
    return _pixels(path, array, (h, w, c))


def _read_file(path: pathlib.Path) -> bytes:
    def refuse(kind: str) -> Exception:
        return ValueError(f"{path}: is a {kind}, not an image file.")

    try:
        with _files.open_regular(path, refuse) as (f, size):
            if size > MAX_FILE_BYTES:
                raise ValueError(
                    f"{path}: is {size} bytes, more than the {MAX_FILE_BYTES} bytes an image file may have here."
                )
            raw = f.read(size + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist.") from None
    if len(raw) != size:
        raise ValueError(f"{path}: changed size while being read ({size} bytes, then {len(raw)}).")
    if not raw:
        raise ValueError(f"{path}: is empty (0 bytes), not an image.")
    return raw


# --- PNG -------------------------------------------------------------------------------------------


def png_header(path, raw: bytes) -> dict:
    """The checked ``IHDR`` of the PNG bytes ``raw``: ``{"width", "height", "bit_depth", "colour_type",
    "interlace"}``; ``ValueError`` naming ``path`` if ``raw`` does not start as a PNG."""
    if not raw.startswith(_PNG_SIGNATURE):
        what = "a text file" if _looks_like_text(raw[:512]) else "something else"
        raise ValueError(f"{path}: not a PNG file (no PNG signature; it is {what}).")
    if len(raw) < 8 + 8 + 13 + 4:
        raise ValueError(f"{path}: truncated PNG: {len(raw)} bytes, too short for its IHDR header.")
    length, kind = struct.unpack(">I4s", raw[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError(f"{path}: not a valid PNG: its first chunk is {kind!r} of {length} bytes, not a 13-byte IHDR.")
    body, crc = raw[16:29], struct.unpack(">I", raw[29:33])[0]
    if zlib.crc32(raw[12:29]) != crc:
        raise ValueError(f"{path}: corrupted PNG: the IHDR header's checksum does not match.")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    if not (1 <= width <= 2**31 - 1 and 1 <= height <= 2**31 - 1):
        raise ValueError(f"{path}: not a valid PNG: it declares {width}x{height} pixels.")
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][1]:
        raise ValueError(f"{path}: not a valid PNG: colour type {colour} with bit depth {depth}.")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ValueError(
            f"{path}: not a valid PNG: compression {compression}, filter {filtering}, interlace {interlace}."
        )
    return {"width": width, "height": height, "bit_depth": depth, "colour_type": colour, "interlace": interlace}


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_size(path, what: str, height: int, width: int, expected: tuple[int, int]) -> None:
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ValueError(
            f"{path}: {what} declares {height}x{width} pixels, more than {MAX_SIDE} on a side; not "
            f"read (the model takes {expected[0]}x{expected[1]})."
        )
    if (height, width) != tuple(expected):
        raise ValueError(f"{path}: image {height}x{width}, but the model takes {expected[0]}x{expected[1]}; not read.")


def _decode_png(path, raw: bytes, expected: tuple[int, int]) -> np.ndarray:
    header = png_header(path, raw)
    _check_size(path, "its PNG header", header["height"], header["width"], expected)
    import matplotlib.image  # optional extra: train

    try:
        array = matplotlib.image.imread(io.BytesIO(raw), format="png")
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for a bad stream
        raise ValueError(
            f"{path}: cannot decode the PNG (truncated or corrupted?): {type(err).__name__}: {err}"
        ) from err
    array = np.asarray(array)
    if array.shape[:2] != (header["height"], header["width"]):
        raise ValueError(
            f"{path}: decoded to {array.shape}, not the {header['height']}x{header['width']} its header declares."
        )
    return array


# --- NPY -------------------------------------------------------------------------------------------


def npy_header(path, raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of the NPY bytes ``raw``, checked against their length."""
    stream = io.BytesIO(raw)
    try:
        version = npy_format.read_magic(stream)
    except ValueError as err:
        raise ValueError(f"{path}: not an NPY file ({err}).") from err
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{path}: NPY format version {version[0]}.{version[1]} is not read here (1.0 and 2.0 are).")
    try:
        shape, fortran, dtype = readers[version](stream)
    except Exception as err:  # a torn or forged header: ValueError, SyntaxError, tokenize.TokenError...
        raise ValueError(f"{path}: corrupted NPY header: {type(err).__name__}: {err}") from err
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"{path}: holds {dtype}, not pixel values.")
    offset = stream.tell()
    count = 1
    for d in shape:
        count *= d  # Python integers: no overflow however large the declared dimensions
    if len(shape) not in (2, 3) or any(d > MAX_SIDE for d in shape[:2]) or (len(shape) == 3 and shape[2] > 4):
        raise ValueError(
            f"{path}: declares an array of shape {shape}; an image is (H, W) or (H, W, C) with C <= 4 "
            f"and at most {MAX_SIDE} on a side. Not read."
        )
    if count * dtype.itemsize != len(raw) - offset:
        raise ValueError(
            f"{path}: declares {dtype}{list(shape)} ({count * dtype.itemsize} bytes of data) but holds "
            f"{len(raw) - offset} bytes after its header (truncated or not an NPY file?)."
        )
    return shape, fortran, dtype, offset


def _decode_npy(path, raw: bytes, expected: tuple[int, int]) -> np.ndarray:
    shape, fortran, dtype, offset = npy_header(path, raw)
    _check_size(path, "its NPY header", shape[0], shape[1], expected)
    count = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


# --- both ------------------------------------------------------------------------------------------


def _pixels(path, array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The decoded ``array`` as float32 ``shape`` in [0, 1] (the contract of :func:`read_image`)."""
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: holds {array.dtype}, not pixel values.")
    array = np.asarray(array, np.float32)
    h, w, c = shape
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # drop PNG's alpha
    if array.ndim == 3 and c == 1 and array.shape[-1] == 3:
        array = array.mean(axis=-1)  # a colour image for a grey-scale model
    if array.ndim == 2 and c == 1:
        array = array[..., None]
    if array.shape != (h, w, c):
        raise ValueError(f"{path}: image {array.shape}, but the model takes {h}x{w} with {c} channel(s).")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{path}: pixel values must be finite and in [0, 1] (or uint8).")
    return array
