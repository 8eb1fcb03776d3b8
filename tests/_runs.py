"""The tiny training runs the tests start: the smallest model (one conv, ReLU, FC) and big batches keep each
run to a few seconds.  ``TINY_CONFIG`` as ``jaxconv.train.Config`` fields, ``TINY`` as the same flags of
``python -m jaxconv train``; ``free_port()`` for the several-process runs; ``ROOT``, the repository."""

from __future__ import annotations

import pathlib
import socket

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_CONFIG = {
    "model": "dd2424_net",
    "batch_size": 64,
    "optimizer": "momentum",
    "lr": 0.05,
    "schedule": "constant",
    "val_fraction": 0.0,
    "seed": 3,
}

TINY = [item for name, value in TINY_CONFIG.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
