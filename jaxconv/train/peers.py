"""The processes of a several-process run watch each other: the loss of one ends the others promptly with one
clear message and exit code 2, never in the middle of a run-directory write, never with jax's abort or traceback.

After the meeting (:func:`jaxconv.train.loop._rendezvous`) every process keeps its TCP connection to process 0,
and process 0 one to each other process.  The kernel closes a killed process's connections at once, so a daemon
thread blocked on them (:class:`PeerWatch`) learns of a loss within milliseconds, where jax's own health check
takes its heartbeat timeout (100 s) and then aborts (SIGABRT).  On the connections each process says ``done``
when :func:`jaxconv.train.fit` returns and ``failed`` when it raises, so a clean finish or a peer's own error
is never taken for a loss; process 0 relays a loss to the others (``lost P``) so that they can name the process.

When the watch ends a process it takes the write lock first (process 0 holds it around each sequence of
run-directory writes, :meth:`PeerWatch.writing`), releases the run directory, prints one line naming the lost
process and the last whole checkpoint, and ends the process with ``os._exit(2)``: jax's distributed runtime
cannot go on without the lost process, and its shutdown would wait for it.

jax aborts a process itself (SIGABRT, within milliseconds) when process 0, which hosts jax's coordination
service, dies; the watch may lose that race.  ``python -m jaxconv train`` therefore runs a several-process
training in a child process and supervises it (:mod:`jaxconv.cli.supervise`): the child tells its supervisor
over a Unix socket what it knows (the epoch, the last checkpoint, a peer's loss) and hands it a duplicate of its
connection to process 0, so the supervisor can turn the child's death by signal into the same message and
exit code 2.  Called from Python, :func:`jaxconv.train.fit` has no supervisor: a lost process 0 then ends the
others with jax's abort.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["SUPERVISOR_ENV", "PeerWatch", "current", "start"]

#: The environment variable that names the Unix socket (a file descriptor) to the supervising process.
SUPERVISOR_ENV = "JAXCONV_TRAIN_SUPERVISOR_FD"

#: What the processes say to each other on their connections, one line each.
DONE, FAILED, LOST = b"done", b"failed", b"lost "

#: Seconds a process whose peer stopped with an error waits for its own error (the same settings error
#: raised on every process at once) before it stops, naming the peer.
GRACE = 5.0

#: Seconds process 0, ending, waits for the others to end first (jax's coordination service ends with it).
LINGER = 3.0

_WATCH: PeerWatch | None = None


def current() -> PeerWatch | None:
    """The watch of this process's several-process run, or ``None``."""
    return _WATCH


def start(process_id: int, num_processes: int, conns: dict[int, socket.socket], run_dir: str) -> PeerWatch:
    """Watch ``conns`` (process id -> connection, from the meeting) from a daemon thread; the process's watch."""
    global _WATCH
    _WATCH = PeerWatch(process_id, num_processes, conns, run_dir)
    _WATCH.start()
    return _WATCH


def _supervisor_socket() -> socket.socket | None:
    value = os.environ.pop(SUPERVISOR_ENV, None)  # not inherited by anything this process starts
    if value is None or not value.isdigit():
        return None
    try:
        return socket.socket(fileno=int(value))
    except OSError:
        return None


class PeerWatch:
    """One process's watch over the others (see the module docstring).

    The training loop tells it where the run is (:attr:`epoch`, :meth:`agreed`, :meth:`saved`), wraps process
    0's writes in :meth:`writing`, gives it the run directory's release (:attr:`cleanup`), and ends with
    :meth:`finish`."""

    def __init__(self, process_id: int, num_processes: int, conns: dict[int, socket.socket], run_dir: str):
        self.process_id, self.num_processes, self.run_dir = process_id, num_processes, run_dir
        self._conns = dict(conns)
        self._state = {p: "running" for p in conns}
        self._open = set(conns)  # the peers whose connection has not closed
        self._failed_at: dict[int, float] = {}
        self._write_lock = threading.RLock()  # write_metrics runs inside the epoch's writes
        self._send_lock = threading.Lock()
        self._end_lock = threading.Lock()
        self.ending = threading.Event()  # the watch is ending the process
        self.finished = threading.Event()  # fit returned or raised on this process
        #: The epoch being trained (1-based), or None before the first.
        self.epoch: int | None = None
        #: Process 0: the epoch of the last checkpoint written whole (None: none).  Others: the last epoch
        #: every process got past (process 0 had written its checkpoint by then).
        self.checkpoint_epoch: int | None = None
        #: Called (under the write lock) before the watch ends the process: releases the run directory.
        self.cleanup: Callable[[], None] | None = None
        self._supervisor = _supervisor_socket()
        if self._supervisor is not None and process_id != 0 and 0 in conns:
            with contextlib.suppress(OSError):  # the supervisor checks it after a jax abort: is process 0 gone?
                socket.send_fds(self._supervisor, [b'{"process0": true}\n'], [conns[0].fileno()])
        self._thread = threading.Thread(target=self._watch, name="jaxconv-peer-watch", daemon=True)

    def start(self) -> None:
        self._tell_supervisor()
        self._thread.start()

    # --- what the training loop tells it -------------------------------------------------------------------

    def at_epoch(self, epoch: int) -> None:
        """Training epoch ``epoch`` (1-based) began."""
        self.epoch = epoch
        self._tell_supervisor()

    def saved(self, epoch: int | None) -> None:
        """Process 0: the checkpoint of ``epoch`` is written whole.  Others: every process got past ``epoch``."""
        self.checkpoint_epoch = epoch
        self._tell_supervisor()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold off the watch's ending of the process while the run directory is being written."""
        with self._write_lock:
            yield

    def finish(self, ok: bool) -> None:
        """Say ``done`` (``ok``) or ``failed`` to the others; process 0, failing, waits up to ``GRACE`` seconds
        for the others to end first (they end on its ``failed``, or on their own error)."""
        self.finished.set()
        self._send_all(DONE if ok else FAILED)
        if not ok and self.process_id == 0:
            deadline = time.monotonic() + GRACE + LINGER
            while self._open and time.monotonic() < deadline and not self.ending.is_set():
                time.sleep(0.02)

    def failing(self, err: BaseException) -> None:
        """The training loop raised ``err``: if the watch is ending the process (a lost peer breaks the
        collectives), wait for it rather than raise; else return at once (the loop's own error)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not self.ending.is_set():
            time.sleep(0.05)
        if self.ending.is_set():
            while True:  # the watch ends the process (os._exit)
                time.sleep(1)

    # --- the messages --------------------------------------------------------------------------------------

    def checkpoint_note(self) -> str:
        ckpt = os.path.join(self.run_dir, "checkpoint.safetensors")
        if self.process_id == 0:
            if self.checkpoint_epoch is None:
                return "No checkpoint was written yet: start all processes again (without --resume)."
            return (
                f"The last checkpoint {ckpt} (epoch {self.checkpoint_epoch}) is intact: start all processes again "
                f"with --resume."
            )
        if self.checkpoint_epoch is None:
            return (
                f"Process 0 writes the checkpoints atomically ({ckpt}; none had been written when this process "
                f"last heard): start all processes again, with --resume if it exists."
            )
        return (
            f"The last checkpoint process 0 wrote, {ckpt} (epoch {self.checkpoint_epoch} or later), is intact: "
            f"start all processes again with --resume."
        )

    def where(self) -> str:
        return f"during epoch {self.epoch}" if self.epoch is not None else "before training"

    def _tell_supervisor(self, **event) -> None:
        if self._supervisor is None:
            return
        record = {
            "process_id": self.process_id,
            "num_processes": self.num_processes,
            "where": self.where(),
            "note": self.checkpoint_note(),
            **event,
        }
        with contextlib.suppress(OSError):
            self._supervisor.sendall(json.dumps(record).encode() + b"\n")

    # --- the watch -----------------------------------------------------------------------------------------

    def _send(self, peer: int, line: bytes) -> None:
        conn = self._conns.get(peer)
        if conn is not None:
            with self._send_lock, contextlib.suppress(OSError):
                conn.sendall(line + b"\n")

    def _send_all(self, line: bytes) -> None:
        for peer in list(self._conns):
            self._send(peer, line)

    def _watch(self) -> None:
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        for peer, conn in self._conns.items():
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ, peer)
            buffers[peer] = b""
        if self._supervisor is not None:
            self._supervisor.setblocking(False)
            selector.register(self._supervisor, selectors.EVENT_READ, None)
        while True:
            for key, _ in selector.select(timeout=0.5):
                peer = key.data
                try:
                    chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if peer is None:  # the supervising process
                    if not chunk:
                        self._end(
                            f"process {self.process_id} of {self.num_processes}: the `python -m jaxconv train` "
                            f"process that supervised this one ended (killed?) {self.where()}; stopping."
                        )
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    self._open.discard(peer)
                    if self._state[peer] == "running":
                        self._lost(peer, "its connection closed")
                    continue
                buffers[peer] += chunk
                while b"\n" in buffers[peer]:
                    line, _, buffers[peer] = buffers[peer].partition(b"\n")
                    self._heard(peer, line)
            now = time.monotonic()
            for peer, since in list(self._failed_at.items()):
                if now - since >= GRACE and not self.finished.is_set():
                    self._end(
                        f"process {peer} of {self.num_processes} stopped with an error {self.where()} (see its "
                        f"message); process {self.process_id} stops too. {self.checkpoint_note()}",
                        event={"stopped": peer},
                        relay=FAILED + b" " + str(peer).encode(),
                    )

    def _heard(self, peer: int, line: bytes) -> None:
        if line == DONE:
            self._state[peer] = "done"
        elif line == FAILED:
            self._state[peer] = "failed"
            self._failed_at[peer] = time.monotonic()
            self._tell_supervisor(failed=peer)
        elif line.startswith(LOST) and line[len(LOST) :].isdigit():  # process 0 relays another's loss
            self._lost(int(line[len(LOST) :]), f"process {peer} saw its connection close")
        elif line.startswith(FAILED + b" ") and line[len(FAILED) + 1 :].isdigit():
            other = int(line[len(FAILED) + 1 :])
            self._state[peer] = "failed"
            self._failed_at.setdefault(other, time.monotonic())

    def _lost(self, peer: int, how: str) -> None:
        if self.finished.is_set():
            return  # this process's training is over; the peer's end changes nothing of it
        self._end(
            f"process {peer} of {self.num_processes} was lost ({how}) {self.where()}; process {self.process_id} "
            f"stops. {self.checkpoint_note()}",
            event={"lost": peer},
            relay=LOST + str(peer).encode(),
        )

    def _end(self, message: str, *, event: dict | None = None, relay: bytes | None = None) -> None:
        """Print ``message`` and end the process with exit code 2, once; never during a run-directory write."""
        with self._end_lock:
            if self.ending.is_set():
                return
            self.ending.set()
        self._tell_supervisor(**(event or {}), message=message)
        if self.process_id == 0 and relay is not None:
            for peer, state in self._state.items():
                if state == "running":
                    self._send(peer, relay)
            self._linger(LINGER)
        got = self._write_lock.acquire(timeout=60)
        try:
            if self.cleanup is not None:
                self.cleanup()
        except Exception as err:  # the message still goes out; the next run treats the lock as stale
            message += f" (releasing the run directory failed: {err})"
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            # Process 0's progress bar ends its line with a carriage return, not a newline.
            bar = "\n" if self.process_id == 0 and self.epoch is not None else ""
            sys.stderr.write(f"{bar}python -m jaxconv train: error: {message}\n")
            sys.stderr.flush()
        del got
        os._exit(2)

    def _linger(self, seconds: float) -> None:
        """Process 0, from the watch's thread: wait up to ``seconds`` until every other process has closed its
        connection (ended)."""
        deadline = time.monotonic() + seconds
        open_conns = [self._conns[p] for p in self._open]
        while open_conns and time.monotonic() < deadline:
            for conn in list(open_conns):
                try:
                    conn.setblocking(False)
                    data = conn.recv(4096, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    open_conns.remove(conn)
                else:
                    with contextlib.suppress(OSError):
                        conn.recv(len(data))  # lines the watch no longer needs
            time.sleep(0.02)
