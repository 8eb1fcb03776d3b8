"""jaxconv.train.checkpoint: exact round trips of params and optax states, template checks, atomic saves under crashes,
checksums and header checks on real (corrupted, truncated, hand-edited) files, non-regular paths, file modes."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconv import train
from jaxconv.nn import models
from jaxconv.train import checkpoint


def _state(optimizer=None, seed=0):
    init, _ = models.lenet5()
    _, params = train.init_params(init, (-1, 8, 8, 1), seed=seed)
    optimizer = optimizer or train.default_optimizer(0.05, 0.9, 5e-4)
    opt_state = optimizer.init(params)
    # Non-trivial optimizer state: take one update with a pseudo-gradient.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5) + 0.1 * p, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y) and np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["sgd_momentum_decay", "adam", "sgd_schedule"])
def test_round_trip_is_exact_with_optax_namedtuple_states(tmp_path, name):
    optimizer = {
        "sgd_momentum_decay": train.default_optimizer(0.05, 0.9, 5e-4),
        "adam": optax.adam(1e-3),
        "sgd_schedule": optax.sgd(optax.exponential_decay(0.1, 10, 0.5), momentum=0.9),
    }[name]
    tree = _state(optimizer)
    path = tmp_path / "run" / "checkpoint.safetensors"
    meta = {"epoch": 3, "step": 132, "config": {"model": "lenet5", "lr": 0.05}, "history": [{"loss": 0.25}]}
    checkpoint.save(path, tree, meta)
    template = _state(optimizer, seed=1)  # same structure, other values
    restored, restored_meta = checkpoint.restore(path, template)
    _assert_identical(restored, tree)
    assert restored_meta == meta and checkpoint.read_metadata(path) == meta
    # NamedTuple node types come back (optax reads fields by name).
    assert type(restored["opt_state"]) is type(tree["opt_state"])
    optimizer.update(restored["params"], restored["opt_state"], restored["params"])
    assert os.listdir(path.parent) == ["checkpoint.safetensors"]


def test_file_holds_named_arrays_and_json_only(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"params": [{"w": np.ones((2, 3), np.float32)}, ()], "count": np.int32(4)}, {"epoch": 1})
    from safetensors.numpy import load_file

    stored = load_file(str(path))
    assert sorted(stored) == ["['count']", "['params'][0]['w']"]
    assert stored["['count']"].shape == () and stored["['count']"].dtype == np.int32


def test_template_mismatch_names_the_leaf(tmp_path):
    path = tmp_path / "c.safetensors"
    tree = _state()
    checkpoint.save(path, tree)
    other_shape = jax.tree.map(lambda x: x, tree)
    other_shape["params"][0]["w"] = jnp.zeros((3, 3, 1, 6), jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"leaf \['params'\]\[0\]\['w'\] is float32\[5, 5, 1, 6\] in the checkpoint, "
        r"float32\[3, 3, 1, 6\] in the template",
    ):
        checkpoint.restore(path, other_shape)
    other_dtype = jax.tree.map(lambda x: x, tree)
    other_dtype["params"][0]["b"] = jnp.zeros(6, jnp.float64)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\]\['b'\] is float32\[6\] .* float64\[6\]"):
        checkpoint.restore(path, other_dtype)
    with pytest.raises(ValueError, match=r"does not fit the template .* missing"):
        checkpoint.restore(path, _state(optax.adam(1e-3)))


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        checkpoint.restore(tmp_path / "nothing.safetensors", _state())
    path = tmp_path / "c.safetensors"
    tree = _state()
    checkpoint.save(path, tree)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"c.safetensors: not a readable jaxconv checkpoint"):
        checkpoint.restore(path, tree)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(path))  # a safetensors file, not ours
    with pytest.raises(ValueError, match=r"c.safetensors: not a readable jaxconv checkpoint"):
        checkpoint.restore(path, tree)


def test_bad_metadata_and_leaves(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint.save(tmp_path / "c.safetensors", {"w": np.zeros(2)}, {"f": object()})
    with pytest.raises(ValueError, match=r"leaf \['w'\] is not an array"):
        checkpoint.save(tmp_path / "c.safetensors", {"w": "text"})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failure_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "checkpoint.safetensors"
    old = _state(seed=0)
    checkpoint.save(path, old, {"epoch": 1})
    before = path.read_bytes()

    class Crash(RuntimeError):
        pass

    if where == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise Crash("disk full halfway")

        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(Crash("I/O error")))
    else:
        monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (_ for _ in ()).throw(Crash("rename failed")))
    with pytest.raises(Crash):
        checkpoint.save(path, _state(seed=1), {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    restored, meta = checkpoint.restore(path, old)
    _assert_identical(restored, old)
    assert meta == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]  # the temporary file is removed


_KILLED_MID_SAVE = """
import os, sys
import numpy as np
from jaxconv.train import checkpoint
path = sys.argv[1]
real_fdopen = os.fdopen
class DieHalfway:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        os._exit(9)  # the process dies: no cleanup, no exception handlers
checkpoint.os.fdopen = lambda fd, mode: DieHalfway(real_fdopen(fd, mode))
checkpoint.save(path, {"w": np.full((64, 64), 2.0, np.float32)}, {"epoch": 2})
"""


def test_a_process_killed_mid_save_loses_nothing(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    template = {"w": np.zeros((64, 64), np.float32)}
    checkpoint.save(path, {"w": np.ones((64, 64), np.float32)}, {"epoch": 1})
    root = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(path)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 9, done.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.safetensors.tmp-")  # the torn write
    restored, meta = checkpoint.restore(path, template)
    np.testing.assert_array_equal(restored["w"], 1.0)
    assert meta == {"epoch": 1}
    checkpoint.save(path, {"w": np.full((64, 64), 3.0, np.float32)}, {"epoch": 2})  # saving again still works
    np.testing.assert_array_equal(checkpoint.restore(path, template)[0]["w"], 3.0)
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]  # and removes the killed save's torn temporary file


# ------------------------------------------------------------------ checksums, headers, non-regular paths


def _small_tree():
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.0, 3.25], np.float32),
        "step": np.int32(7),
    }


def _layout(path):
    """``(safetensors header, offset of the data region)`` of the file, parsed independently of jaxconv."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), 8 + length


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def _both_readers(path, template):
    return [lambda: checkpoint.restore(path, template), lambda: checkpoint.read_metadata(path)]


def test_the_file_records_sha256_of_each_tensors_bytes_and_of_the_header(tmp_path):
    path = tmp_path / "c.safetensors"
    tree = _state()
    checkpoint.save(path, tree, {"epoch": 2})
    header, start = _layout(path)
    data = path.read_bytes()
    text = header["__metadata__"]["jaxconv"]
    assert header["__metadata__"]["jaxconv.sha256"] == hashlib.sha256(text.encode()).hexdigest()
    jaxconv_header = json.loads(text)
    assert jaxconv_header["format"] == 1 and jaxconv_header["metadata"] == {"epoch": 2}
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert jaxconv_header["names"] == names and sorted(jaxconv_header["tensors"]) == sorted(names)
    for name, leaf in zip(names, jax.tree.leaves(tree)):
        begin, end = header[name]["data_offsets"]
        record = jaxconv_header["tensors"][name]
        assert record["sha256"] == hashlib.sha256(data[start + begin : start + end]).hexdigest()
        assert (record["dtype"], record["shape"]) == (np.asarray(leaf).dtype.name, list(np.shape(leaf)))


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_flipped_byte_in_a_tensors_data_is_caught_naming_the_tensor(tmp_path, which):
    path = tmp_path / "c.safetensors"
    tree = _state()
    checkpoint.save(path, tree, {"epoch": 2})
    header, start = _layout(path)
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (begin, end), name = tensors[0] if which == "first" else tensors[-1]
    corrupted = _flip_byte(path, start + (begin + end) // 2)
    for read in _both_readers(path, tree):
        with pytest.raises(ValueError, match=rf"c\.safetensors: checksum mismatch in tensor {re.escape(name)}"):
            read()
    assert path.read_bytes() == corrupted  # verifying does not touch the file


def test_a_flipped_byte_in_the_metadata_is_caught(tmp_path):
    path = tmp_path / "c.safetensors"
    tree = _small_tree()
    checkpoint.save(path, tree, {"note": "hello world", "epoch": 3})
    data = path.read_bytes()
    corrupted = _flip_byte(path, data.index(b"hello") + 4)  # "hello" -> "helln": still valid JSON
    for read in _both_readers(path, tree):
        with pytest.raises(ValueError, match=r"c\.safetensors: checksum mismatch in the metadata"):
            read()
    assert path.read_bytes() == corrupted
    path.write_bytes(data)
    corrupted = _flip_byte(path, 8)  # the header's opening "{": it no longer parses
    for read in _both_readers(path, tree):
        with pytest.raises(ValueError, match=r"c\.safetensors: not a readable .* safetensors header is not valid JSON"):
            read()
    assert path.read_bytes() == corrupted


def test_truncated_files_and_offsets_past_the_end(tmp_path):
    path = tmp_path / "c.safetensors"
    tree = _small_tree()
    checkpoint.save(path, tree)
    data = path.read_bytes()
    _, start = _layout(path)
    cases = [
        (data[:-1], r"tensor \['(w|b|step)'\]'s data \(bytes \d+\.\.\d+\) runs past the end .* \(truncated\?\)"),
        (
            data[: start - 10],
            r"its safetensors header is \d+ bytes but the file ends \d+ bytes after "
            r".* \(truncated\?\)",
        ),
        (data[:5], r"it is 5 bytes long, too short for a safetensors file"),
        (b"", r"it is 0 bytes long"),
        ((2**40).to_bytes(8, "little") + data[8:], r"its safetensors header is 1099511627776 bytes but the file ends"),
    ]
    for content, message in cases:
        path.write_bytes(content)
        for read in _both_readers(path, tree):
            with pytest.raises(ValueError, match=r"c\.safetensors: not a readable jaxconv checkpoint: " + message):
                read()


def _rewrite_header(path, edit, rehash=True):
    """Hand-edit the safetensors header of ``path`` (``edit`` mutates the parsed JSON); keeps the data bytes.

    ``rehash``: store the checksum of the edited "jaxconv" entry, as a careless writer would, so that the
    structural checks (not the checksum) are what must catch the edit.
    """
    header, start = _layout(path)
    data = path.read_bytes()
    edit(header)
    meta = header.get("__metadata__")
    if rehash and isinstance(meta, dict) and isinstance(meta.get("jaxconv"), str) and "jaxconv.sha256" in meta:
        meta["jaxconv.sha256"] = hashlib.sha256(meta["jaxconv"].encode()).hexdigest()
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[start:])


def _in_jaxconv(edit):
    def edit_header(header):
        jaxconv = json.loads(header["__metadata__"]["jaxconv"])
        edit(jaxconv)
        header["__metadata__"]["jaxconv"] = json.dumps(jaxconv)

    return edit_header


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _delete(key):
    return lambda d: d.__delitem__(key)


_HAND_EDITS = {
    "no jaxconv entry": (lambda h: h["__metadata__"].pop("jaxconv"), r"no 'jaxconv' entry \(a safetensors file"),
    "no safetensors metadata": (_delete("__metadata__"), r"no 'jaxconv' entry"),
    "jaxconv not JSON": (
        lambda h: h["__metadata__"].update(jaxconv="{not json"),
        r"'jaxconv' header is not valid JSON",
    ),
    "jaxconv a list": (lambda h: h["__metadata__"].update(jaxconv="[]"), r"'jaxconv' header is not a JSON object"),
    "format 2": (_in_jaxconv(_set("format", 2)), r"'format' 2; this version reads format 1\."),
    "no format": (_in_jaxconv(_delete("format")), r"'format' None"),
    "no names": (_in_jaxconv(_delete("names")), r"'names' is missing or not a list of strings"),
    "names not str": (_in_jaxconv(_set("names", [1, 2, 3])), r"'names' is missing or not a list of strings"),
    "names a string": (_in_jaxconv(_set("names", "['w']")), r"'names' is missing or not a list of strings"),
    "names differ": (_in_jaxconv(lambda j: j["names"].pop()), r"'tensors' and 'names' list different leaves"),
    "no metadata": (_in_jaxconv(_delete("metadata")), r"'metadata' is missing or not a JSON object"),
    "metadata a list": (_in_jaxconv(_set("metadata", [1])), r"'metadata' is missing or not a JSON object"),
    "no header checksum": (lambda h: h["__metadata__"].pop("jaxconv.sha256"), r"no 'jaxconv.sha256' entry"),
    "no tensor checksums": (_in_jaxconv(_delete("tensors")), r"'tensors' \(the checksums\) is missing"),
    "no sha256 of w": (
        _in_jaxconv(lambda j: j["tensors"]["['w']"].pop("sha256")),
        r"'tensors' entry for tensor \['w'\] lacks a string 'sha256'",
    ),
    "tensors a list": (_in_jaxconv(_set("tensors", [])), r"'tensors' \(the checksums\) is missing or not"),
    "offsets gone": (lambda h: h["['w']"].pop("data_offsets"), r"tensor \['w'\] has no valid 'data_offsets'"),
    "offsets past the end": (
        lambda h: h["['w']"].update(data_offsets=[0, 10**9]),
        r"tensor \['w'\]'s data .* past the end",
    ),
}


@pytest.mark.parametrize("case", sorted(_HAND_EDITS))
def test_hand_edited_headers_give_a_value_error_naming_the_key(tmp_path, case):
    edit, message = _HAND_EDITS[case]
    path = tmp_path / "c.safetensors"
    tree = _small_tree()
    checkpoint.save(path, tree, {"epoch": 1})
    _rewrite_header(path, edit)
    for read in _both_readers(path, tree):
        with pytest.raises(ValueError, match=r"c\.safetensors: not a readable jaxconv checkpoint: .*" + message):
            read()


def test_edits_the_checksums_do_not_cover_are_caught_too(tmp_path):
    path = tmp_path / "c.safetensors"
    tree = _small_tree()
    checkpoint.save(path, tree, {"epoch": 1})
    original = path.read_bytes()
    _rewrite_header(path, _in_jaxconv(lambda j: j["metadata"].update(epoch=5)), rehash=False)  # "resume at 5"
    with pytest.raises(ValueError, match=r"c\.safetensors: checksum mismatch in the metadata"):
        checkpoint.read_metadata(path)
    path.write_bytes(original)
    _rewrite_header(path, lambda h: h["['w']"].update(shape=[3, 2]))  # same bytes, transposed: no checksum changes
    with pytest.raises(
        ValueError,
        match=r"tensor \['w'\] is stored as float32\[3, 2\] but its header records "
        r"float32\[2, 3\]",
    ):
        checkpoint.restore(path, {"w": np.zeros((3, 2), np.float32), "b": tree["b"], "step": tree["step"]})


_READ_EACH = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # reading /dev/zero "to the end" fails fast
import numpy as np
from jaxconv.train import checkpoint
template = {"w": np.zeros((2, 3), np.float32)}
errors = []
for path in sys.argv[1:]:
    for read in (lambda: checkpoint.restore(path, template), lambda: checkpoint.read_metadata(path)):
        try:
            read()
            errors.append([path, None, None])
        except Exception as err:
            errors.append([path, type(err).__name__, str(err)])
print(json.dumps(errors))
"""


def test_fifos_and_devices_in_place_of_the_checkpoint_are_refused_without_blocking_or_reading(tmp_path):
    fifo = tmp_path / "c.safetensors"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block
    (tmp_path / "fifo-link.safetensors").symlink_to(fifo)
    (tmp_path / "zero-link.safetensors").symlink_to("/dev/zero")
    kinds = {
        str(fifo): "a FIFO",
        str(tmp_path / "fifo-link.safetensors"): "a FIFO",
        "/dev/null": "a character device",
        "/dev/zero": "a character device",
        str(tmp_path / "zero-link.safetensors"): "a character device",
    }
    root = pathlib.Path(__file__).resolve().parent.parent
    # A real process with a time limit and a memory cap: a regression fails here instead of hanging the suite.
    done = subprocess.run(
        [sys.executable, "-c", _READ_EACH, *kinds], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout)
    assert len(errors) == 2 * len(kinds)
    for path, kind, message in errors:
        assert (kind, message) == (
            "ValueError",
            f"{path}: is not a regular file ({kinds[path]}); a checkpoint is a file written by save().",
        )


def test_a_directory_or_nothing_in_place_of_the_checkpoint(tmp_path):
    directory = tmp_path / "c.safetensors"
    directory.mkdir()
    for read in _both_readers(directory, _small_tree()):
        with pytest.raises(IsADirectoryError, match=r"c\.safetensors' is a directory, not a file"):
            read()
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    for read in _both_readers(dangling, _small_tree()):
        with pytest.raises(FileNotFoundError, match=r"checkpoint '.*gone\.safetensors' does not exist"):
            read()


# ------------------------------------------------------------------ temporary files and modes


def test_a_save_removes_stale_temporaries_of_that_file_and_nothing_else(tmp_path):
    stale = [".c.safetensors.tmp-a1b2c3d4", ".c.safetensors.tmp-zz_9x", ".metrics.json.tmp-0000abcd"]
    unrelated = [
        ".other.safetensors.tmp-a1b2c3d4",
        "c.safetensors.tmp-a1b2c3d4",
        ".c.safetensors.tmp-",
        ".c.safetensors.tmp-x.tmp-a1b2c3d4",
        ".c.safetensors.bak",
        "notes.txt",
    ]
    for name in stale + unrelated:
        (tmp_path / name).write_bytes(b"torn")
    (tmp_path / ".c.safetensors.tmp-adir").mkdir()  # matches, but is a directory: not ours
    checkpoint.save(tmp_path / "c.safetensors", _small_tree())
    checkpoint.atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    assert sorted(os.listdir(tmp_path)) == sorted(
        unrelated + [".c.safetensors.tmp-adir", "c.safetensors", "metrics.json"]
    )
    assert all((tmp_path / name).read_bytes() == b"torn" for name in unrelated)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("umask_from", ["/proc/self/status", "os.umask"])
def test_files_get_the_mode_the_umask_gives_new_files(tmp_path, monkeypatch, umask, mode, umask_from):
    if umask_from == "os.umask":  # as on systems without /proc
        monkeypatch.setattr(
            checkpoint, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(a[0])), raising=False
        )
    previous = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "c.safetensors", _small_tree())
        checkpoint.atomic_write_bytes(tmp_path / "metrics.json", b"{}")
        checkpoint.save(tmp_path / "c.safetensors", _small_tree())  # replacing keeps the mode
        assert os.umask(umask) == umask  # reading the umask left it as it was
    finally:
        os.umask(previous)
    for name in ("c.safetensors", "metrics.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
