"""Host memory for training on the CPU: huge pages for the step's temporaries.

A jitted step on the CPU gets its intermediate arrays in one temporary
allocation, of the size ``compiled.memory_analysis().temp_size_in_bytes``
reports (88 MiB for resnet_small at batch 128).  XLA takes it from ``malloc``
on a worker thread; glibc serves a request that large with a fresh ``mmap``
and returns it to the kernel on ``free``, so every step touches that memory
for the first time again: one page fault per 4 KiB page.  On a 2-core virtual
machine that is 22,400 faults and ~37 ms of kernel time per resnet_small step,
most of a 60 ms step.

glibc (2.35 on) can ask for transparent huge pages on the memory it maps
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``): 2 MiB pages, 512 times fewer
faults, nothing kept after ``free``; the same step then runs in ~38 ms.  The
setting is read when the process starts, so:

* ``python -m jaxconv train`` starts itself again (``os.execve``, same process
  id, same arguments) with it, where it helps (:func:`environment`);
* for your own script, start it so:
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py``.

It helps where the kernel's transparent huge pages are ``madvise``
(``/sys/kernel/mm/transparent_hugepage/enabled``); with ``always`` the pages
are huge already, with ``never`` nothing can.  ``JAXCONV_HOST_MEMORY=default``
leaves the process as it is.  :func:`status` says which holds.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["ENV", "TUNABLE", "HostMemory", "environment", "restart_with_huge_pages", "status", "thp_mode"]

#: Set to ``default`` to leave glibc's settings as they are.
ENV = "JAXCONV_HOST_MEMORY"
#: The glibc tunable: ``malloc`` asks for transparent huge pages (``madvise``) on what it maps.
TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


class HostMemory(NamedTuple):
    """Whether the step's temporaries get huge pages (``huge_pages``), and a sentence saying why or why not."""

    huge_pages: bool
    reason: str


def thp_mode(path: pathlib.Path = _THP) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``); ``None`` if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _glibc_version() -> tuple[int, int] | None:
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    try:
        major, minor = version().decode().split(".")[:2]
        return int(major), int(minor)
    except ValueError:  # pragma: no cover - glibc always says "2.NN"
        return None


def _hugetlb_setting(env: Mapping[str, str]) -> str | None:
    """The ``glibc.malloc.hugetlb=...`` item of ``$GLIBC_TUNABLES``, if it has one."""
    items = env.get("GLIBC_TUNABLES", "").split(":")
    return next((item for item in items if item.startswith("glibc.malloc.hugetlb=")), None)


def _decide(env: Mapping[str, str]) -> tuple[HostMemory, dict[str, str] | None]:
    """(what holds under ``env``, the environment to start again with, or None)."""
    setting = _hugetlb_setting(env)
    if setting is not None:
        return HostMemory(setting != "glibc.malloc.hugetlb=0", f"GLIBC_TUNABLES has {setting}"), None
    if env.get(ENV, "").strip().lower() == "default":
        return HostMemory(False, f"${ENV}=default: glibc's default settings"), None
    version = _glibc_version()
    if version is None:
        return HostMemory(False, "not glibc: the C library's allocator is left as it is"), None
    if version < (2, 35):
        return HostMemory(False, f"glibc {version[0]}.{version[1]} has no malloc.hugetlb (2.35 on)"), None
    mode = thp_mode()
    if mode == "always":
        return HostMemory(True, "the kernel's transparent huge pages are 'always'"), None
    if mode != "madvise":
        return HostMemory(False, f"the kernel's transparent huge pages are {mode or 'unavailable'!r}"), None
    tunables = env.get("GLIBC_TUNABLES", "")
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return HostMemory(False, f"not asked for: start the process with GLIBC_TUNABLES={TUNABLE}"), new


def status(env: Mapping[str, str] | None = None) -> HostMemory:
    """Whether this process (or one started with ``env``) gets huge pages for its large allocations, and why."""
    return _decide(os.environ if env is None else env)[0]


def environment(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``env`` (default: this process's) with :data:`TUNABLE` added, or ``None`` where adding it changes nothing.

    ``None`` when it is set already (to anything), ``$JAXCONV_HOST_MEMORY`` is
    ``default``, the C library is not glibc 2.35 or later, or the kernel's
    transparent huge pages are not ``madvise``.
    """
    return _decide(os.environ if env is None else env)[1]


def restart_with_huge_pages(argv: Sequence[str] | None = None) -> None:
    """Start this process again (``os.execve``) with :data:`TUNABLE`, where :func:`environment` says it helps.

    Returns (having done nothing) where it does not help or the interpreter
    cannot be started again; otherwise does not return.  ``argv``: the command line to run again (default
    ``sys.orig_argv``, the interpreter's own).  Call it before anything
    worth keeping has happened: the process image is replaced.
    """
    env = environment()
    if env is None or not sys.executable:  # an embedded interpreter has no executable to start again
        return
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args[1:]], env)
    except OSError:  # pragma: no cover - the interpreter vanished from disk: go on without huge pages
        return
