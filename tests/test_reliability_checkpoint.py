"""Checkpoint metadata is bounded: a re-signed file declaring absurd sizes allocates nothing and fails clearly."""

from __future__ import annotations

import hashlib
import json
import time

import jax
import numpy as np
import pytest

from jaxconv.nn import models
from jaxconv.train import checkpoint, init_optimizer, init_params, make_optimizer

INPUT = [8, 8, 1]


def _template(num_classes: int, input_shape=INPUT):
    init_fun, _ = models.MODELS["lenet5"](num_classes)
    params = init_params(init_fun, (-1, *input_shape), seed=0)[1]
    return {"params": params, "opt_state": init_optimizer(make_optimizer("momentum", 0.1), params)}


def _abstract(num_classes: int, input_shape=INPUT):
    """The template's shapes and dtypes only: what a loader should build from metadata."""
    return jax.eval_shape(lambda: _template(num_classes, input_shape))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, _template(10), {"model": {"name": "lenet5", "num_classes": 10, "input_shape": INPUT}})
    return path


def _resign(path, edit) -> None:
    """Edit the caller's metadata in ``path`` and sign the header again, as a forger would."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    record = json.loads(header["__metadata__"]["jaxconv"])
    edit(record["metadata"])
    text = json.dumps(record)
    header["__metadata__"] = {"jaxconv": text, "jaxconv.sha256": hashlib.sha256(text.encode()).hexdigest()}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + length :])


def test_an_abstract_template_restores_the_same_values(saved):
    concrete, _ = checkpoint.restore(saved, _template(10))
    abstract, meta = checkpoint.restore(saved, _abstract(10))
    assert meta["model"]["num_classes"] == 10
    for a, b in zip(jax.tree.leaves(concrete), jax.tree.leaves(abstract)):
        assert isinstance(b, np.ndarray)
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(concrete) == jax.tree.structure(abstract)


def test_a_resigned_billion_classes_is_refused_by_the_bound(saved):
    _resign(saved, lambda m: m["model"].update(num_classes=10**9))
    meta = checkpoint.read_metadata(saved)  # the signature is valid: only the numbers are absurd
    assert meta["model"]["num_classes"] == 10**9
    with pytest.raises(ValueError, match=r"declares num_classes=1000000000; expected an integer in \[1, 100000\]"):
        checkpoint.check_model_entry(saved, meta["model"])
    # Even past the bound, an abstract template (4 GB of classifier weights, twice with momentum) allocates nothing:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"float32\[(\d+, )?1000000000\] in the template"):
        checkpoint.restore(saved, _abstract(10**9))
    assert time.monotonic() - start < 10


def test_declared_sizes_within_the_bound_are_checked_against_the_stored_tensors(saved):
    """num_classes=90000 passes the bound; the abstract template meets the stored tensors and fails without
    allocating the 90000-way classifier (and its optimizer state)."""
    _resign(saved, lambda m: m["model"].update(num_classes=90_000))
    _, classes, shape = checkpoint.check_model_entry(saved, checkpoint.read_metadata(saved)["model"])
    start = time.monotonic()
    with pytest.raises(
        ValueError,
        match=r"leaf \[.* is float32\[(\d+, )?10\] in the checkpoint, "
        r"float32\[(\d+, )?90000\] in the template",
    ):
        checkpoint.restore(saved, _abstract(classes, list(shape)))
    assert time.monotonic() - start < 10


def test_a_forged_input_shape_is_refused(saved):
    _resign(saved, lambda m: m["model"].update(input_shape=[2**31, 2**31, 1]))
    with pytest.raises(ValueError, match=r"declares input_shape=\[2147483648, 2147483648, 1\]"):
        checkpoint.check_model_entry(saved, checkpoint.read_metadata(saved)["model"])
    _resign(saved, lambda m: m["model"].update(input_shape=[16, 16, 1]))
    _, classes, shape = checkpoint.check_model_entry(saved, checkpoint.read_metadata(saved)["model"])
    with pytest.raises(ValueError, match="in the checkpoint, .* in the template"):  # the dense layer's input size
        checkpoint.restore(saved, _abstract(classes, list(shape)))


@pytest.mark.parametrize(
    "model, message",
    [
        ([], "'model' entry is not a JSON object"),
        ({"name": 3, "num_classes": 10, "input_shape": INPUT}, "'name'"),
        ({"name": "lenet5", "num_classes": 0, "input_shape": INPUT}, "num_classes=0"),
        ({"name": "lenet5", "num_classes": 10.0, "input_shape": INPUT}, "num_classes=10.0"),
        ({"name": "lenet5", "num_classes": True, "input_shape": INPUT}, "num_classes=True"),
        ({"name": "lenet5", "num_classes": 10, "input_shape": [8, 8]}, "input_shape=\\[8, 8\\]"),
        ({"name": "lenet5", "num_classes": 10, "input_shape": [8, 8, 5]}, "C in \\[1, 4\\]"),
        ({"name": "lenet5", "num_classes": 10, "input_shape": [8, 0, 1]}, "input_shape"),
    ],
)
def test_model_entries_out_of_bounds(model, message):
    with pytest.raises(ValueError, match=message):
        checkpoint.check_model_entry("ck.safetensors", model)


def test_stored_shapes_lists_the_tensors(saved):
    shapes = checkpoint.stored_shapes(saved)
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(_template(10))[0]}
    assert shapes == {name: (np.asarray(leaf).dtype.name, tuple(np.shape(leaf))) for name, leaf in leaves.items()}
