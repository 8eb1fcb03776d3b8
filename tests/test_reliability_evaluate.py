"""``python -m jaxconv evaluate`` / ``predict`` on damaged, edited or unusual inputs: a clear message and exit 2,
never a traceback nor a silent ``loss nan``; a result that stands even where its confusion PNG cannot be written."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxconv.cli import commands as cli
from jaxconv.nn import models
from jaxconv.train import Config, checkpoint, data, fit, plots
from jaxconv.train.inference import evaluate_run, load_trained
from jaxconv.train.step import build_optimizer, init_optimizer, init_params

from ._runs import TINY_CONFIG as TINY

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cli(*argv):
    """``python -m jaxconv ARGV`` in a fresh process: ``(returncode, stdout, stderr)``."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "jaxconv", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One epoch of dd2424_net on the bundled digits (about a second)."""
    out = tmp_path_factory.mktemp("run")
    fit(Config(**TINY, dataset="digits", epochs=1, out=out), verbose=False)
    return out


@pytest.fixture(scope="module")
def digit_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "digit.npy"
    np.save(path, data.load_digits().test_images[0])
    return path


def _state(path):
    """The checkpoint's ``{"params", "opt_state"}`` and metadata."""
    meta = checkpoint.read_metadata(path)
    init_fun, _ = models.MODELS[meta["model"]["name"]](meta["model"]["num_classes"])
    params = init_params(init_fun, (-1, *meta["model"]["input_shape"]), seed=0)[1]
    optimizer = build_optimizer(meta["config"], int(meta["model"]["steps_per_epoch"]))
    return checkpoint.restore(path, {"params": params, "opt_state": init_optimizer(optimizer, params)})


def _edited(run_dir, where, *, params=None, edit=None):
    """A copy of ``run_dir``'s checkpoint, re-signed by ``checkpoint.save``, with ``params(params)`` for its
    parameters and ``edit(metadata)`` applied to its metadata: what a hand-edited or damaged file looks like."""
    state, meta = _state(run_dir / "checkpoint.safetensors")
    if params is not None:
        state = {**state, "params": params(state["params"])}
    if edit is not None:
        edit(meta)
    where.mkdir(parents=True, exist_ok=True)
    checkpoint.save(where / "checkpoint.safetensors", state, meta)
    return where


def _nan_first(params):
    leaves, treedef = jax.tree.flatten(params)
    leaves[0] = np.full_like(leaves[0], np.nan)
    return jax.tree.unflatten(treedef, leaves)


# --- 1. non-finite weights --------------------------------------------------------------------------------------


def test_evaluate_and_predict_refuse_non_finite_weights(run_dir, digit_npy, tmp_path):
    bad = _edited(run_dir, tmp_path / "nan", params=_nan_first)
    code, out, err = _cli("evaluate", str(bad))
    assert code == 2, (out, err)
    assert "weights are not finite" in err and "['params'][0]" in err
    assert "loss nan" not in out and "Traceback" not in err
    assert not (bad / "confusion-test.png").exists()
    code, out, err = _cli("predict", str(bad), str(digit_npy))
    assert code == 2 and "weights are not finite" in err and "Traceback" not in err and out == ""
    with pytest.raises(ValueError, match="not finite"):
        load_trained(bad)
    # An infinity too, in any parameter array.
    inf = _edited(run_dir, tmp_path / "inf", params=lambda p: jax.tree.map(lambda a: np.where(a > 0, np.inf, a), p))
    with pytest.raises(ValueError, match="not finite"):
        evaluate_run(inf)


# --- 2. hand-edited metadata ------------------------------------------------------------------------------------


def _set_std(value):
    def edit(meta):
        meta["standardization"]["std"] = value

    return edit


def _drop(section, key):
    def edit(meta):
        del meta[section][key]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set_std(0.0), "standardization std (=0.0) must be > 0"),
        (_set_std(-1.5), "standardization std (=-1.5) must be > 0"),
        (_set_std(None), "standardization std (=None) is not a finite number"),
        (_set_std("0.3"), "standardization std (='0.3') is not a finite number"),
        (_set_std(True), "standardization std (=True) is not a finite number"),
        (_drop("standardization", "std"), "standardization std (=None) is not a finite number"),
        (_drop("standardization", "mean"), "standardization mean (=None) is not a finite number"),
        (_drop("config", "dataset"), "config names no data set (dataset=None"),
    ],
    ids=["std0", "std-negative", "std-None", "std-string", "std-bool", "std-missing", "mean-missing", "no-dataset"],
)
def test_a_hand_edited_checkpoint_is_a_clear_error(run_dir, digit_npy, tmp_path, capsys, edit, message):
    edited = _edited(run_dir, tmp_path / "edited", edit=edit)
    capsys.readouterr()
    assert cli.main(["evaluate", str(edited)]) == 2  # in-process: an uncaught exception would fail the test
    err = capsys.readouterr().err
    assert err.startswith("python -m jaxconv evaluate: error: ") and message in err, err
    if "dataset" not in message:  # predict needs no data set, only the standardisation
        assert cli.main(["predict", str(edited), str(digit_npy)]) == 2
        assert message in capsys.readouterr().err
    else:  # naming the data set is the way out
        assert cli.main(["evaluate", str(edited), "--dataset", "digits"]) == 0


def test_a_hand_edited_checkpoint_exits_2_without_a_traceback_from_the_command(run_dir, tmp_path):
    edited = _edited(run_dir, tmp_path / "edited", edit=_set_std("abc"))
    code, out, err = _cli("evaluate", str(edited), "--json")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "standardization std (='abc') is not a finite number" in err


# --- 3. a read-only run directory -------------------------------------------------------------------------------


def _fail_writes(monkeypatch):
    """Writes of the plots fail as in a read-only directory (the tests may run as root, whom chmod does not stop)."""

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(plots, "atomic_write_bytes", refuse)


def _read_only(path) -> bool:
    """Make ``path`` read-only; whether that stops this process writing there (not for root)."""
    path.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_evaluate_on_a_read_only_run_directory_prints_its_result(run_dir, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    shutil.copytree(run_dir, ro)
    try:
        if _read_only(ro):  # a real read-only directory: the real command
            code, out, err = _cli("evaluate", str(ro))
            assert code == 0, err
            code_json, out_json, _ = _cli("evaluate", str(ro), "--json")
            assert code_json == 0
        else:
            _fail_writes(monkeypatch)
            capsys.readouterr()
            code = cli.main(["evaluate", str(ro)])
            out, err = capsys.readouterr()
            assert code == 0, err
            code_json = cli.main(["evaluate", str(ro), "--json"])
            out_json = capsys.readouterr().out
            assert code_json == 0
        expected = str(ro / "confusion-test.png")
        assert "accuracy" in out and "no confusion matrix written" in out
        assert "note: the confusion matrix was not written to " + expected in err and "Permission denied" in err
        result = json.loads(out_json)
        assert result["confusion_png"] is None and "Permission denied" in result["confusion_note"]
        assert result["images"] == 360 and 0 <= result["accuracy"] <= 1
        assert not (ro / "confusion-test.png").exists()
    finally:
        ro.chmod(0o755)


# --- 4. --confusion -------------------------------------------------------------------------------------------


def test_confusion_into_a_directory_reports_the_file_it_wrote(run_dir, tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--split", "train", "--confusion", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    written = folder / "confusion-train.png"
    assert result["confusion_png"] == str(written) and result["confusion_note"] is None
    assert written.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["evaluate", str(run_dir), "--confusion", str(folder)]) == 0
    assert f"confusion matrix in {folder / 'confusion-test.png'}" in capsys.readouterr().out


def test_confusion_to_a_name_that_is_not_a_png_is_refused(run_dir, tmp_path):
    target = tmp_path / "x.txt"
    code, out, err = _cli("evaluate", str(run_dir), "--confusion", str(target))
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"the confusion matrix (='{target}') is written as a PNG: name a .png file" in err
    assert not target.exists()
    with pytest.raises(ValueError, match="written as a PNG"):
        evaluate_run(run_dir, confusion_png=tmp_path / "noext")


# --- 5. images too small for the model --------------------------------------------------------------------------


def _write_idx_1x1(directory: pathlib.Path, count: int = 20) -> pathlib.Path:
    """MNIST-format (IDX) files of ``count`` 1x1 images per split."""
    directory.mkdir()
    pixels = np.arange(count, dtype=np.uint8) * 10
    labels = np.arange(count, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, count, 1, 1) + pixels.tobytes()
        )
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, count) + labels.tobytes())
    return directory


def test_min_input_size_and_check_input_shape():
    assert models.min_input_size("dd2424_net") == 3  # its VALID 3x3 convolution
    assert all(models.min_input_size(name) == 1 for name in models.MODELS if name != "dd2424_net")  # all SAME
    with pytest.raises(ValueError, match=r"model 'dd2424_net' needs images of at least 3x3, got 1x1"):
        models.check_input_shape("dd2424_net", (1, 1, 1))
    with pytest.raises(ValueError, match=r"at least 3x3, got 28x2"):
        models.check_input_shape("dd2424_net", (28, 2, 1))
    models.check_input_shape("dd2424_net", (3, 3, 1))
    models.check_input_shape("lenet5", (1, 1, 3))
    with pytest.raises(ValueError, match="`model`"):
        models.check_input_shape("vgg", (32, 32, 3))
    with pytest.raises(ValueError, match="`shape`"):
        models.check_input_shape("lenet5", (0, 8, 1))


def test_evaluate_on_images_too_small_for_the_model_names_the_model_and_its_minimum(run_dir, tmp_path, capsys):
    tiny = _write_idx_1x1(tmp_path / "mnist1x1")
    assert data.load_dataset("mnist", tiny).test_images.shape == (20, 1, 1, 1)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--dataset", "mnist", "--data-dir", str(tiny)]) == 2
    assert "model 'dd2424_net' needs images of at least 3x3, got 1x1" in capsys.readouterr().err
    # A checkpoint whose metadata declares an input too small for its model.
    edited = _edited(run_dir, tmp_path / "edited", edit=lambda meta: meta["model"].update(input_shape=[1, 1, 1]))
    code, out, err = _cli("evaluate", str(edited))
    assert code == 2 and "Traceback" not in err
    assert "input_shape does not fit its model: model 'dd2424_net' needs images of at least 3x3, got 1x1" in err
