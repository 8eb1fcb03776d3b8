"""``python -m jaxconv train``, in process: outputs, resume == uninterrupted, 4 devices == 1, --check-grads, errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import train
from jaxconv.cli import commands as cli
from jaxconv.nn import models
from jaxconv.train import checkpoint

from ._datasets import cifar_dir, mnist_dir
from ._runs import TINY


def _train(out, *extra):
    return cli.main(["train", *TINY, "--out", str(out), *extra])


def _params(out):
    init, _ = models.dd2424_net(10)
    _, params = train.init_params(init, (-1, 8, 8, 1))
    optimizer = train.default_optimizer()
    template = {"params": params, "opt_state": optimizer.init(params)}
    return checkpoint.restore(pathlib.Path(out) / "checkpoint.safetensors", template)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """An uninterrupted 2-epoch run on the digits."""
    out = tmp_path_factory.mktemp("straight")
    assert _train(out, "--epochs", "2") == 0
    return out


def test_a_run_leaves_metrics_plots_and_a_checkpoint(two_epochs):
    record = json.loads((two_epochs / "metrics.json").read_text())
    assert record["jax_version"] == jax.__version__ and record["device"] == jax.devices()[0].device_kind
    assert record["config"]["model"] == "dd2424_net" and record["config"]["batch_size"] == 64
    epochs = record["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert set(e) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "images_per_second"}
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]  # it learns
    assert epochs[1]["test_accuracy"] > 0.5
    for png in ("curves.png", "filters.png"):
        assert (two_epochs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, meta = _params(two_epochs)
    assert meta["epoch"] == 2 and meta["history"] == epochs
    assert os.listdir(two_epochs) and not [p for p in os.listdir(two_epochs) if ".tmp-" in p]


def test_final_line_and_the_checkpoint_reproduce_the_test_accuracy(two_epochs, tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    accuracy = json.loads((tmp_path / "metrics.json").read_text())["epochs"][-1]["test_accuracy"]
    assert last.startswith(f"test accuracy {accuracy:.2%} after 1 epochs") and str(tmp_path) in last
    state, _ = _params(tmp_path)
    dataset = jaxconv.train.data.load_digits()
    _, x_test = train.standardize(dataset.train_images, dataset.test_images)
    result = train.evaluate(models.dd2424_net(10)[1], state["params"], x_test, dataset.test_labels)
    assert result["accuracy"] == accuracy


def test_resume_reaches_the_uninterrupted_parameters(two_epochs, tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1") == 0
    first = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    capsys.readouterr()
    assert _train(tmp_path, "--epochs", "2", "--resume") == 0
    captured = capsys.readouterr()
    assert "resuming after epoch 1" in captured.out
    assert "epoch 2/2" in captured.err and "epoch 1/2" not in captured.err  # only the second epoch ran
    resumed, meta = _params(tmp_path)
    straight, straight_meta = _params(two_epochs)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)  # bit for bit: same batches, same momentum, same programs
    assert meta["history"][1]["train_loss"] == straight_meta["history"][1]["train_loss"]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2] and record["epochs"][0] == first[0]


def test_four_devices_equal_one(two_epochs, tmp_path):
    assert jax.device_count() >= 4
    assert _train(tmp_path, "--epochs", "2", "--devices", "4") == 0
    sharded, _ = _params(tmp_path)
    single, _ = _params(two_epochs)
    for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(single["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["num_devices"] == 4


def test_onednn_equals_the_planners_forms(two_epochs, tmp_path, capsys):
    """--onednn trains the same run through oneDNN's float32 kernels (custom calls): the parameters agree."""
    assert _train(tmp_path, "--epochs", "2", "--onednn") == 0
    ours, _ = _params(tmp_path)
    planned, _ = _params(two_epochs)
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(planned["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert _train(tmp_path / "sharded", "--epochs", "1", "--onednn", "--devices", "2") == 2
    assert "--onednn runs its kernels as custom calls without a sharding rule, on one device" in capsys.readouterr().err


def test_check_grads_passes_on_the_hand_rules(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "1", "--l2", "1e-3", "--check-grads") == 0
    out = capsys.readouterr().out
    for rule in ("conv2d", "relu", "flatten", "linear", "softmax_cross_entropy", "l2_penalty", "objective"):
        assert f"  {rule} " in out
    assert "--check-grads: all rules agree" in out


def test_check_grads_fails_on_a_planted_wrong_rule(tmp_path, monkeypatch, capsys):
    @jax.custom_vjp
    def bad_relu(x):
        return jnp.maximum(x, 0)

    # Off by 1% on the positive side: a plausible slip, invisible in the forward pass.
    bad_relu.defvjp(lambda x: (bad_relu(x), x), lambda x, g: (g * (x > 0) * 1.01,))
    monkeypatch.setattr(jaxconv.ops, "relu", bad_relu)
    assert _train(tmp_path, "--epochs", "1", "--check-grads") == 1
    captured = capsys.readouterr()
    assert "--check-grads: FAILED" in captured.out and "not training" in captured.err
    assert "check_vjp(relu" in captured.out or "check_vjp: relu" in captured.out
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_mnist_and_cifar_directories(tmp_path, capsys):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    mnist_dir(mnist, n_train=128, n_test=16, gz=True)
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(mnist),
                *TINY,
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["config"]["dataset"] == "fashion-mnist"
    cifar_dir(tmp_path / "cifar", per_file=26)
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path / "cifar"),
                *TINY,
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert "test accuracy" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], r"--dataset cifar10: .*data_batch_1.bin"),
        (
            ["--dataset", "mnist", "--data-dir", "{tmp}/corrupt"],
            r"--dataset mnist: .*train-labels-idx1-ubyte: .*truncated",
        ),
        (["--devices", "64"], r"--devices 64: `num_devices` \(=64\)"),
        (["--batch-size", "5000"], r"--batch-size 5000 exceeds the 1437 training images"),
        (["--resume"], r"--resume: .*out holds no run to resume \(no checkpoint.safetensors\): drop --resume"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(tmp_path, capsys, argv, match):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    mnist_dir(corrupt)
    labels = corrupt / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "out"), *argv]) == 2
    assert _search(match, capsys.readouterr().err)
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_resume_refuses_other_hyperparameters(two_epochs, tmp_path, capsys):
    import shutil

    shutil.copy(two_epochs / "checkpoint.safetensors", tmp_path / "checkpoint.safetensors")
    assert cli.main(["train", *TINY, "--lr", "0.1", "--epochs", "3", "--resume", "--out", str(tmp_path)]) == 2
    assert _search(r"--lr \(the checkpoint's 0.05, now 0.1\)", capsys.readouterr().err)
    assert cli.main(["train", *TINY, "--model", "lenet5", "--epochs", "3", "--resume", "--out", str(tmp_path)]) == 2
    assert _search(r"--model \(the checkpoint's 'dd2424_net', now 'lenet5'\)", capsys.readouterr().err)


def _search(pattern, text):
    import re

    if not re.search(pattern, text):
        raise AssertionError(f"{pattern!r} not in:\n{text}")
    return True


@pytest.mark.slow
def test_the_readme_command_reaches_97_percent_in_under_two_minutes(tmp_path):
    """``python -m jaxconv train`` as a user runs it: fresh process, XLA's default flags, the defaults."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    done = subprocess.run(
        [sys.executable, "-m", "jaxconv", "train", "--out", str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "it/s" in done.stderr or "batch/s" in done.stderr  # the progress bar
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["model"] == train.DEFAULTS["model"] and record["config"]["dataset"] == "digits"
    final = record["epochs"][-1]
    print(done.stdout.strip().splitlines()[-1])
    assert final["epoch"] == train.DEFAULTS["epochs"] and final["test_accuracy"] >= 0.97
    assert sum(e["seconds"] for e in record["epochs"]) < 120
    for name in ("curves.png", "filters.png", "checkpoint.safetensors"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_filter_grid_for_any_input_channels(tmp_path, channels):
    kernel = np.random.default_rng(0).normal(size=(5, 5, channels, 7))
    path = jaxconv.train.plots.plot_filters(kernel, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert jaxconv.train.plots.first_conv_kernel([{"b": np.zeros(7), "w": kernel}, {"w": np.zeros((3, 2))}]) is not None


def test_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"`kernel` must be HWIO"):
        jaxconv.train.plots.plot_filters(np.zeros((3, 3, 1)), tmp_path / "f.png")
    with pytest.raises(ValueError, match=r"`history` is empty"):
        jaxconv.train.plots.plot_curves([], tmp_path / "c.png")
