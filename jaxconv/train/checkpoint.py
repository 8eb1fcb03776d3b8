"""Checkpoints: any pytree of arrays (params, optax state) plus JSON metadata, in one safetensors file.

Format (``"format": 1``): a safetensors file whose tensors are the pytree's
leaves, each named by its key path (``jax.tree_util.keystr``, e.g.
``['params'][0]['w']`` or ``['opt_state'][1][0].trace[0]['w']``), and whose
safetensors header metadata (``"__metadata__"``, a string-to-string map) holds
two entries:

* ``"jaxconv"``: a JSON object ::

    {"format": 1,
     "names": [...leaf names, in the pytree's order],
     "tensors": {name: {"dtype": "float32", "shape": [5, 5, 1, 6],
                        "sha256": hex digest of the tensor's raw bytes as stored
                                  in the file's data region (little-endian, C order)}},
     "metadata": {...the caller's JSON...}}

* ``"jaxconv.sha256"``: the hex sha256 digest of the UTF-8 bytes of the
  ``"jaxconv"`` string above (this covers the caller's metadata, the names and
  the tensor checksums).

No pickle: the file holds only arrays and JSON, so loading one runs no code.

Verified, not trusted: :func:`restore` and :func:`read_metadata` check the whole
file before returning anything.  The path must be a regular file (checked with
``os.stat`` before opening, and with ``fstat`` after a non-blocking open, so a
FIFO or a device never blocks or streams forever); the safetensors header must
fit in the file and every tensor's data must lie inside it; the ``"jaxconv"``
header must carry all its keys with the right types; and the header and every
tensor must match their sha256 checksums and recorded dtypes and shapes.
Errors a caller should expect:

* ``FileNotFoundError``: no such file; ``IsADirectoryError``: the path is a
  directory; other ``OSError``\\ s (e.g. ``PermissionError``) as the OS raises them.
* ``ValueError`` naming the file and what is wrong: not a regular file (a FIFO,
  a character device, ...); truncated or not a safetensors file; a missing or
  malformed header key; a checksum mismatch (naming the tensor's key path, or
  ``metadata``); a template that does not fit (naming the leaf).

Restoring needs a *template*: a pytree of the same structure (e.g. the params
from ``init_fun`` and ``optimizer.init(params)``).  Its leaves are replaced by
the stored arrays, matched by key path; names, shapes and dtypes must agree
exactly, so a checkpoint of another model or optimizer fails with a
``ValueError`` saying which leaf differs instead of silently loading.  optax
states are NamedTuples, which key paths name by field, so they come back as
the same NamedTuple types.

Atomic: :func:`save` (and any file written with :func:`atomic_write_bytes`)
writes the whole file to a temporary file ``.<name>.tmp-<random>`` in the same
directory, flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the old
file (an atomic rename on POSIX and Windows) and fsyncs the directory.  A crash
at any moment leaves either the old file or the new one, never a torn file.  A
temporary file left by a killed save is removed by the next save of the same
path (so two processes must not save the same path at once: one would remove
the other's temporary file, and that save would fail, leaving a whole file).
The file gets the mode any new file gets under the process's umask
(``0o666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import files as _files

__all__ = [
    "MAX_CLASSES",
    "MAX_SIDE",
    "atomic_write_bytes",
    "check_model_entry",
    "read_metadata",
    "restore",
    "save",
    "stored_shapes",
]

_FORMAT = 1
_KEY = "jaxconv"
_SHA_KEY = "jaxconv.sha256"
_TMP_RANDOM = re.compile(r"[A-Za-z0-9_]+")  # the random part mkstemp appends to the prefix


def _named_leaves(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"`tree` has leaves with the same key path: {sorted(n for n in names if names.count(n) > 1)}.")
    return named


# ---------------------------------------------------------------------------------------------- writing


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    The file gets the mode ``0o666 & ~umask``; temporary files of earlier,
    killed writes of the same path (``.<name>.tmp-*``) are removed afterwards.
    A symbolic link at ``path`` is replaced by the file, never followed (its
    target is untouched).  A failed write (a full disk...) raises
    :class:`jaxconv.train.files.WriteError` (an ``OSError``) naming ``path``;
    the temporary file is removed and ``path`` keeps what it held.
    """
    path = pathlib.Path(path)
    prefix = f".{path.name}.tmp-"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)  # O_EXCL: a new file, no link followed
    except OSError as err:
        raise _files.write_error(path, err) from err
    try:
        _chmod_fd(fd, tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise _files.write_error(path, err) from err
        raise
    _fsync_directory(path.parent)
    _remove_stale_temporaries(path.parent, prefix)


def _umask() -> int:
    """The process's umask: from /proc/self/status where there is one, else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # a restrictive value for the instant it is in force
    os.umask(mask)
    return mask


def _chmod_fd(fd: int, path: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows: only the read-only bit exists
        os.chmod(path, mode)


def _remove_stale_temporaries(directory: pathlib.Path, prefix: str) -> None:
    """Remove ``<prefix><random>`` files (left by killed writes); nothing else, not even ``<prefix>x.y``."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if (
            entry.name.startswith(prefix)
            and _TMP_RANDOM.fullmatch(entry.name[len(prefix) :])
            and entry.is_file(follow_symlinks=False)
        ):
            try:
                os.unlink(entry.path)
            except OSError:  # removed meanwhile, or not ours to remove
                pass


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(raw) -> str:
    return hashlib.sha256(raw).hexdigest()


def _stored_bytes(array: np.ndarray) -> bytes:
    """The bytes safetensors writes for ``array``: little-endian, C order."""
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")


def save(path, tree, metadata: dict | None = None) -> None:
    """Save the arrays of ``tree`` and the JSON-serialisable ``metadata`` to ``path``, atomically, with checksums.

    Args:
      path: the checkpoint file (``.safetensors``); its directory is created.
      tree: a pytree whose leaves are arrays (jax or numpy), e.g.
        ``{"params": params, "opt_state": opt_state}``.  Sharded or replicated
        jax arrays are gathered to the host.
      metadata: a JSON-serialisable dict (epoch, step counters, config, history).
    """
    from safetensors.numpy import save as st_save

    named = _named_leaves(tree)
    arrays = {}
    for name, leaf in named:
        array = np.asarray(jax.device_get(leaf))
        if array.dtype.kind not in "biufc":  # bool, ints, floats, complex
            raise ValueError(f"`tree` leaf {name} is not an array ({type(leaf).__name__}).")
        arrays[name] = np.array(array, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)
    tensors = {
        name: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": _sha256(_stored_bytes(a))}
        for name, a in arrays.items()
    }
    header = {"format": _FORMAT, "names": [name for name, _ in named], "tensors": tensors, "metadata": metadata or {}}
    try:
        header_json = json.dumps(header)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`metadata` must be JSON-serialisable: {err}") from err
    file_metadata = {_KEY: header_json, _SHA_KEY: _sha256(header_json.encode("utf-8"))}
    atomic_write_bytes(path, st_save(arrays, metadata=file_metadata))


# ---------------------------------------------------------------------------------------------- reading


def _unreadable(path, reason: str) -> ValueError:
    return ValueError(f"{path}: not a readable jaxconv checkpoint: {reason}.")


def _refusal(path: pathlib.Path) -> Callable[[str], Exception]:
    def refuse(kind: str) -> Exception:
        if kind == "directory":
            return IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a file.")
        return ValueError(f"{path}: is not a regular file (a {kind}); a checkpoint is a file written by save().")

    return refuse


def _read_regular_file(path: pathlib.Path) -> bytes:
    """The bytes of the regular file ``path``; never opens a blocking FIFO nor reads a device without end."""
    try:
        with _files.open_regular(path, _refusal(path)) as (f, size):
            data = f.read(size)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.") from None
    if len(data) != size:
        raise _unreadable(path, f"it shrank from {size} to {len(data)} bytes while being read")
    return data


def _safetensors_parts(path, data: bytes) -> tuple[dict, dict[str, memoryview]]:
    """``(header, {tensor name: its raw bytes})`` of the safetensors file ``data``, offsets checked against its size."""
    if len(data) < 8:
        raise _unreadable(path, f"it is {len(data)} bytes long, too short for a safetensors file")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise _unreadable(
            path,
            f"its safetensors header is {length} bytes but the file ends {len(data) - 8} bytes "
            f"after the length field (truncated?)",
        )
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise _unreadable(path, f"its safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _unreadable(path, "its safetensors header is not a JSON object")
    body = memoryview(data)[8 + length :]
    raw = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _unreadable(path, f"tensor {name} has no valid 'data_offsets' in the safetensors header")
        if offsets[1] > len(body):
            raise _unreadable(
                path,
                f"tensor {name}'s data (bytes {offsets[0]}..{offsets[1]}) runs past the end of "
                f"the file's {len(body)} data bytes (truncated?)",
            )
        raw[name] = body[offsets[0] : offsets[1]]
    return header, raw


def _jaxconv_header(path, safetensors_header: dict) -> dict:
    """The ``"jaxconv"`` header, its checksum verified and every key checked."""
    text, checksum = _header_text(path, safetensors_header)
    header = _parse_header(path, text)
    if checksum is None:
        raise _unreadable(path, f"its safetensors metadata has no '{_SHA_KEY}' entry (the header checksum)")
    _check_tensor_records(path, header.get("tensors"), header["names"])
    return header


def _header_text(path, safetensors_header: dict) -> tuple[str, str | None]:
    """``(the "jaxconv" JSON text, its stored checksum or None)``, the checksum verified where there is one."""
    file_metadata = safetensors_header.get("__metadata__")
    if not isinstance(file_metadata, dict) or not isinstance(file_metadata.get(_KEY), str):
        raise _unreadable(
            path, f"its safetensors metadata has no '{_KEY}' entry (a safetensors file written by something else?)"
        )
    text, checksum = file_metadata[_KEY], file_metadata.get(_SHA_KEY)
    if checksum is not None and checksum != _sha256(text.encode("utf-8")):
        raise ValueError(
            f"{path}: checksum mismatch in the metadata (the '{_KEY}' header): the file is corrupted or was edited."
        )
    return text, checksum


def _parse_header(path, text: str) -> dict:
    """The ``"jaxconv"`` JSON object, with a known ``format``, a list of string ``names`` and a ``metadata`` dict."""
    try:
        header = json.loads(text)
    except ValueError as err:
        raise _unreadable(path, f"its '{_KEY}' header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _unreadable(path, f"its '{_KEY}' header is not a JSON object")
    version = header.get("format")
    if type(version) is not int or version != _FORMAT:
        raise _unreadable(path, f"its '{_KEY}' header has 'format' {version!r}; this version reads format {_FORMAT}")
    names = header.get("names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _unreadable(path, f"its '{_KEY}' header's 'names' is missing or not a list of strings")
    if not isinstance(header.get("metadata"), dict):
        raise _unreadable(path, f"its '{_KEY}' header's 'metadata' is missing or not a JSON object")
    return header


def _check_tensor_records(path, tensors, names: list[str]) -> None:
    if not isinstance(tensors, dict):
        raise _unreadable(path, f"its '{_KEY}' header's 'tensors' (the checksums) is missing or not a JSON object")
    if sorted(tensors) != sorted(names):
        raise _unreadable(path, f"its '{_KEY}' header's 'tensors' and 'names' list different leaves")
    for name, record in tensors.items():
        ok = (
            isinstance(record, dict)
            and isinstance(record.get("sha256"), str)
            and isinstance(record.get("dtype"), str)
            and isinstance(record.get("shape"), list)
            and all(type(d) is int for d in record["shape"])
        )
        if not ok:
            raise _unreadable(
                path,
                f"its '{_KEY}' header's 'tensors' entry for tensor {name} lacks a string "
                f"'sha256' and 'dtype' or a list 'shape'",
            )


def _verify_tensors(path, arrays: dict[str, np.ndarray], raw: dict[str, memoryview], records: dict) -> None:
    for name, record in records.items():
        array = arrays[name]
        if (array.dtype.name, list(array.shape)) != (record["dtype"], record["shape"]):
            raise ValueError(
                f"{path}: tensor {name} is stored as {array.dtype.name}{list(array.shape)} but its "
                f"header records {record['dtype']}{record['shape']}: the file is corrupted or was edited."
            )
        if _sha256(raw[name]) != record["sha256"]:
            raise ValueError(f"{path}: checksum mismatch in tensor {name}: the file is corrupted.")


def _load(path):
    """``(path, arrays, header)`` of the checkpoint ``path``, everything in it verified."""
    from safetensors.numpy import load as st_load

    path = pathlib.Path(path)
    data = _read_regular_file(path)
    safetensors_header, raw = _safetensors_parts(path, data)
    header = _jaxconv_header(path, safetensors_header)
    try:
        arrays = st_load(data)
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise _unreadable(path, f"{type(err).__name__}: {err}") from err
    if sorted(header["names"]) != sorted(arrays):
        raise _unreadable(path, f"the '{_KEY}' header's leaf names do not match the stored tensors")
    _verify_tensors(path, arrays, raw, header["tensors"])
    return path, arrays, header


def read_metadata(path) -> dict:
    """The ``metadata`` dict a checkpoint was saved with (reads and verifies the whole file)."""
    return _load(path)[2]["metadata"]


def _leaf_spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a template leaf: an array, a scalar or a ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)
    return tuple(np.shape(leaf)), np.asarray(leaf).dtype


def restore(path, template) -> tuple[Any, dict]:
    """Load ``path`` into the structure of ``template``: ``(tree, metadata)``, after verifying the whole file.

    ``tree`` has ``template``'s structure and node types (NamedTuples, dicts,
    lists) with numpy leaves of the stored values; raises ``ValueError`` naming the
    first leaf whose name, shape or dtype differs from the template's.

    ``template``'s leaves may be ``jax.ShapeDtypeStruct``\\ s, e.g.
    ``jax.eval_shape(make_params)``: build the template that way when its shapes
    come from the checkpoint's own metadata (a number of classes, an input
    size), so a file declaring absurd sizes is refused by comparison with the
    tensors it actually stores, before anything of those sizes is allocated.
    """
    path, arrays, header = _load(path)
    named = _named_leaves(template)
    names = [name for name, _ in named]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in header["names"] if n not in set(names)]
    if missing or extra:
        raise ValueError(
            f"{path}: the checkpoint does not fit the template (another model or optimizer?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}."
        )
    leaves = []
    for name, leaf in named:
        stored = arrays[name]
        shape, dtype = _leaf_spec(leaf)
        if stored.shape != shape or stored.dtype != dtype:
            raise ValueError(
                f"{path}: leaf {name} is {stored.dtype}{list(stored.shape)} in the checkpoint, "
                f"{dtype}{list(shape)} in the template."
            )
        leaves.append(stored)
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves), header["metadata"]


def stored_shapes(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{leaf name: (dtype name, shape)}`` of the tensors the checkpoint ``path`` stores (the file verified)."""
    _, arrays, _ = _load(path)
    return {name: (a.dtype.name, tuple(a.shape)) for name, a in arrays.items()}


#: The most classes a checkpoint's ``"model"`` entry may declare.
MAX_CLASSES = 100_000
#: The largest input height or width a checkpoint's ``"model"`` entry may declare.
MAX_SIDE = 4096


def check_model_entry(path, model) -> tuple[str, int, tuple[int, int, int]]:
    """``(name, num_classes, input_shape)`` of the ``"model"`` entry ``python -m jaxconv train`` writes, bounded.

    The entry is in the checkpoint's signed metadata, but a signature only
    says the file is whole, not that its numbers are sane: ``num_classes``
    must be an integer in ``[1, MAX_CLASSES]`` and ``input_shape`` three
    integers ``(H, W, C)`` with ``1 <= H, W <= MAX_SIDE`` and ``1 <= C <= 4``,
    else ``ValueError`` naming the file and the entry.  (Then build the
    template with ``jax.eval_shape`` and :func:`restore` compares it with the
    stored tensors.)
    """
    # ValueError, not TypeError, throughout: these are the contents of a file, not a caller's arguments.
    if not isinstance(model, dict):
        raise ValueError(f"{path}: its metadata's 'model' entry is not a JSON object.")  # noqa: TRY004
    name, classes, shape = model.get("name"), model.get("num_classes"), model.get("input_shape")
    if not isinstance(name, str):
        raise ValueError(f"{path}: its metadata's model 'name' (={name!r}) is not a string.")  # noqa: TRY004
    if type(classes) is not int or not 1 <= classes <= MAX_CLASSES:
        raise ValueError(
            f"{path}: its metadata declares num_classes={classes!r}; expected an integer in "
            f"[1, {MAX_CLASSES}] (the file was edited or is not a jaxconv checkpoint)."
        )
    ok = (
        isinstance(shape, list)
        and len(shape) == 3
        and all(type(d) is int for d in shape)
        and 1 <= shape[0] <= MAX_SIDE
        and 1 <= shape[1] <= MAX_SIDE
        and 1 <= shape[2] <= 4
    )
    if not ok or not isinstance(shape, list):
        raise ValueError(
            f"{path}: its metadata declares input_shape={shape!r}; expected [H, W, C] with H and W in "
            f"[1, {MAX_SIDE}] and C in [1, 4] (the file was edited or is not a jaxconv checkpoint)."
        )
    return name, classes, (shape[0], shape[1], shape[2])
