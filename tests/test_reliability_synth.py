"""``synth`` on real directories: no overwrite, no shadowed data, no link followed, nothing left on failure."""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
import sys

import pytest

from jaxconv.train import data, files, synthetic

SMALL = {"num_train": 10, "num_test": 5}


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "jaxconv", "synth", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def _snapshot(directory):
    return {
        p.name: (os.path.islink(p), os.readlink(p) if os.path.islink(p) else p.read_bytes())
        for p in sorted(directory.iterdir())
    }


def test_writes_into_a_fresh_directory_and_the_loader_reads_it(tmp_path):
    synthetic.write_mnist_like(tmp_path / "m", **SMALL)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(synthetic.MNIST_FILES)
    assert data.load_dataset("mnist", tmp_path / "m").train_images.shape == (10, 28, 28, 1)
    synthetic.write_cifar_like(tmp_path / "c", **SMALL)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(synthetic.CIFAR_FILES)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_an_existing_raw_file_is_never_overwritten(tmp_path, name):
    (tmp_path / name).write_bytes(b"the user's own data")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"already holds {name}; nothing was written"):
        synthetic.write_mnist_like(tmp_path, **SMALL)
    assert _snapshot(tmp_path) == before


def test_real_gz_mnist_is_not_shadowed_by_raw_files(tmp_path):
    real = synthetic.write_mnist_like(tmp_path / "real", compress=True, seed=3, **SMALL)
    before = _snapshot(real)
    with pytest.raises(FileExistsError, match=r"train-images-idx3-ubyte\.gz.*hide it from the loader"):
        synthetic.write_mnist_like(real, **SMALL)
    assert _snapshot(real) == before
    with pytest.raises(FileExistsError):
        synthetic.write_mnist_like(real, compress=True, **SMALL)
    assert _snapshot(real) == before


def test_a_planted_symlink_at_a_name_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "test_batch.bin")
    with pytest.raises(FileExistsError, match="test_batch.bin"):
        synthetic.write_cifar_like(out, **SMALL)
    assert victim.read_bytes() == b"precious"
    assert [p.name for p in out.iterdir()] == ["test_batch.bin"]


def test_a_file_as_the_directory_gets_a_clear_message(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        synthetic.write_mnist_like(tmp_path / "file", **SMALL)
    assert (tmp_path / "file").read_bytes() == b"x"


def test_a_dangling_symlink_as_the_directory_gets_a_clear_message(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(FileNotFoundError, match="dangling link"):
        synthetic.write_mnist_like(tmp_path / "link", **SMALL)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_train": 10**8, "num_test": 5}, ValueError, r"`num_train` \(=100000000\) must lie in \[1, 100000\]"),
        ({"num_train": 10, "num_test": 10**8}, ValueError, r"`num_test` \(=100000000\) must lie in"),
        ({"num_train": 0, "num_test": 5}, ValueError, r"`num_train` \(=0\)"),
        ({"num_train": 10.5, "num_test": 5}, TypeError, "must be an integer"),
    ],
)
def test_absurd_counts_are_refused_before_anything_is_made(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        synthetic.write_mnist_like(tmp_path / "m", **kwargs)
    with pytest.raises(error, match="`num_"):
        synthetic.write_cifar_like(tmp_path / "c", **kwargs)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_a_full_disk_leaves_no_file_behind(tmp_path, monkeypatch):
    """The third file fails with ENOSPC (/dev/full): the two written before it are removed too, no 0-byte file."""
    real, calls = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        calls.append(fd)
        if len(calls) == 3:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    out = tmp_path / "m"
    with pytest.raises(files.WriteError) as caught:
        synthetic.write_mnist_like(out, **SMALL)
    assert caught.value.errno == errno.ENOSPC and "t10k-images-idx3-ubyte" in str(caught.value)
    assert list(out.iterdir()) == []


def test_the_command_line_messages(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    done = _cli("mnist", tmp_path / "file", "--num-train", "10", "--num-test", "5")
    assert done.returncode == 2 and "exists and is not a directory" in done.stderr, done.stderr
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    done = _cli("mnist", tmp_path / "link", "--num-train", "10", "--num-test", "5")
    assert done.returncode == 2 and "dangling link" in done.stderr, done.stderr
    real = synthetic.write_mnist_like(tmp_path / "real", compress=True, **SMALL)
    done = _cli("mnist", real, "--num-train", "10", "--num-test", "5")
    assert done.returncode == 2 and "nothing was written" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in real.iterdir()) == sorted(n + ".gz" for n in synthetic.MNIST_FILES)
    assert gzip.decompress((real / "t10k-labels-idx1-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x01"
