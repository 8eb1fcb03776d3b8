"""A user's run is never lost: ``python -m jaxconv train`` run as a user runs it, in real processes.

Each test is one scenario from the outside: a run directory that already holds
a run, two processes on one directory, a process killed while it holds the
lock, a directory that cannot be written, a run that diverges, the modes of
the files it writes, bad flags, and a checkpoint that is enough on its own to
evaluate the model.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxconv.cli import commands as cli
from jaxconv.train import checkpoint, rundir
from jaxconv.train.inference import load_trained

from ._datasets import mnist_dir, write_idx
from ._runs import TINY

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # these runs test files, not speed
    return env


def _run(*argv, timeout=300, umask=None):
    """``python -m jaxconv ARGV`` in a fresh process: ``CompletedProcess`` with text output."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", "jaxconv", *argv],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


def _start(*argv):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxconv", *argv],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _snapshot(directory: pathlib.Path) -> dict:
    """Every file's bytes and mtime: a directory left untouched compares equal."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()}


def _strict_json(path: pathlib.Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds a bare {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run on the digits, finished, in a fresh process."""
    out = tmp_path_factory.mktemp("run")
    done = _run("train", *TINY, "--epochs", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# --- work is never overwritten by accident ---------------------------------------------


def test_a_directory_holding_a_run_is_refused_and_left_untouched(finished_run):
    before = _snapshot(finished_run)
    done = _run("train", *TINY, "--epochs", "1", "--out", str(finished_run))
    assert done.returncode == 2
    assert str(finished_run) in done.stderr and "already holds a run" in done.stderr
    assert "--resume" in done.stderr and "--overwrite" in done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(finished_run) == before
    assert not (finished_run / rundir.LOCK_NAME).exists()


def test_overwrite_replaces_the_run(finished_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    done = _run("train", *TINY, "--epochs", "1", "--overwrite", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["epoch"] for e in _strict_json(out / "metrics.json")["epochs"]] == [1]
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == 1
    with pytest.raises(rundir.RunDirError, match="exclude each other"):
        rundir.open_run(out, resume=True, overwrite=True)


@pytest.mark.slow  # two real training processes (~11 s); tests/test_reliability_rundir.py keeps the lock's cases fast
def test_a_second_process_on_a_locked_directory_exits_at_once_and_a_killed_holder_is_reported(tmp_path):
    out = tmp_path / "shared"
    first = _start("train", *TINY, "--epochs", "100000", "--out", str(out))
    try:
        lock = out / rundir.LOCK_NAME
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.safetensors").exists():  # the first process is training and holds the lock
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run wrote no checkpoint in 120 s"
            time.sleep(0.2)
        assert lock.read_text().split()[0] == str(first.pid)

        second = _run("train", *TINY, "--epochs", "1", "--resume", "--out", str(out))
        assert second.returncode == 2
        assert f"in use by another training process (pid {first.pid}" in second.stderr
        assert first.poll() is None  # the holder trains on, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # Killed: no chance to release.  Its pid stays in the lock file, its flock is gone with it.
    assert lock.read_text().split()[0] == str(first.pid)
    epoch = checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"]  # the killed run's checkpoint is whole

    third = _run("train", *TINY, "--epochs", str(epoch + 1), "--resume", "--out", str(out))
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"was left by process {first.pid}" in third.stderr and "stale" in third.stderr
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == epoch + 1
    assert not lock.exists()  # released on exit


def test_an_unwritable_directory_is_found_before_training(tmp_path):
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    done = _run("train", *TINY, "--out", str(regular / "run"))
    assert done.returncode == 2 and str(regular / "run") in done.stderr and "cannot create" in done.stderr
    assert "epoch 1" not in done.stderr and "Traceback" not in done.stderr

    done = _run("train", *TINY, "--out", str(regular))
    assert done.returncode == 2 and "exists and is not a directory" in done.stderr


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory no process can write in: a read-only tmpfs (as root), else one without write permission."""
    path = tmp_path / "read-only"
    path.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    if not mounted:
        assert os.geteuid() != 0, "as root a read-only directory needs a read-only mount, and mount failed"
        path.chmod(0o555)
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        else:
            path.chmod(0o755)


def test_a_read_only_directory_is_found_before_training(read_only_directory):
    done = _run("train", *TINY, "--out", str(read_only_directory))
    assert done.returncode == 2
    assert f"cannot write in the run directory {str(read_only_directory)!r}" in done.stderr
    assert "epoch 1" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "umask,mode",
    [
        (0o022, 0o644),
        pytest.param(0o077, 0o600, marks=pytest.mark.slow),
        pytest.param(0o002, 0o664, marks=pytest.mark.slow),
    ],
)
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    done = _run("train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run"), umask=umask)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("checkpoint.safetensors", "metrics.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name


# --- a diverged run stops -----------------------------------------------------------------


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    # At --lr 5 this run's first epoch is finite and its loss overflows in the second.
    out = tmp_path / "diverging"
    done = _run("train", *TINY, "--lr", "5", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    saved = (out / "checkpoint.safetensors").read_bytes()

    done = _run("train", *TINY, "--lr", "5", "--epochs", "20", "--resume", "--out", str(out))
    assert done.returncode == cli.EXIT_DIVERGED
    assert "training diverged at epoch 2, step" in done.stderr and "kept as it was, at epoch 1" in done.stderr
    assert "test accuracy" not in done.stdout
    assert (out / "checkpoint.safetensors").read_bytes() == saved
    record = _strict_json(out / "metrics.json")
    assert [e["epoch"] for e in record["epochs"]] == [1]
    assert record["stopped"]["reason"] == "diverged" and record["stopped"]["epoch"] == 2
    assert record["stopped"]["finite_loss"] is False


def test_a_run_that_diverges_at_once_writes_no_weights_and_says_so(tmp_path):
    out = tmp_path / "lr1e30"
    done = _run("train", *TINY, "--lr", "1e30", "--out", str(out))
    assert done.returncode == cli.EXIT_DIVERGED
    assert "training diverged at epoch 1" in done.stderr and "no checkpoint was written" in done.stderr
    assert "test accuracy" not in done.stdout
    assert not (out / "checkpoint.safetensors").exists()
    stopped = _strict_json(out / "metrics.json")["stopped"]
    assert stopped["epoch"] == 1 and (stopped["loss"] is None or np.isfinite(stopped["loss"]))


def test_metrics_are_strict_json_with_non_finite_values_as_null():
    from jaxconv._core.jsonsafe import strict_json_bytes

    assert strict_json_bytes({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}) == (
        b'{\n "a": null,\n "b": [\n  null,\n  1.5\n ],\n "c": {\n  "d": null\n }\n}\n'
    )


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--seed", str(2**32)], "argument --seed: must be >= 0 and <= 4294967295"),
        (["--seed", "1.5"], "argument --seed: expected an integer"),
        (["--lr", "0"], "argument --lr: must be > 0"),
        (["--lr", "nan"], "argument --lr: must be finite"),
        (["--lr", "inf"], "argument --lr: must be finite"),
        (["--momentum", "1"], "argument --momentum: must be >= 0 and < 1"),
        (["--weight-decay=-1e-4"], "argument --weight-decay: must be >= 0"),
        (["--l2", "-1"], "argument --l2: must be >= 0"),
        (["--epochs", "0"], "argument --epochs: must be >= 1"),
        (["--batch-size", "-3"], "argument --batch-size: must be >= 1"),
        (["--devices", "0"], "argument --devices: must be >= 1"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser_naming_the_flag(tmp_path, capsys, argv, match):
    assert cli.main(["train", "--out", str(tmp_path / "out"), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # rejected before anything was created


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--dataset", "mnist"], "--dataset mnist is read from files: name their directory with --data-dir"),
        (["--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "--data-dir '{tmp}/nowhere' does not exist"),
        (["--devices", "3"], "--batch-size 64 must be divisible by --devices 3"),
    ],
)
def test_bad_combinations_name_the_flags(tmp_path, capsys, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["train", *TINY, "--out", str(tmp_path / "out"), *argv]) == 2
    assert match.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- resume and evaluate from the checkpoint alone -----------------------------------------


def test_resume_rejects_a_checkpoint_without_the_runs_metadata(finished_run, tmp_path, capsys):
    state, meta = _restore(finished_run)
    for drop in ("epoch", "history", "config"):
        out = tmp_path / f"no-{drop}"
        checkpoint.save(out / "checkpoint.safetensors", state, {k: v for k, v in meta.items() if k != drop})
        assert cli.main(["train", *TINY, "--epochs", "3", "--resume", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"metadata '{drop}'" in err or f"no '{drop}'" in err, err


def test_resume_rejects_other_training_images(finished_run, tmp_path, capsys):
    # The checkpoint records the training images' mean/std; resuming on other images would not be the same run.
    out = tmp_path / "other-data"
    state, meta = _restore(finished_run)
    meta["standardization"]["mean"] += 0.25
    checkpoint.save(out / "checkpoint.safetensors", state, meta)
    assert cli.main(["train", *TINY, "--epochs", "3", "--resume", "--out", str(out)]) == 2
    assert "the same training images" in capsys.readouterr().err


def _restore(run):
    apply_fun, params, meta = load_trained(run / "checkpoint.safetensors")
    from jaxconv import train

    optimizer = train.default_optimizer(
        meta["config"]["learning_rate"], meta["config"]["momentum"], meta["config"]["weight_decay"]
    )
    return checkpoint.restore(run / "checkpoint.safetensors", {"params": params, "opt_state": optimizer.init(params)})


def test_the_checkpoint_alone_is_enough_to_evaluate(finished_run):
    meta = checkpoint.read_metadata(finished_run / "checkpoint.safetensors")
    assert meta["model"] == {"name": "dd2424_net", "num_classes": 10, "input_shape": [8, 8, 1], "steps_per_epoch": 22}
    assert set(meta["standardization"]) == {"mean", "std"}
    done = _run("evaluate", str(finished_run / "checkpoint.safetensors"))
    assert done.returncode == 0, done.stderr[-2000:]
    reported = _strict_json(finished_run / "metrics.json")["epochs"][-1]["test_accuracy"]
    assert f"accuracy {reported:.2%}" in done.stdout


def test_evaluate_refuses_a_file_that_is_not_a_training_checkpoint(tmp_path):
    checkpoint.save(tmp_path / "other.safetensors", {"w": np.zeros(3, np.float32)}, {"note": "not from train"})
    done = _run("evaluate", str(tmp_path / "other.safetensors"))
    assert done.returncode == 2 and "not a checkpoint written by `python -m jaxconv train`" in done.stderr


def test_resume_from_a_corrupted_checkpoint_exits_2_naming_the_tensor_and_leaves_the_file(finished_run, tmp_path):
    import shutil

    out = tmp_path / "corrupted"
    shutil.copytree(finished_run, out)
    path = out / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    done = _run("train", *TINY, "--epochs", "3", "--resume", "--out", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{path}: checksum mismatch in tensor" in done.stderr and "Traceback" not in done.stderr
    assert path.read_bytes() == bytes(data)
    done = _run("evaluate", str(path))
    assert done.returncode == 2 and "checksum mismatch in tensor" in done.stderr


@pytest.mark.parametrize("fault", ["constant", "empty-test", "zero-size", "directory"])
def test_bad_data_is_refused_before_training_naming_the_file(tmp_path, fault):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    mnist_dir(data_dir, n_train=64, n_test=8)
    if fault == "constant":
        write_idx(data_dir / "train-images-idx3-ubyte", np.full((64, 28, 28), 7, np.uint8))
        culprit = "train-images-idx3-ubyte"
    elif fault == "empty-test":
        write_idx(data_dir / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
        write_idx(data_dir / "t10k-labels-idx1-ubyte", np.zeros((0,), np.uint8))
        culprit = "t10k-images-idx3-ubyte"
    elif fault == "zero-size":
        write_idx(data_dir / "train-images-idx3-ubyte", np.zeros((64, 0, 0), np.uint8))
        culprit = "train-images-idx3-ubyte"
    else:
        (data_dir / "t10k-labels-idx1-ubyte").unlink()
        (data_dir / "t10k-labels-idx1-ubyte").mkdir()
        culprit = "t10k-labels-idx1-ubyte is a directory"
    out = tmp_path / "run"
    done = _run("train", *TINY, "--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert culprit in done.stderr and "--dataset mnist" in done.stderr and "Traceback" not in done.stderr
    assert "epoch 1" not in done.stderr
    assert not out.exists()  # the run directory it created is gone again: nothing was written


# --- python -m jaxconv verify ----------------------------------------------------------------


def test_verify_prints_a_passing_table_for_the_named_ops():
    done = _run("verify", "--op", "relu", "--op", "flatten")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[0].strip(): line for line in done.stdout.splitlines() if "|" in line}
    assert set(rows) >= {"op", "relu", "flatten"} and rows["relu"].rstrip().endswith("pass")
    assert done.stdout.strip().endswith("all passed")


def test_verify_fails_on_a_planted_wrong_rule_and_rejects_unknown_ops(monkeypatch, capsys):
    import sys

    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def bad_relu(x):
        return jnp.maximum(x, 0)

    bad_relu.defvjp(lambda x: (jnp.maximum(x, 0), x), lambda x, g: (g * (x > 0) * (1 + 1e-9),))
    monkeypatch.setattr(sys.modules["jaxconv.ops.layers"], "relu", bad_relu)
    assert cli.main(["verify", "--op", "relu"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "relu" in captured.err
    assert cli.main(["verify", "--op", "conv9d"]) == 2
    assert "unknown op(s) ['conv9d']" in capsys.readouterr().err
