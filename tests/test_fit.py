"""``jaxconv.train.fit``: training from Python, the same run as ``python -m jaxconv train``.

``fit(Config(...))`` returns its history and a typed status (completed, stopped
early, diverged); the command line and ``fit`` train bit-identical parameters;
a per-epoch callback sees every epoch and can stop the run; a diverging run is a
status that keeps the last finite checkpoint; a bad setting is a ``FitError``
naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxconv.cli import commands as cli
from jaxconv.train import (
    RECIPES,
    Completed,
    Config,
    Diverged,
    FitError,
    Stopped,
    StopTraining,
    checkpoint,
    fit,
    hostmem,
    rundir,
)
from jaxconv.train.inference import load_trained

from ._datasets import mnist_dir, write_idx
from ._runs import TINY as TINY_ARGV
from ._runs import TINY_CONFIG as TINY  # the smallest model and big batches: a digits epoch well under a second


def _assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """``fit(Config(model="lenet5", dataset="digits", epochs=2, out=...))``: the README's example."""
    out = tmp_path_factory.mktemp("lenet")
    return fit(Config(model="lenet5", dataset="digits", epochs=2, out=out), verbose=False)


def test_fit_trains_and_returns_its_history(lenet):
    assert lenet.status == Completed(epochs=2) and lenet.status.kind == "completed"
    assert [h["epoch"] for h in lenet.history] == [1, 2]
    assert lenet.history[1]["train_loss"] < lenet.history[0]["train_loss"]
    assert lenet.test_accuracy == lenet.history[-1]["test_accuracy"] > 0.8  # chance is 0.1
    record = json.loads((lenet.run_dir / "metrics.json").read_text())
    assert record["epochs"] == lenet.history and record["config"]["model"] == "lenet5"
    assert lenet.best is not None and lenet.best == record["best"]  # the recipe holds out 10% for validation
    assert set(lenet.outputs) == {
        "checkpoint.safetensors",
        "best.safetensors",
        "metrics.json",
        "curves.png",
        "filters.png",
    }
    _, params, meta = load_trained(lenet.run_dir)
    assert meta["epoch"] == 2
    _assert_same_params(lenet.params, params)
    assert not (lenet.run_dir / rundir.LOCK_NAME).exists()  # released


def test_the_command_line_and_fit_train_bit_identical_parameters(lenet, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["train", "--model", "lenet5", "--dataset", "digits", "--epochs", "2", "--out", str(out)]) == 0
    _, params, meta = load_trained(out)
    _assert_same_params(params, lenet.params)
    assert meta["history"][-1]["test_accuracy"] == lenet.test_accuracy
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"test accuracy {lenet.test_accuracy:.2%}")


def test_a_callback_sees_every_epoch_and_can_stop_the_run(tmp_path):
    seen = []

    def log(record):
        seen.append(record)

    def stop_at_two(record):
        return record["epoch"] == 2

    out = tmp_path / "stopped"
    result = fit(Config(**TINY, epochs=4, out=out), callbacks=[log, stop_at_two], verbose=False)
    assert result.status == Stopped(epoch=2, epochs=4, reason="callback")
    assert [r["epoch"] for r in seen] == [1, 2]
    assert seen == result.history and set(seen[0]) >= {"train_loss", "test_accuracy", "seconds"}
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["stopped"] == {"reason": "callback", "epoch": 2}

    # Resumed, the run goes on from epoch 3 and reaches the parameters of a run never stopped.
    def halt(record):
        raise StopTraining

    resumed = fit(Config(**TINY, epochs=4, out=out, resume=True), callbacks=[log], verbose=False)
    assert resumed.status == Completed(epochs=4) and [r["epoch"] for r in seen] == [1, 2, 3, 4]
    straight = fit(Config(**TINY, epochs=4, out=tmp_path / "straight"), verbose=False)
    _assert_same_params(resumed.params, straight.params)

    # StopTraining raised by a callback stops the run the same way.
    halted = fit(Config(**TINY, epochs=4, out=tmp_path / "halted"), callbacks=[halt], verbose=False)
    assert halted.status == Stopped(epoch=1, epochs=4, reason="callback") and len(halted.history) == 1


def test_an_error_in_a_callback_propagates_and_releases_the_run_directory(tmp_path):
    def broken(record):
        raise KeyError("my logger is down")

    out = tmp_path / "broken"
    with pytest.raises(KeyError, match="my logger is down"):
        fit(Config(**TINY, epochs=2, out=out), callbacks=[broken], verbose=False)
    assert not (out / rundir.LOCK_NAME).exists()
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == 1  # the epoch before it is kept


def test_stop_after_is_a_stopped_status(tmp_path):
    result = fit(Config(**TINY, epochs=3, stop_after=1, out=tmp_path), verbose=False)
    assert result.status == Stopped(epoch=1, epochs=3, reason="stop_after")


def test_divergence_is_a_status_and_keeps_the_last_finite_checkpoint(tmp_path):
    # At lr 5 this run's first epoch is finite and it diverges in a later one.
    out = tmp_path / "diverging"
    first = fit(Config(**dict(TINY, lr=5.0), epochs=1, out=out), verbose=False)
    assert first.status == Completed(epochs=1)
    result = fit(Config(**dict(TINY, lr=5.0), epochs=20, resume=True, out=out), verbose=False)
    status = result.status
    assert isinstance(status, Diverged) and status.kind == "diverged"
    assert status.epoch >= 2 and 1 <= status.step <= status.steps_per_epoch == 22
    assert not (status.finite_loss and status.finite_params)
    assert status.checkpoint_epoch == status.epoch - 1 == len(result.history)
    assert f"training diverged at epoch {status.epoch}, step {status.step}" in status.message
    _, saved, meta = load_trained(out)
    assert meta["epoch"] == status.checkpoint_epoch
    _assert_same_params(result.params, saved)  # the parameters returned are the last finite ones
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(saved))
    stopped = json.loads((out / "metrics.json").read_text())["stopped"]
    assert stopped["reason"] == "diverged" and (stopped["epoch"], stopped["step"]) == (status.epoch, status.step)


def test_a_run_that_diverges_at_once_writes_no_checkpoint(tmp_path):
    result = fit(Config(**dict(TINY, lr=1e30), epochs=2, out=tmp_path), verbose=False)
    assert isinstance(result.status, Diverged) and result.status.epoch == 1
    assert result.status.checkpoint_epoch is None and "no checkpoint was written" in result.status.message
    assert result.history == [] and result.test_accuracy is None
    assert not (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", float("nan")),
        ("batch_size", 0),
        ("epochs", True),
        ("seed", 2**32),
        ("momentum", 1.0),
        ("val_fraction", 1.0),
        ("model", "vgg16"),
        ("dataset", "imagenet"),
        ("optimizer", "rmsprop"),
        ("schedule", "linear"),
        ("augment", "yes"),
        ("devices", 0),
        ("stop_after", 0),
        ("out", 3),
    ],
)
def test_a_bad_setting_raises_fit_error_naming_the_field_and_value(field, value):
    with pytest.raises(FitError) as caught:
        Config(**{field: value})
    assert isinstance(caught.value, ValueError)
    assert f"`{field}` (={value!r})" in str(caught.value) and caught.value.fields == (field,)


@pytest.mark.parametrize(
    "settings, fields, match",
    [
        ({"resume": True, "overwrite": True}, ("resume", "overwrite"), "exclude each other"),
        ({"epochs": 3, "warmup_epochs": 3.0}, ("warmup_epochs", "epochs"), "--warmup-epochs 3.0 is the whole run"),
        ({"dataset": "mnist"}, ("dataset", "data_dir"), "--dataset mnist is read from files"),
        (
            {"batch_size": 64, "devices": 3},
            ("batch_size", "devices"),
            "--batch-size 64 must be divisible by --devices 3",
        ),
        ({"coordinator": "127.0.0.1:1"}, ("coordinator", "num_processes", "process_id"), "go together"),
        ({"onednn": True, "devices": 2}, ("onednn",), "one device"),
    ],
)
def test_settings_that_contradict_each_other_name_every_field(settings, fields, match):
    with pytest.raises(FitError, match=match) as caught:
        Config(**settings)
    assert caught.value.fields == fields


def test_defaults_are_the_recipe_of_the_data_set(tmp_path):
    digits = Config()
    assert (digits.model, digits.epochs, digits.lr, digits.out) == (
        RECIPES["digits"]["model"],
        RECIPES["digits"]["epochs"],
        RECIPES["digits"]["learning_rate"],
        type(digits.out)("runs/digits-resnet_small"),
    )
    cifar = Config(dataset="cifar10", data_dir=tmp_path)
    assert cifar.epochs == RECIPES["cifar10"]["epochs"] != digits.epochs
    assert Config(lr=0.1, epochs=2).settings()["learning_rate"] == 0.1


def test_every_train_flag_is_a_config_field():
    parser = argparse.ArgumentParser()
    cli._add_train_parser(parser.add_subparsers())
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train_parser._actions if a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(Config)}
    # and the parser's defaults are Config's
    defaults = train_parser.parse_args([])
    assert Config(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(Config)}) == Config()


def test_settings_the_data_refutes_raise_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(FitError, match="--batch-size 5000 exceeds the 1437 training images") as caught:
        fit(Config(**dict(TINY, batch_size=5000), epochs=1, out=out))
    assert caught.value.fields == ("batch_size",)
    assert not out.exists()
    with pytest.raises(TypeError, match="Config"):
        fit({"model": "lenet5"})
    with pytest.raises(TypeError, match="not callable"):
        fit(Config(**TINY, out=out), callbacks=["print"])


def test_verbose_false_prints_nothing(tmp_path, capsys):
    fit(Config(**TINY, epochs=1, out=tmp_path), verbose=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- replacing a run, other data, Ctrl-C ------------------------------------------------------------


def _snapshot(directory):
    """Every entry's name, and each file's bytes and mtime: a directory left untouched compares equal."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir" for p in sorted(directory.iterdir())
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run with a validation split: checkpoint, best, metrics, plots."""
    out = tmp_path_factory.mktemp("finished")
    result = fit(Config(**dict(TINY, val_fraction=0.2), epochs=1, out=out), verbose=False)
    assert set(result.outputs) >= {"checkpoint.safetensors", "best.safetensors", "metrics.json"}
    return out


@pytest.mark.parametrize(
    "argv, code, match",
    [
        (["--batch-size", "5000"], 2, "--batch-size 5000 exceeds the 1437 training images"),
        (["--warmup-epochs", "2", "--epochs", "2"], 2, "--warmup-epochs 2.0 is the whole run"),
        (["--dataset", "mnist", "--data-dir", "{empty}"], 2, "--dataset mnist: "),
        (["--lr", "1e30"], 3, "that --overwrite was to replace is kept as it was"),
    ],
)
def test_a_failed_overwrite_leaves_the_previous_run_byte_identical(finished, tmp_path, capsys, argv, code, match):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    assert cli.main(["train", *TINY_ARGV, "--overwrite", "--out", str(out), *argv]) == code
    assert match in capsys.readouterr().err
    assert _snapshot(out) == before


def test_an_overwrite_that_fails_at_its_first_checkpoint_puts_the_previous_run_back(finished, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    real_save, calls = checkpoint.save, []

    def full_disk(path, tree, metadata=None):
        calls.append(path.name)
        if len(calls) == 2:  # the checkpoint is written, then best.safetensors fails
            raise OSError(28, "No space left on device")
        real_save(path, tree, metadata)

    monkeypatch.setattr(checkpoint, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fit(Config(**dict(TINY, val_fraction=0.2), epochs=1, overwrite=True, out=out), verbose=False)
    assert calls == ["checkpoint.safetensors", "best.safetensors"]
    assert _snapshot(out) == before  # the new checkpoint is gone, the old files back


def test_a_successful_overwrite_leaves_only_the_new_run(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    result = fit(Config(**TINY, epochs=1, overwrite=True, out=out), verbose=False)  # no validation: no best
    assert result.status == Completed(epochs=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(result.outputs)
    assert not (out / "best.safetensors").exists()


def _killed_while_replacing(out, writes: str):
    """A process that opens ``out`` to overwrite it, sets the previous run aside, writes ``writes`` (a
    file name) as the new run would, and is killed (SIGKILL) before it can clean up."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from jaxconv.train import rundir\n"
        "lock = rundir.open_run(sys.argv[1], overwrite=True)\n"
        "lock.set_previous_aside()\n"
        "open(os.path.join(sys.argv[1], sys.argv[2]), 'wb').write(b'the new run')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out), writes],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(rundir.REPLACED_PREFIX)]  # left behind


def test_a_replacement_killed_midway_is_recovered_by_the_next_open(finished, tmp_path):
    import shutil

    # Killed after the previous run was set aside, before the new run's first checkpoint: restored.
    out = tmp_path / "killed-early"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    _killed_while_replacing(out, "best.safetensors")
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        rundir.open_run(out)
    assert {k: v for k, v in _snapshot(out).items() if k != rundir.LOCK_NAME} == before
    # Killed after the new run's first checkpoint: the previous run is gone for good.
    out = tmp_path / "killed-late"
    shutil.copytree(finished, out)
    _killed_while_replacing(out, "checkpoint.safetensors")
    rundir.open_run(out, resume=True).release()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]
    assert (out / "checkpoint.safetensors").read_bytes() == b"the new run"


def test_resume_refuses_other_training_data_naming_what_changed(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    arrays = mnist_dir(data_dir, n_train=128, n_test=16)
    out = tmp_path / "run"
    settings = dict(TINY, dataset="mnist", data_dir=data_dir, out=out)
    fit(Config(**settings, epochs=1), verbose=False)
    recorded = checkpoint.read_metadata(out / "checkpoint.safetensors")["data"]
    assert recorded["images"] == 128 and recorded["shape"] == [28, 28, 1] and len(recorded["sha256"]) == 64

    # One label changed: the images' mean and std are the same, the fingerprint is not.
    labels = arrays["train"][1].copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(data_dir / "train-labels-idx1-ubyte", labels)
    with pytest.raises(FitError, match=r"--resume: .*the same training images \(sha256 '[0-9a-f]{64}' then, "):
        fit(Config(**settings, epochs=2, resume=True), verbose=False)
    # More images: the count is named.
    mnist_dir(data_dir, n_train=192, n_test=16)
    with pytest.raises(FitError, match="images 128 then, 192 now"):
        fit(Config(**settings, epochs=2, resume=True), verbose=False)


def test_ctrl_c_exits_130_with_a_resumable_checkpoint_and_no_traceback(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    out = tmp_path / "run"
    command = [sys.executable, "-m", "jaxconv", "train", *TINY_ARGV, "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--epochs", "100000"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.safetensors").exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            tail = err.replace("\r", "\n")[-3000:]
            raise AssertionError(f"no exit within 120 s of SIGINT; stderr ends:\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == cli.EXIT_INTERRUPTED == 130, err[-2000:]
    assert "python -m jaxconv train: error: interrupted; resume with --resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (out / rundir.LOCK_NAME).exists()
    epoch = checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"]
    resumed = subprocess.run(
        [*command, "--epochs", str(epoch + 1), "--resume"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == epoch + 1
    # Both processes started themselves again with huge pages where that helps (jaxconv.train.hostmem),
    # same process id (the SIGINT above reached the training process), and the run records which.
    expected = hostmem.status(hostmem.environment(env) or env).reason
    assert json.loads((out / "metrics.json").read_text())["host_memory"] == expected


def test_images_smaller_than_the_model_takes_are_a_fit_error_naming_the_model(tmp_path):
    """1x1 MNIST-format images with dd2424_net (which needs 3x3): a FitError naming the model and its
    minimum size before anything is built or trained, not a shape error from inside a convolution."""
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    mnist_dir(data_dir, n_train=64, n_test=8, hw=(1, 1))
    with pytest.raises(FitError, match=r"dd2424_net.*at least 3x3, got 1x1") as caught:
        fit(
            Config(
                model="dd2424_net",
                dataset="mnist",
                data_dir=str(data_dir),
                epochs=1,
                batch_size=8,
                out=str(tmp_path / "run"),
            ),
            verbose=False,
        )
    assert "model" in caught.value.fields
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
