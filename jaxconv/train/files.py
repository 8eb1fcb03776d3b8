"""Opening a file a user named without trusting what is at the path: only regular files are read.

(:class:`WriteError` is the error every writer of this package raises when a
file cannot be written: a full disk, a read-only file system.)

A FIFO would block ``open`` for ever and a device (``/dev/zero``) would be read
without end, so the path's type is checked with ``stat`` before it is opened,
and again with ``fstat`` on the descriptor (opened non-blocking), in case the
path was replaced in between.  The callers (checkpoints, data files) word the
refusal for their own kind of file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from collections.abc import Callable, Iterator


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only file system...); the message names the file.

    An ``OSError`` (``errno`` kept), so callers catching ``OSError`` map it to
    their usual exit status; nothing was written at the name (writes go to a
    temporary file that is removed).
    """

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path, err: OSError, what: str = "") -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path`` (``what``: e.g. ``"the checkpoint"``)."""
    if isinstance(err, WriteError):
        return err
    reason = err.strerror or str(err) or type(err).__name__
    hint = " (the disk is full?)" if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else ""
    label = f"{what} {str(path)!r}" if what else repr(str(path))
    return WriteError(err.errno, f"cannot write {label}: {reason}{hint}; the file was left as it was.")


_SPECIAL = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def special_kind(mode: int) -> str | None:
    """``None`` for a regular file, else what it is: ``"directory"``, ``"FIFO"``, ``"character device"``..."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "directory"
    return next((kind for test, kind in _SPECIAL if test(mode)), "special file")


@contextlib.contextmanager
def open_regular(path, refuse: Callable[[str], Exception]) -> Iterator[tuple[io.BufferedIOBase, int]]:
    """``(file, size)`` of ``path`` opened for binary reading, if it is a regular file.

    Otherwise raises ``refuse(kind)`` (``kind`` from :func:`special_kind`).  A
    missing path raises ``FileNotFoundError`` from ``os.stat``.
    """

    def check(mode: int) -> None:
        kind = special_kind(mode)
        if kind is not None:
            raise refuse(kind)

    check(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        check(info.st_mode)
        yield f, info.st_size
