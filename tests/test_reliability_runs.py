"""Runs killed between their writes, resumed; settings that differ on resume or between processes; processes that
cannot start together.  Every case runs the real training loop (or real processes) on real files: a kill is
simulated by putting the run directory into the exact state the kill leaves (the files written up to that point)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from jaxconv.cli import commands as cli
from jaxconv.train import checkpoint
from jaxconv.train.loop import Completed, Config, FitError, fit

from ._runs import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = {"model": "dd2424_net", "batch_size": 64, "seed": 3, "epochs": 2}


def _metrics_epochs(out: pathlib.Path) -> list[int]:
    return [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]


def _epoch_of(path: pathlib.Path) -> int:
    return checkpoint.read_metadata(path)["epoch"]


@pytest.fixture(scope="module")
def epoch_states(tmp_path_factory):
    """The files of one run after epoch 1 and after epoch 2 (each epoch improving on validation)."""
    base = tmp_path_factory.mktemp("states")
    out = base / "run"
    fit(Config(**SETTINGS, out=out, stop_after=1), verbose=False)
    shutil.copytree(out, base / "after1")
    result = fit(Config(**SETTINGS, out=out, resume=True), verbose=False)
    assert result.best is not None and result.best["epoch"] == 2, "epoch 2 must improve for these states"
    shutil.copytree(out, base / "after2")
    return base


def _state(epoch_states: pathlib.Path, dest: pathlib.Path, after: int, keep: dict[str, int]) -> pathlib.Path:
    """A run directory holding, of the outputs, exactly ``keep`` (name -> the epoch whose version it holds)."""
    dest.mkdir()
    for name, epoch in keep.items():
        shutil.copy2(epoch_states / f"after{epoch}" / name, dest / name)
    return dest


def test_kill_in_epoch_1_before_any_output_rerun_and_resume_messages(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".jaxconv.lock").write_text("999999\n")  # what a kill before the first checkpoint leaves
    with pytest.raises(FitError, match="holds no run to resume .*drop --resume"):
        fit(Config(**SETTINGS, out=out, resume=True, stop_after=1), verbose=False)
    assert cli.main(["train", *_flags(SETTINGS), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "drop --resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in ("--" + k.replace("_", "-"), str(v))]


def test_checkpoint_is_written_before_best(epoch_states, tmp_path, monkeypatch):
    """The order of an epoch's writes: checkpoint.safetensors, then best.safetensors, then metrics.json."""
    order = []
    real_write = checkpoint.atomic_write_bytes  # what checkpoint.save and the metrics writer call
    monkeypatch.setattr(
        checkpoint, "atomic_write_bytes", lambda path, d: (order.append(pathlib.Path(path).name), real_write(path, d))
    )
    fit(Config(**SETTINGS, out=tmp_path / "run", stop_after=1), verbose=False)
    assert order[:3] == ["checkpoint.safetensors", "best.safetensors", "metrics.json"]


def test_old_order_kill_leaves_only_best_and_resume_continues_from_it(epoch_states, tmp_path, capsys):
    """A run of an earlier version killed between best.safetensors and checkpoint.safetensors in epoch 1."""
    out = _state(epoch_states, tmp_path / "run", 1, {"best.safetensors": 1})
    with pytest.raises(FitError, match="Continue it with --resume"):
        fit(Config(**SETTINGS, out=out), verbose=False)
    result = fit(Config(**SETTINGS, out=out, resume=True))
    err = capsys.readouterr().err
    assert "resuming from best.safetensors" in err and "checkpoint.safetensors rewritten" in err
    assert isinstance(result.status, Completed) and [h["epoch"] for h in result.history] == [1, 2]
    assert _metrics_epochs(out) == [1, 2] and _epoch_of(out / "checkpoint.safetensors") == 2
    reference = json.loads((epoch_states / "after2" / "metrics.json").read_text())["epochs"]
    got = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [e["train_loss"] for e in got] == [e["train_loss"] for e in reference]  # the same trajectory


@pytest.mark.parametrize(
    "keep, written",
    [
        # epoch 1: killed after the checkpoint, before best.safetensors / metrics.json
        ({"checkpoint.safetensors": 1}, 1),
        ({"checkpoint.safetensors": 1, "best.safetensors": 1}, 1),
        # epoch 2 (the last): killed after the checkpoint, before best.safetensors / metrics.json
        ({"checkpoint.safetensors": 2, "best.safetensors": 1, "metrics.json": 1}, 2),
        ({"checkpoint.safetensors": 2, "best.safetensors": 2, "metrics.json": 1}, 2),
    ],
)
def test_every_prefix_of_an_epochs_writes_resumes_and_repairs(epoch_states, tmp_path, capsys, keep, written):
    out = _state(epoch_states, tmp_path / "run", written, keep)
    with pytest.raises(FitError, match="Continue it with --resume"):
        fit(Config(**SETTINGS, out=out), verbose=False)
    capsys.readouterr()
    result = fit(Config(**SETTINGS, out=out, resume=True))
    err = capsys.readouterr().err
    assert "metrics.json listed" in err and "rewritten from the checkpoint's history" in err
    if written == 2:
        assert "nothing to train" in err
    assert isinstance(result.status, Completed) and [h["epoch"] for h in result.history] == [1, 2]
    assert _metrics_epochs(out) == [1, 2]
    assert _epoch_of(out / "checkpoint.safetensors") == 2 and _epoch_of(out / "best.safetensors") == 2
    # A whole run resumes with no repair.
    fit(Config(**SETTINGS, out=out, resume=True))
    assert "rewritten" not in capsys.readouterr().err


def test_changed_setting_on_resume_names_the_flag_and_both_values(epoch_states, tmp_path, capsys):
    out = _state(epoch_states, tmp_path / "run", 1, {"checkpoint.safetensors": 1, "metrics.json": 1})
    argv = ["train", *_flags(SETTINGS), "--out", str(out), "--resume"]
    assert cli.main([*argv, "--optimizer", "sgd", "--lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--optimizer (the checkpoint's 'adam', now 'sgd')" in err, err
    assert "--lr (the checkpoint's 0.003, now 0.05)" in err, err
    assert cli.main([*argv, "--seed", "4"]) == 2
    assert "--seed (the checkpoint's 3, now 4)" in capsys.readouterr().err


# --- several processes -------------------------------------------------------------------------------------


def _process(tmp_path: pathlib.Path, port: int, process_id: int, *extra: str, count: int = 2) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    argv = ["train", *_flags(SETTINGS), "--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}"]
    argv += ["--num-processes", str(count), "--process-id", str(process_id), *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "jaxconv", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_with_other_settings_both_stop_before_training(tmp_path):
    port = free_port()
    procs = [_process(tmp_path, port, 0, "--init-timeout", "30"), _process(tmp_path, port, 1, "--seed", "4")]
    outputs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 2, err[-3000:]
        assert "started with other settings" in err and "--seed differs (processes 0 vs 1" in err, err[-3000:]
        assert f"process {i} has {3 if i == 0 else 4})" in err
        assert "--init-timeout differs" in err  # the whole Config is compared, not only what training reads
        assert "epoch 1" not in err
    assert not (tmp_path / "run").exists()  # nothing was created: they stop before the run directory


@pytest.mark.parametrize("process_id", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_process_whose_partner_never_starts_stops_within_the_timeout(tmp_path, process_id):
    start = time.monotonic()
    proc = _process(tmp_path, free_port(), process_id, "--init-timeout", "3")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "--init-timeout 3" in err and "within 3 s" in err, err[-3000:]
    assert ("process 1 of --num-processes 2 did not connect" if process_id == 0 else "did not get to process 0") in err
    assert time.monotonic() - start < 60  # jax's own wait would abort the process (SIGABRT) after its timeout
    assert not (tmp_path / "run").exists()


def test_a_coordinator_port_in_use_is_a_clear_error(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        proc = _process(tmp_path, busy.getsockname()[1], 0, "--init-timeout", "3")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "process 0 cannot listen on port" in err and "choose another port" in err, err[-3000:]


@pytest.mark.parametrize("value", [0, -1, 1.5, "5"])
def test_init_timeout_must_be_a_positive_integer(value):
    with pytest.raises(FitError, match=r"`init_timeout` .*--init-timeout") as info:
        Config(init_timeout=value)
    assert info.value.fields == ("init_timeout",)


@pytest.mark.slow  # three real processes and a timeout (~8 s)
def test_when_one_of_three_never_starts_the_two_that_did_both_stop_saying_which(tmp_path):
    port = free_port()
    procs = [_process(tmp_path, port, i, "--init-timeout", "4", count=3) for i in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 2, err[-3000:]
    assert "process 2 of --num-processes 3 did not connect" in outputs[0][1], outputs[0][1][-3000:]
    # Process 1 hears it from process 0, or, if its own --init-timeout ran out first (it started first), says so.
    assert re.search(
        r"process\(es\) 2 of --num-processes 3 did not connect|not all --num-processes 3 processes connected",
        outputs[1][1],
    ), outputs[1][1][-3000:]


@pytest.mark.slow  # real processes (~8 s)
def test_another_num_processes_is_named_at_once(tmp_path):
    port = free_port()
    procs = [_process(tmp_path, port, 0, "--init-timeout", "4"), _process(tmp_path, port, 1, count=3)]
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert "--num-processes 3: process 0 at --coordinator" in err1 and "runs with --num-processes 2" in err1, err1
    assert "process 1 of --num-processes 2 did not connect" in err0, err0[-3000:]


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_and_repair(tmp_path):
    """Two processes train epoch 1 of 2; the state a kill after the checkpoint leaves (no best.safetensors, no
    metrics.json); two processes resume it: both exit 0, process 0 rewrites the two files, metrics list both epochs."""

    def run(*extra: str) -> list[str]:
        port = free_port()
        procs = [_process(tmp_path, port, i, *extra) for i in range(2)]
        outputs = [p.communicate(timeout=400) for p in procs]
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 0, err[-3000:]
        return [err for _, err in outputs]

    run("--stop-after", "1")
    out = tmp_path / "run"
    assert _metrics_epochs(out) == [1] and _epoch_of(out / "best.safetensors") == 1
    (out / "metrics.json").unlink()
    (out / "best.safetensors").unlink()
    errs = run("--resume")
    assert "metrics.json listed no epochs, the checkpoint 1" in errs[0], errs[0][-3000:]
    assert "best.safetensors held epoch None" in errs[0]
    assert _metrics_epochs(out) == [1, 2] and _epoch_of(out / "checkpoint.safetensors") == 2
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("coordinator", ["localhost", "localhost:", ":1234", "localhost:0", "localhost:65536", "h:x"])
def test_a_coordinator_without_a_port_is_refused_when_the_config_is_made(coordinator):
    with pytest.raises(FitError, match=r"`coordinator` .*'HOST:PORT' with a port from 1 to 65535") as info:
        Config(coordinator=coordinator, num_processes=2, process_id=0)
    assert info.value.fields == ("coordinator",)


def test_resume_replaces_a_symlinked_metrics_json_without_reading_or_touching_its_target(epoch_states, tmp_path):
    out = _state(epoch_states, tmp_path / "run", 1, {"checkpoint.safetensors": 1, "best.safetensors": 1})
    victim = tmp_path / "victim.json"
    victim.write_text('{"epochs": []}')
    os.symlink(victim, out / "metrics.json")
    fit(Config(**SETTINGS, out=out, resume=True), verbose=False)
    assert victim.read_text() == '{"epochs": []}'
    assert not (out / "metrics.json").is_symlink() and _metrics_epochs(out) == [1, 2]
