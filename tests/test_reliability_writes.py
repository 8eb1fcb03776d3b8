"""Every file a run writes goes through a temporary file and a rename: a planted link is replaced, never followed,
and a full disk is a clear error naming the file, with the old file kept."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from jaxconv.train import checkpoint, files, plots

VICTIM = b"\x89PNG not really, a user's file\n" * 20
HISTORY = [
    {"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_accuracy": 0.5, "test_accuracy": 0.4},
    {"epoch": 2, "train_loss": 0.5, "test_loss": 0.6, "train_accuracy": 0.7, "test_accuracy": 0.6},
]


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.bin"
    path.write_bytes(VICTIM)
    return path


WRITERS = {
    "curves.png": lambda path: plots.plot_curves(HISTORY, path, title="t"),
    "filters.png": lambda path: plots.plot_filters(np.random.default_rng(0).normal(size=(3, 3, 1, 4)), path),
    "confusion-test.png": lambda path: plots.plot_confusion(np.array([[3, 1], [0, 4]]), path),
    "metrics.json": lambda path: checkpoint.atomic_write_bytes(path, b"{}"),
    "checkpoint.safetensors": lambda path: checkpoint.save(path, {"w": np.ones((2, 3), np.float32)}, {"epoch": 1}),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_planted_symlink_is_replaced_not_followed(tmp_path, victim, name):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / name)
    WRITERS[name](run / name)
    assert victim.read_bytes() == VICTIM
    assert not os.path.islink(run / name) and (run / name).is_file()
    written = (run / name).read_bytes()
    if name.endswith(".png"):
        assert written.startswith(b"\x89PNG\r\n\x1a\n")
    if name.endswith(".safetensors"):
        assert checkpoint.read_metadata(run / name) == {"epoch": 1}
    assert [p.name for p in run.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize("name", ["curves.png", "confusion-test.png"])
def test_a_dangling_symlink_creates_nothing_at_its_target(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "made-through-the-link"
    os.symlink(target, run / name)
    WRITERS[name](run / name)
    assert not target.exists() and (run / name).is_file() and not os.path.islink(run / name)


@pytest.fixture
def full_disk(monkeypatch):
    """Writes through os.fdopen land on /dev/full: the kernel answers ENOSPC, as on a full disk."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_full_disk_raises_a_write_error_naming_the_file_and_keeps_the_old_one(tmp_path, name, full_disk):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_bytes(b"previous")
    with pytest.raises(files.WriteError) as caught:
        WRITERS[name](run / name)
    err = caught.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(run / name) in str(err) and "the disk is full?" in str(err)
    assert (run / name).read_bytes() == b"previous"
    assert [p.name for p in run.iterdir()] == [name]  # the temporary file was removed


def test_a_path_under_a_regular_file_is_a_write_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(files.WriteError, match="cannot write .*curves.png"):
        plots.plot_curves(HISTORY, tmp_path / "file" / "curves.png")
    assert (tmp_path / "file").read_bytes() == b"x"
