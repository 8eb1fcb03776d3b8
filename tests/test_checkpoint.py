"""jaxconv.checkpoint: exact round trips of params and optax states, template checks, atomic saves under crashes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconv import checkpoint, models, train


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
    with pytest.raises(ValueError, match=r"leaf \['params'\]\[0\]\['w'\] is float32\[5, 5, 1, 6\] in the checkpoint, "
                                         r"float32\[3, 3, 1, 6\] in the template"):
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
from jaxconv import checkpoint
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
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(path)], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.safetensors.tmp-")  # the torn write
    restored, meta = checkpoint.restore(path, template)
    np.testing.assert_array_equal(restored["w"], 1.0)
    assert meta == {"epoch": 1}
    checkpoint.save(path, {"w": np.full((64, 64), 3.0, np.float32)}, {"epoch": 2})  # saving again still works
    np.testing.assert_array_equal(checkpoint.restore(path, template)[0]["w"], 3.0)
