"""Checkpoints: any pytree of arrays (params, optax state) plus JSON metadata, in one safetensors file.

Format: a safetensors file whose tensors are the pytree's leaves, each named by
its key path (``jax.tree_util.keystr``, e.g. ``['params'][0]['w']`` or
``['opt_state'][1][0].trace[0]['w']``), and whose header metadata holds, under
``"jaxconv"``, a JSON object ``{"format": 1, "names": [...leaf names in order],
"metadata": {...the caller's JSON...}}``.  No pickle: the file holds only
arrays and JSON, so loading one runs no code.

Restoring needs a *template*: a pytree of the same structure (e.g. the params
from ``init_fun`` and ``optimizer.init(params)``).  Its leaves are replaced by
the stored arrays, matched by key path; names, shapes and dtypes must agree
exactly, so a checkpoint of another model or optimizer fails with a
``ValueError`` saying which leaf differs instead of silently loading.  optax
states are NamedTuples, which key paths name by field, so they come back as
the same NamedTuple types.

Atomic: :func:`save` writes the whole file to a temporary file in the same
directory, flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the old
checkpoint (an atomic rename on POSIX and Windows) and fsyncs the directory.  A
crash at any moment leaves either the old checkpoint or the new one, never a
torn file; a stale temporary file (``.<name>.tmp-*``) may remain and is ignored.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np

__all__ = ["atomic_write_bytes", "read_metadata", "restore", "save"]

_FORMAT = 1
_KEY = "jaxconv"


def _named_leaves(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"`tree` has leaves with the same key path: {sorted(n for n in names if names.count(n) > 1)}.")
    return named


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(path.parent)


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


def save(path, tree, metadata: dict | None = None) -> None:
    """Save the arrays of ``tree`` and the JSON-serialisable ``metadata`` to ``path``, atomically.

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
    header = {"format": _FORMAT, "names": [name for name, _ in named], "metadata": metadata or {}}
    try:
        header_json = json.dumps(header)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`metadata` must be JSON-serialisable: {err}") from err
    atomic_write_bytes(path, st_save(arrays, metadata={_KEY: header_json}))


def _load(path):
    from safetensors.numpy import load as st_load

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        arrays = st_load(data)
        # The safetensors header: 8 bytes little-endian length, then JSON with "__metadata__".
        header_length = int.from_bytes(data[:8], "little")
        file_metadata = json.loads(data[8 : 8 + header_length])["__metadata__"]
        header = json.loads(file_metadata[_KEY])
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise ValueError(f"{path}: not a readable jaxconv checkpoint ({type(err).__name__}: {err}).") from err
    if header.get("format") != _FORMAT or sorted(header.get("names", [])) != sorted(arrays):
        raise ValueError(f"{path}: the header's leaf names do not match the stored tensors (format {header.get('format')}).")
    return path, arrays, header


def read_metadata(path) -> dict:
    """The ``metadata`` dict a checkpoint was saved with (reads and checks the whole file)."""
    return _load(path)[2]["metadata"]


def restore(path, template) -> tuple[Any, dict]:
    """Load ``path`` into the structure of ``template``: ``(tree, metadata)``.

    ``tree`` has ``template``'s structure and node types (NamedTuples, dicts,
    lists) with numpy leaves of the stored values; raises ``ValueError`` naming the
    first leaf whose name, shape or dtype differs from the template's.
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
        shape, dtype = tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if stored.shape != shape or stored.dtype != dtype:
            raise ValueError(
                f"{path}: leaf {name} is {stored.dtype}{list(stored.shape)} in the checkpoint, "
                f"{dtype}{list(shape)} in the template."
            )
        leaves.append(stored)
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves), header["metadata"]
