"""Run directories: one training process at a time, checked before training, never overwritten by accident.

``python -m jaxconv train --out DIR`` calls :func:`open_run` before it loads any
data.  It

* creates ``DIR`` (and its parents) and proves it writable by creating the lock
  file in it: a read-only mount or a path under a regular file fails here, with
  a :class:`RunDirError` naming the path, not after an epoch of training;
* takes an exclusive lock on ``DIR`` for the life of the run: the lock file
  ``DIR/.jaxconv.lock`` holds the holder's pid and is locked with ``flock``
  (released by the kernel when the holder dies, however it dies).  A second
  process finds the lock held and fails at once, naming the holder's pid.  A
  lock file left behind by a process that was killed (its ``flock`` is gone,
  its pid still written) is reported as stale and taken over;
* refuses a directory that already holds a run's outputs (see :data:`OUTPUTS`)
  unless the caller resumes it or asked to overwrite it; nothing in it is
  touched then.  With ``overwrite=True`` the previous run's outputs stay where
  they are until the new run writes its first file: then
  :meth:`RunLock.set_previous_aside` moves them (renames) into a hidden
  directory inside the run directory, :meth:`RunLock.discard_previous` deletes
  them once the new run's first checkpoint is written, and
  :meth:`RunLock.restore_previous` puts them back if the new run fails before
  that.  So settings or data that fail, a run that diverges at once, or an
  interrupted first epoch leave the previous run as it was, and the directory
  never mixes two runs.  A process killed between the two steps leaves the
  hidden directory; the next :func:`open_run` restores it (no new checkpoint)
  or deletes it (the new run's checkpoint is there).

POSIX only (``fcntl.flock``).  A lock on a network file system is only as good
as that file system's ``flock``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

__all__ = ["LOCK_NAME", "OUTPUTS", "REPLACED_PREFIX", "RunDirError", "RunLock", "open_run"]

#: The files a run writes into its directory; any of them marks the directory as holding a run.
OUTPUTS = ("checkpoint.safetensors", "best.safetensors", "metrics.json", "curves.png", "filters.png",
           "confusion-test.png", "confusion-train.png")

#: The lock file's name inside the run directory.
LOCK_NAME = ".jaxconv.lock"

#: The prefix of the hidden directory that holds a replaced run's outputs until the new run's first checkpoint.
REPLACED_PREFIX = ".jaxconv-replaced-"
_MANIFEST = "moved"


class RunDirError(Exception):
    """The run directory cannot be used as asked (held by another process, holds a run, not writable)."""


class RunLock:
    """An exclusive lock on a run directory; :meth:`release` (or leaving the ``with`` block) gives it back.

    ``stale_pid`` is the pid a killed earlier holder had left in the lock file
    (``None`` if the lock was free and clean).
    """

    def __init__(self, directory: pathlib.Path, fd: int, stale_pid: int | None, created: bool):
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.stale_pid = stale_pid
        self.created_directory = created
        #: The outputs of the run ``overwrite=True`` replaces, still in place until :meth:`set_previous_aside`.
        self.previous: list[str] = []
        self._aside: pathlib.Path | None = None
        self._fd: int | None = fd

    def set_previous_aside(self) -> None:
        """Move the replaced run's outputs (:attr:`previous`) into a hidden directory inside the run
        directory, by renames; a no-op if there are none or they are aside already.  ``RunDirError``
        (everything moved back) if a rename fails."""
        if not self.previous or self._aside is not None:
            return
        try:
            aside = pathlib.Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=self.directory))
        except OSError as err:
            raise RunDirError(f"--overwrite: cannot set the previous run aside in {str(self.directory)!r}: "
                              f"{_reason(err)}.") from err
        try:  # what is being moved, for a later open_run() if this process is killed midway
            (aside / _MANIFEST).write_text("".join(f"{name}\n" for name in self.previous))
        except OSError as err:
            shutil.rmtree(aside, ignore_errors=True)
            raise RunDirError(f"--overwrite: cannot set the previous run aside in {str(self.directory)!r}: "
                              f"{_reason(err)}.") from err
        # From here on restore_previous() (called however the run ends) can put back what was moved.
        self._aside = aside
        # The checkpoint first: a process killed in between leaves no checkpoint in the run directory, which
        # tells the next open_run() to restore the previous run, not to delete it (_recover_replaced).
        for name in sorted(self.previous, key=lambda name: name != "checkpoint.safetensors"):
            try:
                os.replace(self.directory / name, aside / name)
            except OSError as err:
                self.restore_previous()
                raise RunDirError(f"--overwrite: cannot move {str(self.directory / name)!r} aside: "
                                  f"{_reason(err)}.") from err

    def restore_previous(self) -> None:
        """Put the replaced run's outputs back (over anything the new run wrote under their names) and
        remove what the new run wrote besides; a no-op unless they are aside."""
        if self._aside is None:
            return
        _restore(self.directory, self._aside, self.previous)
        self._aside = None

    def discard_previous(self) -> None:
        """Delete the replaced run's outputs for good (the new run has its first checkpoint)."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None
        self.previous = []

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _restore(directory: pathlib.Path, aside: pathlib.Path, names) -> None:
    """Put the previous run's outputs ``names`` back from ``aside`` (those not moved yet are still in
    place) and remove the other outputs in ``directory``: the new run's."""
    for name in OUTPUTS:
        if name not in names and os.path.lexists(directory / name):
            os.unlink(directory / name)
    for name in names:
        if os.path.lexists(aside / name):
            os.replace(aside / name, directory / name)
    shutil.rmtree(aside, ignore_errors=True)


def _recover_replaced(directory: pathlib.Path) -> None:
    """Finish what a process killed while replacing a run left: restore the previous run if the new
    one has no checkpoint, else delete it.  (:meth:`RunLock.set_previous_aside` moves the previous
    checkpoint first, so a checkpoint in the directory beside a set-aside run is the new run's.)"""
    for aside in directory.glob(REPLACED_PREFIX + "*"):
        if aside.is_symlink() or not aside.is_dir():
            continue
        try:
            names = [n for n in (aside / _MANIFEST).read_text().split("\n") if n in OUTPUTS]
        except OSError:  # killed before the list was written: nothing was moved
            names = None
        if names is None or os.path.lexists(directory / "checkpoint.safetensors"):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _restore(directory, aside, names)


def _make_directory(directory: pathlib.Path) -> bool:
    """Create ``directory``; returns whether it was created.  ``RunDirError`` if it cannot be."""
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{str(directory)!r} exists and is not a directory.")
    existed = directory.is_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the run directory {str(directory)!r}: {_reason(err)}.") from err
    return not existed


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").split()
    return int(text[0]) if text and text[0].isdigit() else None


def _lock(directory: pathlib.Path) -> tuple[int, int | None]:
    """Lock ``directory/LOCK_NAME``: ``(fd, pid a dead holder left or None)``."""
    import fcntl

    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise RunDirError(f"cannot write in the run directory {str(directory)!r}: {_reason(err)}.") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirError(
                f"the run directory {str(directory)!r} is in use by another training process "
                f"(pid {holder if holder is not None else 'unknown'}, lock file {path}); wait for it to finish "
                f"or choose another --out."
            ) from None
        # The holder we waited on may have released (unlinked) the file between our open and our lock:
        # then we hold a lock on a file no one else will see.  Start over on the file at the path now.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    left = _read_pid(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise RunDirError(f"cannot write in the run directory {str(directory)!r}: {_reason(err)}.") from err
    return fd, (left if left != os.getpid() else None)


def open_run(directory, *, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Create, check and lock the run directory ``directory``; see the module docstring.

    Args:
      directory: the run's output directory.
      resume: the run continues the one in ``directory``: its outputs are kept.
      overwrite: the run replaces the one in ``directory``: its outputs are listed in the lock's
        ``previous``, to be set aside when the new run first writes (see the module docstring).

    Returns the held :class:`RunLock`.  Raises :class:`RunDirError` (nothing in
    the directory changed) when it cannot be created or written, is locked by
    another live process, or holds a run and neither ``resume`` nor
    ``overwrite`` was given.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other.")
    directory = pathlib.Path(directory)
    created = _make_directory(directory)
    fd, stale = _lock(directory)
    lock = RunLock(directory, fd, stale, created)
    try:
        _recover_replaced(directory)
        existing = [name for name in OUTPUTS if os.path.lexists(directory / name)]
        if existing and not (resume or overwrite):
            raise RunDirError(
                f"the run directory {str(directory)!r} already holds a run ({', '.join(existing)}); nothing was "
                f"changed. Continue it with --resume, or start over with --overwrite (replaces those files), "
                f"or choose another --out."
            )
        if overwrite:
            lock.previous = existing  # replaced from the new run's first write on (RunLock.set_previous_aside)
    except BaseException:
        lock.release()
        raise
    return lock
