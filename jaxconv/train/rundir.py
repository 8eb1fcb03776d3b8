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

Symbolic links are never followed: ``DIR`` itself must not be one (a dangling
link gets its own message), the directory is opened with ``O_NOFOLLOW`` and
the lock file is opened relative to that descriptor with ``O_NOFOLLOW``, so a
link planted at ``DIR/.jaxconv.lock`` is refused, never truncated through;
``--overwrite`` removes a link at an output's name, not what it points to.
The lock remembers the directory's identity: :meth:`RunLock.check` fails once
the path names another directory (the run's was removed or renamed).

POSIX only (``fcntl.flock``).  A lock on a network file system is only as good
as that file system's ``flock``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import tempfile

__all__ = ["LOCK_NAME", "OUTPUTS", "REPLACED_PREFIX", "RunDirError", "RunLock", "open_run"]

#: The files a run writes into its directory; any of them marks the directory as holding a run.
OUTPUTS = (
    "checkpoint.safetensors",
    "best.safetensors",
    "metrics.json",
    "curves.png",
    "filters.png",
    "confusion-test.png",
    "confusion-train.png",
)

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
    (``None`` if the lock was free and clean); :meth:`stale_note` words it for
    the user.  The lock keeps a descriptor of the directory and remembers its
    identity (``st_dev``, ``st_ino``): :meth:`check` raises :class:`RunDirError`
    once the directory at the path is no longer the one locked (removed,
    renamed, replaced), so a run never writes into a directory another process
    created in its place.
    """

    def __init__(
        self, directory: pathlib.Path, fd: int, stale_pid: int | None, created: bool, dir_fd: int | None = None
    ):
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.stale_pid = stale_pid
        self.created_directory = created
        #: The outputs of the run ``overwrite=True`` replaces, still in place until :meth:`set_previous_aside`.
        self.previous: list[str] = []
        self._aside: pathlib.Path | None = None
        self._fd: int | None = fd
        self._dir_fd = dir_fd
        info = os.fstat(dir_fd) if dir_fd is not None else os.stat(directory)
        self.identity = (info.st_dev, info.st_ino)

    def set_previous_aside(self) -> None:
        """Move the replaced run's outputs (:attr:`previous`) into a hidden directory inside the run
        directory, by renames; a no-op if there are none or they are aside already.  ``RunDirError``
        (everything moved back) if a rename fails."""
        if not self.previous or self._aside is not None:
            return
        try:
            aside = pathlib.Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=self.directory))
        except OSError as err:
            raise RunDirError(
                f"--overwrite: cannot set the previous run aside in {str(self.directory)!r}: {_reason(err)}."
            ) from err
        try:  # what is being moved, for a later open_run() if this process is killed midway
            (aside / _MANIFEST).write_text("".join(f"{name}\n" for name in self.previous))
        except OSError as err:
            shutil.rmtree(aside, ignore_errors=True)
            raise RunDirError(
                f"--overwrite: cannot set the previous run aside in {str(self.directory)!r}: {_reason(err)}."
            ) from err
        # From here on restore_previous() (called however the run ends) can put back what was moved.
        self._aside = aside
        # The checkpoint first: a process killed in between leaves no checkpoint in the run directory, which
        # tells the next open_run() to restore the previous run, not to delete it (_recover_replaced).
        for name in sorted(self.previous, key=lambda name: name != "checkpoint.safetensors"):
            try:
                os.replace(self.directory / name, aside / name)
            except OSError as err:
                self.restore_previous()
                raise RunDirError(
                    f"--overwrite: cannot move {str(self.directory / name)!r} aside: {_reason(err)}."
                ) from err

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

    @property
    def held(self) -> bool:
        """Whether the lock is still held (not released)."""
        return self._fd is not None

    def check(self) -> None:
        """Raise :class:`RunDirError` unless ``directory`` is still the directory locked, with our lock file in it.

        Call it before writing into the directory (each checkpoint, the metrics,
        the plots): a directory removed or renamed while the run trained (and
        perhaps created again by someone else) is not written into.
        """
        if self._fd is None:
            raise RunDirError(f"the lock on the run directory {str(self.directory)!r} was released.")
        where = f"the run directory {str(self.directory)!r}"
        try:
            os.stat(self.directory, follow_symlinks=False)
        except FileNotFoundError:
            raise RunDirError(
                f"{where} was removed or renamed while the run was using it; nothing more is written."
            ) from None
        except OSError as err:
            raise RunDirError(f"{where} cannot be checked: {_reason(err)}.") from err
        if not self._same_directory():
            raise RunDirError(
                f"{where} was replaced by another directory (or file) while the run was using it "
                f"(it was removed or renamed and the path made again); nothing more is written."
            )
        try:
            lock_info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            lock_info = None
        if lock_info is None or not os.path.samestat(lock_info, os.fstat(self._fd)):
            raise RunDirError(
                f"the lock file {self.path} was removed or replaced while the run held it; another "
                f"process may be using {where}."
            )

    def stale_note(self) -> str | None:
        """A note for the user on the stale lock file taken over (``None`` if it was not stale)."""
        pid = self.stale_pid
        if pid is None:
            return None
        head = f"{self.path} was left by process {pid}"
        tail = f"the lock is stale and now held by process {os.getpid()}."
        if _pid_alive(pid):
            return (
                f"{head}, which no longer holds it (a process {pid} is running now: the pid was reused, or the "
                f"holder runs on another machine or in another container and released its lock); {tail}"
            )
        return f"{head}, which ended without releasing it (killed?); {tail}"

    def release(self, *, remove_directory: bool = False) -> bool:
        """Remove the lock file and drop the lock (in that order, so no one locks a file about to vanish).

        With ``remove_directory=True`` the directory is removed too if this
        lock created it, it is empty and it is still the directory at its path
        (not one made there since); returns whether it was removed.
        """
        if self._fd is None:
            return False
        removed = False
        try:
            if self._dir_fd is not None:
                # Through the directory's descriptor: the lock file of the directory we locked, even if the path
                # now names another directory.
                os.unlink(LOCK_NAME, dir_fd=self._dir_fd)
            else:
                os.unlink(self.path)
        except OSError:
            pass
        if remove_directory and self.created_directory and self._same_directory():
            try:
                os.rmdir(self.directory)
                removed = True
            except OSError:  # not empty: the run wrote something
                pass
        os.close(self._fd)
        self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        return removed

    def _same_directory(self) -> bool:
        """Whether the path still names the directory locked (our descriptor keeps its inode from being reused)."""
        try:
            info = os.stat(self.directory, follow_symlinks=False)
            alive = self._dir_fd is None or os.fstat(self._dir_fd).st_nlink > 0
        except OSError:
            return False
        return alive and (info.st_dev, info.st_ino) == self.identity

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0: nothing is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


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
    if os.path.islink(directory):
        target = os.readlink(directory)
        if not directory.exists():
            raise RunDirError(
                f"{str(directory)!r} is a symbolic link to {target!r}, which does not exist (a "
                f"dangling link); the run directory is not created through it. Remove the link or "
                f"choose another --out."
            )
        raise RunDirError(
            f"{str(directory)!r} is a symbolic link (to {target!r}); a run directory is not used "
            f"through a link: name the directory itself."
        )
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{str(directory)!r} exists and is not a directory.")
    existed = directory.is_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the run directory {str(directory)!r}: {_reason(err)}.") from err
    return not existed


def _open_directory(directory: pathlib.Path) -> int:
    """A descriptor of the directory ``directory`` itself (a symbolic link there is refused)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(directory, flags)
    except OSError as err:
        if os.path.islink(directory):
            raise RunDirError(
                f"{str(directory)!r} became a symbolic link; a run directory is not used through a link."
            ) from err
        raise RunDirError(f"cannot open the run directory {str(directory)!r}: {_reason(err)}.") from err


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").split()
    return int(text[0]) if text and text[0].isdigit() else None


def _open_lock_file(directory: pathlib.Path, dir_fd: int) -> int:
    """``LOCK_NAME`` in the directory ``dir_fd``, opened (created) without following a symbolic link."""
    path = directory / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_NONBLOCK: a FIFO planted at the name must not block the open.
        fd = os.open(LOCK_NAME, flags | getattr(os, "O_NONBLOCK", 0), 0o644, dir_fd=dir_fd)
    except OSError as err:
        try:
            planted = stat.S_ISLNK(os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            planted = False
        if planted:
            raise RunDirError(
                f"the lock file {path} is a symbolic link; it is not followed (it could make the run "
                f"overwrite the file it points to). Remove it if you made it, and look into who did "
                f"if you did not."
            ) from err
        raise RunDirError(f"cannot write in the run directory {str(directory)!r}: {_reason(err)}.") from err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise RunDirError(
            f"the lock file {path} is not a regular file; remove it (it is not something this program wrote)."
        )
    return fd


def _lock(directory: pathlib.Path, dir_fd: int) -> tuple[int, int | None]:
    """Lock ``LOCK_NAME`` in the directory ``dir_fd``: ``(fd, pid a dead holder left or None)``."""
    import fcntl

    path = directory / LOCK_NAME
    while True:
        fd = _open_lock_file(directory, dir_fd)
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
        # then we hold a lock on a file no one else will see.  Start over on the file at the name now.
        try:
            same = os.path.samestat(os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        left = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise RunDirError(f"cannot write in the run directory {str(directory)!r}: {_reason(err)}.") from err
    return fd, (left if left != os.getpid() else None)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
    dir_fd = _open_directory(directory)
    try:
        fd, stale = _lock(directory, dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    lock = RunLock(directory, fd, stale, created, dir_fd)
    try:
        _recover_replaced(directory)
        existing = [name for name in OUTPUTS if _lexists(name, dir_fd)]
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
