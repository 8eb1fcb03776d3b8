"""A process of a two-process run killed mid-training (issue 22, item 9): every surviving process stops within
seconds with one message naming the lost process and the checkpoint (exit code 2), never with jax's abort
(SIGABRT), a traceback or a wait of its heartbeat timeout; the checkpoint stays whole and the run resumes.
Real processes (``python -m jaxconv train``) on 127.0.0.1, killed with SIGKILL."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from jaxconv.train import checkpoint

from ._runs import ROOT, TINY, free_port

#: What a process must never print when it stops: a Python traceback, jax's C++ abort and its stack trace.
NEVER = ("Traceback", "Fatal Python error", "Check failure", "Terminating process", "core dumped")


def _start(tmp_path: pathlib.Path, port: int, process_id: int, *extra: str) -> tuple[subprocess.Popen, pathlib.Path]:
    """``python -m jaxconv train`` as process ``process_id`` of 2; its stderr goes to a file (read at the end)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    argv = ["train", *TINY, "--epochs", "40", "--out", str(tmp_path / "run")]
    argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id), *extra]
    err = tmp_path / f"stderr-{process_id}-{time.monotonic_ns()}.txt"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxconv", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f
        )
    return proc, err


def _kill_after_first_checkpoint(tmp_path: pathlib.Path, victim: int) -> tuple[subprocess.Popen, str, float]:
    """Start two processes, SIGKILL process ``victim`` once the run's first checkpoint exists;
    ``(the survivor, its stderr, seconds from the kill to its end)``."""
    port = free_port()
    started = [_start(tmp_path, port, i) for i in range(2)]
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    deadline = time.monotonic() + 240
    try:
        while not ckpt.exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p, _ in started):
                pytest.fail("no checkpoint: " + " | ".join(e.read_text()[-2000:] for _, e in started))
            time.sleep(0.05)
        started[victim][0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor, err = started[1 - victim]
        survivor.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p, _ in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    return survivor, err.read_text(), took


def test_process_0_killed_mid_training_process_1_stops_with_exit_2_naming_it(tmp_path):
    """jax aborts process 1 within milliseconds when process 0 (its coordination service) dies; what the user
    sees is one message and exit code 2."""
    survivor, err, took = _kill_after_first_checkpoint(tmp_path, victim=0)
    assert survivor.returncode == 2, (survivor.returncode, err[-3000:])
    assert "process 0 of 2 was lost" in err and "process 1 stops" in err, err[-3000:]
    # Process 1 names the checkpoint it knows process 0 wrote (or says it had heard of none: killed just after it).
    assert re.search(r"(epoch \d+ or later\), is intact|none had been written).* with --resume", err), err[-3000:]
    assert not [word for word in NEVER if word in err], err[-3000:]
    assert took < 15, took
    assert checkpoint.read_metadata(tmp_path / "run" / "checkpoint.safetensors")["epoch"] >= 1


@pytest.mark.slow  # two runs of two real processes (~30 s)
def test_process_1_killed_mid_training_process_0_stops_the_checkpoint_is_whole_and_the_run_resumes(tmp_path):
    survivor, err, took = _kill_after_first_checkpoint(tmp_path, victim=1)
    assert survivor.returncode == 2, (survivor.returncode, err[-3000:])  # not -6 (SIGABRT), not 1 (a traceback)
    assert "process 1 of 2 was lost (its connection closed)" in err and "process 0 stops" in err, err[-3000:]
    out = tmp_path / "run"
    epoch = checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"]  # reads and verifies every tensor
    assert f"The last checkpoint {out / 'checkpoint.safetensors'} (epoch {epoch}) is intact" in err, err[-3000:]
    assert not [word for word in NEVER if word in err], err[-3000:]
    assert took < 15, took  # jax's heartbeat timeout is 100 s
    assert not (out / ".jaxconv.lock").exists()  # released, not left for the next run to call stale
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no write was cut short

    port = free_port()
    resumed = [_start(tmp_path, port, i, "--resume", "--stop-after", "1") for i in range(2)]
    for p, err_path in resumed:
        p.wait(timeout=300)
        assert p.returncode == 0, err_path.read_text()[-3000:]
    assert "note: " not in resumed[0][1].read_text()  # nothing to repair: the kill left a whole run
    assert checkpoint.read_metadata(out / "checkpoint.safetensors")["epoch"] == epoch + 1


@pytest.mark.slow  # two real processes (~15 s)
def test_the_training_child_of_process_1_killed_like_the_oom_killer_does_process_0_names_process_1(tmp_path):
    """``python -m jaxconv train`` supervises the process that trains; the kernel's OOM killer kills that one.
    Its supervisor dies the same way (SIGKILL), and process 0 reports process 1 lost."""
    port = free_port()
    started = [_start(tmp_path, port, i) for i in range(2)]
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        supervisor = started[1][0]
        children = pathlib.Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children").read_text().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGKILL)
        supervisor.wait(timeout=60)
        assert supervisor.returncode == -signal.SIGKILL  # dies as its child died: nothing it could explain
        survivor, err_path = started[0]
        survivor.wait(timeout=60)
    finally:
        for p, _ in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = err_path.read_text()
    assert survivor.returncode == 2, err[-3000:]
    assert "process 1 of 2 was lost" in err and "is intact" in err, err[-3000:]
    assert not [word for word in NEVER if word in err], err[-3000:]
