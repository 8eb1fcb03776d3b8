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
    rundir,
)
from jaxconv.train.inference import load_trained

# The smallest model and big batches: a digits epoch takes well under a second.
TINY = {"model": "dd2424_net", "batch_size": 64, "optimizer": "momentum", "lr": 0.05, "schedule": "constant",
        "val_fraction": 0.0, "seed": 3}


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
    assert set(lenet.outputs) == {"checkpoint.safetensors", "best.safetensors", "metrics.json", "curves.png",
                                  "filters.png"}
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


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", float("nan")), ("batch_size", 0), ("epochs", True), ("seed", 2**32), ("momentum", 1.0),
    ("val_fraction", 1.0), ("model", "vgg16"), ("dataset", "imagenet"), ("optimizer", "rmsprop"),
    ("schedule", "linear"), ("augment", "yes"), ("devices", 0), ("stop_after", 0), ("out", 3),
])
def test_a_bad_setting_raises_fit_error_naming_the_field_and_value(field, value):
    with pytest.raises(FitError) as caught:
        Config(**{field: value})
    assert isinstance(caught.value, ValueError)
    assert f"`{field}` (={value!r})" in str(caught.value) and caught.value.fields == (field,)


@pytest.mark.parametrize("settings, fields, match", [
    ({"resume": True, "overwrite": True}, ("resume", "overwrite"), "exclude each other"),
    ({"epochs": 3, "warmup_epochs": 3.0}, ("warmup_epochs", "epochs"), "--warmup-epochs 3.0 is the whole run"),
    ({"dataset": "mnist"}, ("dataset", "data_dir"), "--dataset mnist is read from files"),
    ({"batch_size": 64, "devices": 3}, ("batch_size", "devices"), "--batch-size 64 must be divisible by --devices 3"),
    ({"coordinator": "127.0.0.1:1"}, ("coordinator", "num_processes", "process_id"), "go together"),
    ({"onednn": True, "devices": 2}, ("onednn",), "one device"),
])
def test_settings_that_contradict_each_other_name_every_field(settings, fields, match):
    with pytest.raises(FitError, match=match) as caught:
        Config(**settings)
    assert caught.value.fields == fields


def test_defaults_are_the_recipe_of_the_data_set(tmp_path):
    digits = Config()
    assert (digits.model, digits.epochs, digits.lr, digits.out) == (
        RECIPES["digits"]["model"], RECIPES["digits"]["epochs"], RECIPES["digits"]["learning_rate"],
        type(digits.out)("runs/digits-resnet_small"))
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
