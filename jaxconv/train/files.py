"""Opening a file a user named without trusting what is at the path: only regular files are read.

A FIFO would block ``open`` for ever and a device (``/dev/zero``) would be read
without end, so the path's type is checked with ``stat`` before it is opened,
and again with ``fstat`` on the descriptor (opened non-blocking), in case the
path was replaced in between.  The callers (checkpoints, data files) word the
refusal for their own kind of file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import BinaryIO, Callable, Iterator

_SPECIAL = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
            (stat.S_ISSOCK, "socket"))


def special_kind(mode: int) -> str | None:
    """``None`` for a regular file, else what it is: ``"directory"``, ``"FIFO"``, ``"character device"``..."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "directory"
    return next((kind for test, kind in _SPECIAL if test(mode)), "special file")


@contextlib.contextmanager
def open_regular(path, refuse: Callable[[str], Exception]) -> Iterator[tuple[BinaryIO, int]]:
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
