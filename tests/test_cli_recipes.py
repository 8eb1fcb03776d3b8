"""The command line's recipes, flags, evaluate and predict, on realistic check data in the real file formats."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxconv import train
from jaxconv.cli import commands as cli
from jaxconv.train import checkpoint, data, synthetic
from jaxconv.train.inference import load_trained

from ._runs import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--model", "dd2424_net", "--batch-size", "64", "--seed", "3"]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return synthetic.write_mnist_like(tmp_path_factory.mktemp("mnist"), num_train=3000, num_test=500)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return synthetic.write_cifar_like(tmp_path_factory.mktemp("cifar"), num_train=5000, num_test=500)


def _cli(*argv, timeout=600):
    """``python -m jaxconv ARGV`` in a fresh process with XLA's default flags (the suite's turn
    optimisation off, which makes training conv nets several times slower)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    done = subprocess.run(
        [sys.executable, "-m", "jaxconv", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _metrics(out):
    return json.loads((pathlib.Path(out) / "metrics.json").read_text())


# --- check data ------------------------------------------------------------------------


def test_check_data_loads_through_the_real_loaders(tmp_path, mnist_dir, cifar_dir):
    mnist = data.load_dataset("mnist", mnist_dir)
    assert mnist.train_images.shape == (3000, 28, 28, 1) and mnist.test_images.shape == (500, 28, 28, 1)
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    cifar = data.load_dataset("cifar10", cifar_dir)
    assert cifar.train_images.shape == (5000, 32, 32, 3) and cifar.test_images.shape == (500, 32, 32, 3)
    # Deterministic in the seed, and gzip-compressed IDX loads the same.
    again = data.load_dataset(
        "mnist", synthetic.write_mnist_like(tmp_path / "gz", num_train=3000, num_test=500, compress=True)
    )
    np.testing.assert_array_equal(again.train_images, mnist.train_images)
    other = data.load_dataset(
        "mnist", synthetic.write_mnist_like(tmp_path / "s1", num_train=3000, num_test=500, seed=1)
    )
    assert not np.array_equal(other.train_images, mnist.train_images)


def test_synth_command_writes_what_the_loaders_read(tmp_path, capsys):
    assert cli.main(["synth", "mnist", str(tmp_path / "m"), "--num-train", "50", "--num-test", "20"]) == 0
    assert "wrote 50 train and 20 test" in capsys.readouterr().out
    assert data.load_dataset("mnist", tmp_path / "m").train_images.shape == (50, 28, 28, 1)
    assert cli.main(["synth", "cifar10", str(tmp_path / "c"), "--num-train", "10", "--num-test", "4"]) == 0
    assert data.load_dataset("cifar10", tmp_path / "c").test_images.shape == (4, 32, 32, 3)
    (tmp_path / "file").write_text("x")
    assert cli.main(["synth", "mnist", str(tmp_path / "file" / "sub")]) == 2


# --- the defaults learn on each format -----------------------------------------------------


# Both runs (~20 s for mnist, ~60 s for cifar10, whose first epoch leaves chance by a thin margin) run with
# -m slow, beside the full recipes; the fast suite trains on the digits (tests/test_fit.py, test_cli_train.py).
@pytest.mark.parametrize(
    "dataset", [pytest.param("mnist", marks=pytest.mark.slow), pytest.param("cifar10", marks=pytest.mark.slow)]
)
def test_the_default_recipe_leaves_chance_in_the_first_epoch(dataset, mnist_dir, cifar_dir, tmp_path):
    """The default model and flags (only --epochs shortened) on 28x28 grey and 32x32 colour images."""
    directory = mnist_dir if dataset == "mnist" else cifar_dir
    _cli("train", "--dataset", dataset, "--data-dir", str(directory), "--epochs", "1", "--out", str(tmp_path))
    record = _metrics(tmp_path)
    assert record["config"]["model"] == "resnet_small" and record["config"]["optimizer"] == "adam"
    (first,) = record["epochs"]
    # Left chance: above 0.1 by five standard deviations of a chance-level classifier's accuracy on the
    # validation images (thresholds 0.19 on mnist, 0.17 on cifar10); the slow test runs the whole recipe.
    n_val = round(0.1 * (3000 if dataset == "mnist" else 5000))
    assert first["val_accuracy"] > 0.1 + 5 * (0.1 * 0.9 / n_val) ** 0.5, first
    assert first["test_accuracy"] > 0.1 + 5 * (0.1 * 0.9 / 500) ** 0.5, first


@pytest.mark.slow
@pytest.mark.parametrize("dataset, num_train", [("mnist", 4000), ("cifar10", 5000)])
def test_the_default_recipe_reaches_97_percent(dataset, num_train, tmp_path):
    """The full defaults, as a user runs them: >= 97% test accuracy on a few thousand images."""
    write = synthetic.write_mnist_like if dataset == "mnist" else synthetic.write_cifar_like
    directory = write(tmp_path / "data", num_train=num_train, num_test=1000)
    done = _cli("train", "--dataset", dataset, "--data-dir", str(directory), "--out", str(tmp_path / "run"))
    print(done.stdout[-500:])
    record = _metrics(tmp_path / "run")
    n_val = round(0.1 * num_train)  # left chance by five standard deviations (measured 0.76 and 0.17)
    assert record["epochs"][0]["val_accuracy"] > 0.1 + 5 * (0.1 * 0.9 / n_val) ** 0.5
    assert record["epochs"][-1]["test_accuracy"] >= 0.97, record["epochs"][-1]


# --- flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, schedule", [("sgd", "step"), ("momentum", "constant"), ("adam", "cosine"), ("adamw", "cosine")]
)
def test_every_optimizer_and_schedule_trains(optimizer, schedule, tmp_path):
    lr = {"sgd": "0.1", "momentum": "0.05", "adam": "0.003", "adamw": "0.003"}[optimizer]
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--optimizer",
                optimizer,
                "--schedule",
                schedule,
                "--lr",
                lr,
                "--warmup-epochs",
                "0.5",
                "--epochs",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    record = _metrics(tmp_path)
    assert record["config"]["optimizer"] == optimizer and record["config"]["schedule"] == schedule
    losses = [e["train_loss"] for e in record["epochs"]]
    assert losses[-1] < losses[0] and record["epochs"][-1]["test_accuracy"] > 0.8
    # The checkpoint restores into the optimizer its settings describe (evaluate rebuilds it).
    _, params, meta = load_trained(tmp_path)
    assert meta["config"]["optimizer"] == optimizer


def test_validation_split_and_the_best_checkpoint(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--epochs", "3", "--val-fraction", "0.2", "--out", str(tmp_path)]) == 0
    record = _metrics(tmp_path)
    best = record["best"]
    epochs = record["epochs"]
    assert all("val_accuracy" in e for e in epochs)
    top = max(epochs, key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert best["epoch"] == top["epoch"] and best["val_accuracy"] == top["val_accuracy"]
    assert checkpoint.read_metadata(tmp_path / "best.safetensors")["epoch"] == best["epoch"]
    assert "1150 train / 287 validation / 360 test" in capsys.readouterr().out  # round(0.2 * 1437) held out
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path), "--best", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == best["test_accuracy"]
    # --val-fraction 0: every training image is trained on, no best checkpoint.
    assert cli.main(["train", *TINY, "--epochs", "1", "--val-fraction", "0", "--out", str(tmp_path / "all")]) == 0
    assert not (tmp_path / "all" / "best.safetensors").exists() and _metrics(tmp_path / "all")["best"] is None
    assert cli.main(["evaluate", str(tmp_path / "all"), "--best"]) == 2
    assert "--val-fraction 0" in capsys.readouterr().err


def _leaves(path):
    _, params, meta = load_trained(path)
    return jax.tree.leaves(params), meta


def test_stop_and_resume_with_augmentation_and_a_schedule_is_exact(tmp_path, capsys):
    """--augment draws from (seed, step) inside the step: a run stopped and resumed equals one that was not."""
    flags = [*TINY, "--augment", "--schedule", "cosine", "--warmup-epochs", "1", "--epochs", "3"]
    assert cli.main(["train", *flags, "--out", str(tmp_path / "straight")]) == 0
    assert cli.main(["train", *flags, "--stop-after", "1", "--out", str(tmp_path / "split")]) == 0
    assert "continue with --resume" in capsys.readouterr().err
    assert checkpoint.read_metadata(tmp_path / "split" / "checkpoint.safetensors")["epoch"] == 1
    assert cli.main(["train", *flags, "--resume", "--out", str(tmp_path / "split")]) == 0
    straight, _ = _leaves(tmp_path / "straight")
    split, meta = _leaves(tmp_path / "split")
    for a, b in zip(straight, split):
        np.testing.assert_array_equal(a, b)
    assert meta["config"]["augment"] is True
    # Augmentation changes the trajectory (it is not silently off), and a scheduled run
    # refuses to resume with another length (the schedule spans the run).
    assert cli.main(["train", *flags[:-1], "4", "--resume", "--out", str(tmp_path / "split")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--no-augment",
                "--schedule",
                "cosine",
                "--warmup-epochs",
                "1",
                "--epochs",
                "3",
                "--out",
                str(tmp_path / "plain"),
            ]
        )
        == 0
    )
    plain, _ = _leaves(tmp_path / "plain")
    assert not all(np.array_equal(a, b) for a, b in zip(plain, straight))


# ~16 s: with -m slow; bit-exact resume stays in the fast suite through tests/test_cli_train.py and test_fit.py.
@pytest.mark.slow
def test_a_bn_model_resumes_bit_identically_with_its_running_statistics(tmp_path):
    flags = ["--model", "resnet_small", "--batch-size", "128", "--epochs", "2"]
    assert cli.main(["train", *flags, "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *flags, "--stop-after", "1", "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["train", *flags, "--resume", "--out", str(tmp_path / "b")]) == 0
    names = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(load_trained(tmp_path / "a")[1])[0]
    ]
    assert any("batch_stats" in n for n in names)
    for a, b in zip(_leaves(tmp_path / "a")[0], _leaves(tmp_path / "b")[0]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--warmup-epochs", "3", "--epochs", "3"], "warmup"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--schedule", "linear"], "invalid choice"),
        (["--val-fraction", "1"], "val-fraction"),
        (["--coordinator", "127.0.0.1:1234"], "go together"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "less than"),
    ],
)
def test_bad_flags_exit_2_naming_them(argv, match, tmp_path, capsys):
    assert cli.main(["train", *TINY, *argv, "--out", str(tmp_path / "out")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- evaluate and predict -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_evaluate_a_run_directory(digits_run, capsys):
    capsys.readouterr()
    assert cli.main(["evaluate", str(digits_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    matrix = np.asarray(result["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 360 == result["images"]
    assert np.trace(matrix) / 360 == pytest.approx(result["accuracy"])
    assert result["accuracy"] == _metrics(digits_run)["epochs"][-1]["test_accuracy"]
    png = pathlib.Path(result["confusion_png"])
    assert png == digits_run / "confusion-test.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["evaluate", str(digits_run), "--split", "train", "--confusion", str(digits_run / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "train, 1437 images" in text and (digits_run / "c.png").exists()
    assert cli.main(["evaluate", str(digits_run / "nothing-here")]) == 2
    assert cli.main(["evaluate", str(digits_run), "--dataset", "mnist"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_predict_png_and_npy_agree_with_evaluate(digits_run, tmp_path, capsys):
    import matplotlib.image

    dataset = data.load_digits()
    paths = []
    for i in range(6):
        if i % 2:
            path = tmp_path / f"d{i}.npy"
            np.save(path, dataset.test_images[i])
        else:
            path = tmp_path / f"d{i}.png"
            matplotlib.image.imsave(path, dataset.test_images[i][..., 0], cmap="gray", vmin=0, vmax=1)
        paths.append(str(path))
    capsys.readouterr()
    assert cli.main(["predict", str(digits_run), *paths, "--top-k", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    apply_fun, params, meta = load_trained(digits_run)
    stats = meta["standardization"]
    (x,) = train.standardize(dataset.test_images[:6], stats=(stats["mean"], stats["std"]))
    expected = np.argmax(np.asarray(apply_fun(params, x)), axis=-1)
    assert [r["image"] for r in results] == paths
    for r, label in zip(results, expected):
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["top"][0]["class"] == label
    assert cli.main(["predict", str(digits_run), paths[1]]) == 0
    assert capsys.readouterr().out.startswith(f"{paths[1]}: {expected[1]} (")
    np.save(tmp_path / "big.npy", np.zeros((28, 28), np.float32))
    assert cli.main(["predict", str(digits_run), str(tmp_path / "big.npy")]) == 2
    assert "8x8" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hi")
    assert cli.main(["predict", str(digits_run), str(tmp_path / "x.txt")]) == 2


# --- help, version, extras ------------------------------------------------------------------


def test_help_shows_every_default_and_the_version(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for name in train.RECIPES:
        assert name in text
    for key in ("learning_rate", "optimizer", "schedule", "epochs", "val_fraction", "augment"):
        assert key in text
    assert "(default: 0)" in text  # --seed
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jaxconv {__import__('jaxconv').__version__}"
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "predict" in top and "evaluate" in top and "\x1b" not in top


def test_train_without_the_train_extra_says_what_to_install():
    blocker = (
        "import sys\n"
        "sys.modules['tqdm'] = sys.modules['sklearn'] = None  # as if not installed: importing fails\n"
        "from jaxconv import cli\n"
        "sys.exit(cli.main(['train', '--epochs', '1']))\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'jaxconv[train]'" in done.stderr and "tqdm" in done.stderr and "Traceback" not in done.stderr


# --- two processes ------------------------------------------------------------------------------


# ~25 s of two real processes: with -m slow; tests/test_reliability_runs.py keeps real two-process runs fast.
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """2 local processes on jax.distributed (CPU, gloo) train the same parameters as one process.

    Both runs see the same global batches; the two-process run sums each
    gradient's two halves across processes, the one-process run in one
    reduction, so the float32 results differ by reassociation only: a few ulps
    per step, grown through the steps of an epoch of Adam to far below 1e-4
    relative.  Checkpoints are written once, by process 0.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    flags = ["train", "--model", "lenet5", "--batch-size", "64", "--epochs", "1", "--val-fraction", "0"]
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxconv",
                *flags,
                "--out",
                str(tmp_path / "multi"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "in 2 processes" in outputs[0][0]
    single = subprocess.run(
        [sys.executable, "-m", "jaxconv", *flags, "--out", str(tmp_path / "single")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi, meta = _leaves(tmp_path / "multi")
    one, _ = _leaves(tmp_path / "single")
    for a, b in zip(multi, one):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert _metrics(tmp_path / "multi")["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if not p.name.startswith(".")) == [
        "checkpoint.safetensors",
        "curves.png",
        "filters.png",
        "metrics.json",
    ]
