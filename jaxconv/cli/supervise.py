"""``python -m jaxconv train --coordinator ...`` with several processes: the training runs in a child process that
this one supervises, so that jax's abort of the child never reaches the user as a SIGABRT.

jax aborts every process of a run within milliseconds when process 0, which hosts its coordination service, dies
(``client.h: Terminating process because the JAX distributed service detected fatal errors``), before the
child's own watch over its peers (:mod:`jaxconv.train.peers`) can always say why.  The supervisor does not
train, so it has the time to say it: the child tells it over a Unix socket where the run is (the epoch, the last
checkpoint, a peer's loss) and hands it a duplicate of its connection to process 0.  When the child dies by a
signal the supervisor did not forward, the supervisor looks at that connection (closed: process 0 is gone; or
the line process 0 sent last) and prints the message the child would have printed, with exit code 2.  Anything
else passes through unchanged: the child's exit code, or its death by a signal the supervisor forwarded or
could not explain (raised again on the supervisor).

When the supervisor is killed, the child sees its socket close and stops (exit 2), so the
other processes see this one's loss.

The child's stderr passes through the supervisor as it comes, except jax's C++ log lines (``E1207 12:00:00...``),
which wait half a second: a child that dies within it of a peer's loss the supervisor explains leaves them out
(jax's report of the same loss, ending in ``Check failure stack trace``); otherwise they follow.

The terminal's Ctrl-C reaches both processes (one process group); the supervisor leaves it to the child.
SIGTERM and SIGHUP sent to the supervisor are passed on to the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

from ..train.peers import DONE, FAILED, LOST, SUPERVISOR_ENV

__all__ = ["needed", "run"]

_FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def needed(args) -> bool:
    """Whether ``train``'s flags ask for several processes that meet at ``--coordinator`` (and this process is
    not already the supervised child)."""
    return (
        getattr(args, "coordinator", None) is not None
        and (getattr(args, "num_processes", None) or 0) > 1
        and SUPERVISOR_ENV not in os.environ
    )


def run(argv: list[str]) -> int:
    """Run ``python -m jaxconv ARGV`` as a supervised child; its exit code (see the module docstring)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env[SUPERVISOR_ENV] = str(theirs.fileno())
    forwarded: set[int] = set()
    proc: subprocess.Popen | None = None

    def forward(signum, _frame):
        forwarded.add(signum)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    # Not SIG_IGN, which the child would inherit: a handler that does nothing (exec resets it to the default).
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda _s, _f: None)
    relay = _Relay()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxconv", *argv], env=env, pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE
        )
        theirs.close()
        info, process0 = _follow(proc, ours, relay)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ours.close()
    code = proc.returncode
    heard = _last_words(process0) if process0 is not None else None
    if process0 is not None:
        process0.close()  # process 0 sees this process's end now, not when the supervisor exits
    signum = -code
    message = None if code >= 0 or signum in forwarded else _explain(info, heard, signum)
    if code == 2 and "message" in info and relay.held:
        # The child's watch ended it, its message after jax's log lines of the same loss: the message alone.
        relay.end(keep=False)
        relay.say(str(info["message"]))
    relay.end(keep=message is None)
    if code >= 0:
        return code
    if message is None:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die as the child died
        return 128 + signum
    relay.say(message)
    return 2


#: The start of a line that jax's C++ logging (absl) writes: severity, date, time, thread, file:line].
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ \]]+:\d+\]", re.MULTILINE)


class _Relay:
    """The child's stderr, passed on as it comes but for jax's C++ log lines, held ``HOLD`` seconds."""

    HOLD = 0.5

    def __init__(self) -> None:
        self.held = b""
        self.since: float | None = None
        self.line_start = True

    def feed(self, data: bytes) -> None:
        if self.since is None:
            for match in _LOG_LINE.finditer(data):
                if match.start() > 0 or self.line_start:
                    self._write(data[: match.start()])
                    data, self.since = data[match.start() :], time.monotonic()
                    break
        if self.since is None:
            self._write(data)
        else:
            self.held += data

    def tick(self) -> None:
        if self.since is not None and time.monotonic() - self.since > self.HOLD:
            self.end(keep=True)

    def end(self, keep: bool) -> None:
        held, self.held, self.since = self.held, b"", None
        if keep:
            self._write(held)

    def say(self, message: str) -> None:
        """Print the error ``message`` on a line of its own (after a progress bar's carriage return)."""
        self._write(
            ("" if self.line_start else "\n").encode() + f"python -m jaxconv train: error: {message}\n".encode()
        )

    def _write(self, data: bytes) -> None:
        if data:
            self.line_start = data.endswith(b"\n")
            with contextlib.suppress(OSError):
                sys.stderr.flush()
                os.write(sys.stderr.fileno(), data)


def _follow(proc: subprocess.Popen, ours: socket.socket, relay: _Relay) -> tuple[dict, socket.socket | None]:
    """Read what the child says until it ends: ``(the last of its records merged, its connection to process 0)``,
    passing its stderr on through ``relay``."""
    info: dict = {}
    process0: socket.socket | None = None
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(ours, selectors.EVENT_READ)
    ours.setblocking(False)
    child_stderr = proc.stderr
    err_fd = child_stderr.fileno() if child_stderr is not None else None
    if err_fd is not None:
        os.set_blocking(err_fd, False)
        selector.register(err_fd, selectors.EVENT_READ)
    open_ = True
    while True:
        ended = proc.poll() is not None
        drained_by = time.monotonic() + 2.0
        while err_fd is not None:
            try:
                chunk = os.read(err_fd, 65536)
            except BlockingIOError:
                if not ended or time.monotonic() > drained_by:
                    break
                time.sleep(0.01)  # the child ended: read its stderr to the end (unless something else holds it)
                continue
            if not chunk:
                selector.unregister(err_fd)
                err_fd = None
                break
            relay.feed(chunk)
        relay.tick()
        while open_:
            try:
                data, fds, _, _ = socket.recv_fds(ours, 65536, 4)
            except BlockingIOError:
                break
            except OSError:
                data, fds = b"", []
            for fd in fds:
                if process0 is not None:
                    process0.close()
                process0 = socket.socket(fileno=fd)
            if not data:
                selector.unregister(ours)
                open_ = False
                break
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        info.update(record)
        if ended and (err_fd is None or time.monotonic() > drained_by):
            return info, process0
        if selector.get_map():
            selector.select(timeout=0.1)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)


def _last_words(conn: socket.socket) -> tuple[bool, list[bytes]]:
    """``(whether process 0 has closed the connection, the lines it sent that the child did not read)``."""
    conn.setblocking(False)
    data, closed = b"", False
    while True:
        try:
            chunk = conn.recv(65536)
        except BlockingIOError:
            break
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    return closed, [line for line in data.split(b"\n") if line]


def _explain(info: dict, heard: tuple[bool, list[bytes]] | None, signum: int) -> str | None:
    """The message for a child that died by ``signum``, or ``None`` if nothing says a peer's loss killed it."""
    if "message" in info:  # the child's watch had begun to end it
        return str(info["message"])
    if "process_id" not in info:  # the child never got to its run's watch
        return None
    me, count = info["process_id"], info["num_processes"]
    where, note = info.get("where", ""), info.get("note", "")
    closed, lines = heard if heard is not None else (False, [])
    for line in reversed(lines):
        if line.startswith(LOST) and line[len(LOST) :].isdigit():
            return (
                f"process {int(line[len(LOST) :])} of {count} was lost (process 0 saw its connection close) {where}; "
                f"process {me} stops. {note}"
            )
        if line.startswith(FAILED):
            who = line[len(FAILED) + 1 :].decode() if line != FAILED else "0"
            return (
                f"process {who} of {count} stopped with an error {where} (see its message); process {me} stops. {note}"
            )
    if "failed" in info:
        return (
            f"process {info['failed']} of {count} stopped with an error {where} (see its message); process {me} "
            f"stops. {note}"
        )
    if closed and DONE not in lines:
        return f"process 0 of {count} was lost (its connection closed) {where}; process {me} stops. {note}"
    if signum == signal.SIGABRT:
        return (
            f"jax's distributed runtime aborted process {me} of {count} {where}: another process of the run "
            f"stopped, or stopped answering. {note}"
        )
    return None
