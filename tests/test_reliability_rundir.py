"""Run directories on real files: planted symbolic links are refused, never followed; a replaced directory is seen."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from jaxconv.train import rundir

VICTIM = b"a user's precious file\n" * 10


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM)
    return path


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / rundir.LOCK_NAME)
    with pytest.raises(rundir.RunDirError, match="is a symbolic link; it is not followed"):
        rundir.open_run(run)
    assert victim.read_bytes() == VICTIM
    assert os.path.islink(run / rundir.LOCK_NAME)  # left for the user to look at


def test_a_dangling_symlinked_lock_file_creates_nothing_at_its_target(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere" / "created"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(target, run / rundir.LOCK_NAME)
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        rundir.open_run(run)
    assert not target.exists()


def test_a_fifo_at_the_lock_name_is_refused_without_blocking(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / rundir.LOCK_NAME)
    start = time.monotonic()
    with pytest.raises(rundir.RunDirError, match="not a regular file"):
        rundir.open_run(run)
    assert time.monotonic() - start < 5


def test_the_cli_refuses_a_symlinked_lock_and_keeps_the_victim(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / rundir.LOCK_NAME)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "jaxconv", "train", "--out", str(run), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "symbolic link" in done.stderr and "Traceback" not in done.stderr
    assert victim.read_bytes() == VICTIM


def test_a_dangling_symlink_as_the_run_directory_gets_a_clear_message(tmp_path):
    link = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(rundir.RunDirError, match="dangling link"):
        rundir.open_run(link)
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_to_a_directory_as_the_run_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "out")
    with pytest.raises(rundir.RunDirError, match="name the directory itself"):
        rundir.open_run(tmp_path / "out")
    assert list(real.iterdir()) == []


def test_overwrite_removes_a_symlinked_output_not_its_target(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "metrics.json")
    with rundir.open_run(run, overwrite=True) as lock:
        assert os.path.islink(run / "metrics.json")  # kept until the new run writes (a failed start restores it)
        lock.set_previous_aside()  # the new run's first write: the link itself moves aside
        assert not os.path.lexists(run / "metrics.json")
        lock.discard_previous()  # the new run's first checkpoint: the old run is gone, the link's target is not
    assert victim.read_bytes() == VICTIM


def test_check_passes_while_the_directory_stays(tmp_path):
    with rundir.open_run(tmp_path / "run") as lock:
        lock.check()
        (tmp_path / "run" / "metrics.json").write_text("{}")
        lock.check()


def test_check_fails_once_the_directory_is_renamed_and_made_again(tmp_path):
    run = tmp_path / "run"
    lock = rundir.open_run(run)
    try:
        os.rename(run, tmp_path / "moved")
        with pytest.raises(rundir.RunDirError, match="removed or renamed"):
            lock.check()
        run.mkdir()
        with pytest.raises(rundir.RunDirError, match="replaced by another directory"):
            lock.check()
    finally:
        lock.release()
    # release unlinked the lock file of the directory it locked (now "moved"), and nothing in the new one
    assert not (tmp_path / "moved" / rundir.LOCK_NAME).exists()
    assert list(run.iterdir()) == []


def test_check_fails_once_the_directory_is_removed(tmp_path):
    run = tmp_path / "run"
    lock = rundir.open_run(run)
    os.unlink(run / rundir.LOCK_NAME)
    with pytest.raises(rundir.RunDirError, match="lock file .* was removed or replaced"):
        lock.check()
    os.rmdir(run)
    with pytest.raises(rundir.RunDirError, match="removed or renamed"):
        lock.check()
    lock.release()
    with pytest.raises(rundir.RunDirError, match="released"):
        lock.check()


def test_stale_note_does_not_say_a_live_pid_ended(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / rundir.LOCK_NAME).write_text(f"{sleeper.pid}\n")  # written, but not locked by it
        with rundir.open_run(run) as lock:
            assert lock.stale_pid == sleeper.pid
            note = lock.stale_note()
            assert "ended" not in note and f"a process {sleeper.pid} is running now" in note
    finally:
        sleeper.kill()
        sleeper.wait()
    (run / rundir.LOCK_NAME).write_text(f"{sleeper.pid}\n")  # now that pid is gone
    with rundir.open_run(run) as lock:
        assert "ended without releasing it" in lock.stale_note()
    with rundir.open_run(run) as lock:
        assert lock.stale_pid is None and lock.stale_note() is None


def test_release_removes_only_the_empty_directory_it_created(tmp_path):
    run = tmp_path / "run"
    assert rundir.open_run(run).release(remove_directory=True) and not run.exists()
    lock = rundir.open_run(run)
    (run / "metrics.json").write_text("{}")
    assert not lock.release(remove_directory=True) and (run / "metrics.json").exists()  # not empty
    os.unlink(run / "metrics.json")
    with rundir.open_run(run) as existing:  # not created by this lock
        pass
    assert not existing.created_directory and not existing.release(remove_directory=True) and run.is_dir()
    os.rmdir(run)
    lock = rundir.open_run(run)
    os.unlink(run / rundir.LOCK_NAME)
    os.rmdir(run)
    run.mkdir()  # another directory at the path now, empty
    with pytest.raises(rundir.RunDirError, match="replaced by another directory"):
        lock.check()
    assert not lock.release(remove_directory=True) and run.is_dir()


def test_check_fails_once_the_directory_is_removed_and_made_again(tmp_path):
    """The descriptor the lock holds keeps the removed directory's inode from being reused by the new one."""
    run = tmp_path / "run"
    lock = rundir.open_run(run)
    os.unlink(run / rundir.LOCK_NAME)
    os.rmdir(run)
    run.mkdir()
    with pytest.raises(rundir.RunDirError, match="replaced by another directory"):
        lock.check()
    lock.release()
    assert list(run.iterdir()) == []
