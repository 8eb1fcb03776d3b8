"""Training from Python: :class:`Config` (the ``train`` command's settings) and :func:`fit` (its loop).

``python -m jaxconv train ...`` is a thin layer over these: it parses the
flags into a :class:`Config`, calls :func:`fit`, prints, and turns the result
into an exit code.  Everything the command guarantees (README, "What jaxconv
guarantees about your runs") is :func:`fit`'s: the run directory is locked and
never replaced unless asked, checkpoints are atomic and checksummed, a run
whose loss or weights go non-finite stops and keeps its last finite
checkpoint, a resumed run reaches the bit-identical parameters, and with
``jax.distributed`` every process runs :func:`fit` and process 0 writes.

    from jaxconv.train import Config, fit

    result = fit(Config(model="lenet5", dataset="digits", epochs=2, out="runs/lenet"))
    result.history[-1]["test_accuracy"], result.status
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from .. import plan
from .._core.jsonsafe import json_safe, strict_json_bytes
from .._core.version import __version__
from ..nn import layers as nn
from ..nn.models import MODELS, check_input_shape
from . import checkpoint, data, files, hostmem, peers, plots, rundir
from .data import DATASETS
from .gradcheck import check_model_grads
from .step import (
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    augment_images,
    build_optimizer,
    evaluate,
    init_optimizer,
    init_params,
    make_mesh,
    make_train_step,
    nonfinite_leaves,
    replicate,
    shard_batch,
    split_validation,
    standardization,
    standardize,
)

__all__ = [
    "MAX_SEED",
    "Completed",
    "Config",
    "Diverged",
    "FitError",
    "FitResult",
    "GradCheckFailed",
    "Status",
    "StopTraining",
    "Stopped",
    "data_fingerprint",
    "fit",
]

#: The largest seed: seeds are stored as uint32 in the PRNG keys and the shuffles.
MAX_SEED = 2**32 - 1


class FitError(ValueError):
    """Settings, data or a run directory :func:`fit` cannot train with; nothing was trained.

    The message is the one ``python -m jaxconv train`` prints after ``error:``
    (exit code 2).  ``fields`` names the :class:`Config` fields at fault, where known.
    """

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


class GradCheckFailed(RuntimeError):
    """``check_grads=True`` found a hand rule that disagrees with ``jax.grad``; nothing was trained.

    ``report`` is the table and the failing checks' reports (``train --check-grads`` exits 1).
    """

    def __init__(self, message: str, report: str):
        super().__init__(message)
        self.report = report


class StopTraining(Exception):
    """Raise it in a :func:`fit` callback to end the run after this epoch (its checkpoint is written)."""


# --- what a run ends with ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completed:
    """Every epoch of ``Config.epochs`` trained (or already trained by the run resumed)."""

    epochs: int
    kind: ClassVar[str] = "completed"


@dataclasses.dataclass(frozen=True)
class Stopped:
    """Stopped after ``epoch`` of ``epochs``, with a checkpoint: ``reason`` is ``"stop_after"``
    (``Config.stop_after``) or ``"callback"``.  ``Config(resume=True)`` continues exactly."""

    epoch: int
    epochs: int
    reason: str
    kind: ClassVar[str] = "stopped"


@dataclasses.dataclass(frozen=True)
class Diverged:
    """The objective or the updated weights became NaN or infinite at ``step`` (1-based) of ``epoch``.

    The run stopped before saving anything non-finite: its checkpoint, if any,
    is the one of ``checkpoint_epoch`` (``None``: none was written).
    ``nonfinite_params`` lists the key paths of the weights that went
    non-finite; ``message`` says it all in one sentence.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    objective: float
    finite_loss: bool
    finite_params: bool
    nonfinite_params: tuple[str, ...]
    checkpoint_epoch: int | None
    message: str
    kind: ClassVar[str] = "diverged"


Status = Completed | Stopped | Diverged


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: the final parameters (numpy); for a diverged run, the last finite ones (its checkpoint's).
      history: one dict per epoch trained, as in ``metrics.json`` (``epoch``, ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``seconds``, ``images_per_second``,
        and ``val_loss``, ``val_accuracy`` with a validation split), resumed epochs included.
      test_accuracy: the last epoch's test accuracy (``None`` if no epoch was trained).
      best: the best-on-validation epoch (``epoch``, ``val_accuracy``, ``val_loss``, ``test_accuracy``) or ``None``.
      run_dir: the run directory.
      status: :class:`Completed`, :class:`Stopped` or :class:`Diverged`.
      config: the :class:`Config` trained with.
      outputs: the files this process wrote in ``run_dir`` (only process 0 writes).
    """

    params: Any
    history: list
    test_accuracy: float | None
    best: dict | None
    run_dir: pathlib.Path
    status: Status
    config: Config
    outputs: tuple[str, ...]


# --- settings -----------------------------------------------------------------------------------------

#: Config fields whose default is the data set's recipe (:data:`jaxconv.train.RECIPES`), and the recipe's key.
RECIPE_FIELDS = {
    "model": "model",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "learning_rate",
    "schedule": "schedule",
    "warmup_epochs": "warmup_epochs",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "l2": "l2",
    "val_fraction": "val_fraction",
    "augment": "augment",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value, requirement: str) -> FitError:
    return FitError(f"`{name}` (={value!r}) must be {requirement} ({_flag(name)}).", name)


def _integer(name: str, value, low: int | None, high: int | None = None, optional: bool = False):
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        bounds = " and ".join(
            b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b
        )
        raise _bad(name, value, f"an int {bounds}".rstrip())


def _real(name: str, value, *, low: float, low_open: bool = False, high: float | None = None) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (high is None or value < high)
    )
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise _bad(name, value, f"a finite number {bounds}")
    return float(value)


def _choice(name: str, value, choices: Iterable[str]):
    choices = sorted(choices) if isinstance(choices, dict) else list(choices)
    if not isinstance(value, str) or value not in choices:
        raise _bad(name, value, f"one of {choices}")


def _boolean(name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(name, value, "True or False")


_T = TypeVar("_T")


def _filled(value: _T | None, name: str) -> _T:
    """A :class:`Config` field that ``__post_init__`` filled in (from the data set's recipe, or ``out``'s default)."""
    if value is None:
        raise FitError(f"{_flag(name)} is not set: the Config did not fill it in.", name)
    return value


def _run_dir(config: Config) -> pathlib.Path:
    """``config.out``, which ``__post_init__`` made a path (``runs/<dataset>-<model>`` by default)."""
    if config.out is None:
        raise FitError("--out is not set: the Config did not fill it in.", "out")
    return pathlib.Path(config.out)


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of a training run: the fields are ``python -m jaxconv train``'s flags (``--batch-size``
    is ``batch_size``), with the same defaults and the same checks.

    Fields left ``None`` among ``model``, ``epochs``, ``batch_size``,
    ``optimizer``, ``lr``, ``schedule``, ``warmup_epochs``, ``momentum``,
    ``weight_decay``, ``l2``, ``val_fraction`` and ``augment`` take the data
    set's recipe (:data:`jaxconv.train.RECIPES`) when the Config is made, so
    ``Config(dataset="cifar10").epochs == 10``; ``out`` defaults to
    ``runs/<dataset>-<model>``.  (``dataclasses.replace`` keeps the filled-in
    values: to switch data sets with their recipes, build a new Config.)

    A bad value raises :class:`FitError` (a ``ValueError``) naming the field and
    its value, when the Config is made; settings that need the data (a batch
    larger than the training set) or the machine (more devices than it has)
    are checked by :func:`fit` before it trains.
    """

    model: str | None = None
    dataset: str = "digits"
    data_dir: str | os.PathLike | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    l2: float | None = None
    val_fraction: float | None = None
    augment: bool | None = None
    seed: int = 0
    devices: int = 1
    onednn: bool = False
    out: str | os.PathLike | None = None
    stop_after: int | None = None
    resume: bool = False
    overwrite: bool = False
    check_grads: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False
    init_timeout: int = 60

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        recipe = RECIPES[self.dataset]
        for name, key in RECIPE_FIELDS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, recipe[key])
        _choice("model", self.model, MODELS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _integer("epochs", self.epochs, 1)
        _integer("batch_size", self.batch_size, 1)
        _integer("seed", self.seed, 0, MAX_SEED)
        _integer("devices", self.devices, 1)
        _integer("stop_after", self.stop_after, 1, optional=True)
        _integer("num_processes", self.num_processes, 1, optional=True)
        _integer("process_id", self.process_id, 0, optional=True)
        _integer("init_timeout", self.init_timeout, 1)
        for name in (
            "epochs",
            "batch_size",
            "seed",
            "devices",
            "stop_after",
            "num_processes",
            "process_id",
            "init_timeout",
        ):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        reals = {
            "lr": {"low": 0, "low_open": True},
            "warmup_epochs": {"low": 0},
            "momentum": {"low": 0, "high": 1},
            "weight_decay": {"low": 0},
            "l2": {"low": 0},
            "val_fraction": {"low": 0, "high": 1},
        }
        for name, bounds in reals.items():
            object.__setattr__(self, name, _real(name, getattr(self, name), **bounds))
        for name in ("augment", "onednn", "resume", "overwrite", "check_grads", "distributed"):
            _boolean(name, getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise _bad(name, value, "a path")
        if self.coordinator is not None and not isinstance(self.coordinator, str):
            raise _bad("coordinator", self.coordinator, "'HOST:PORT'")
        if self.out is None:
            object.__setattr__(self, "out", pathlib.Path(f"runs/{self.dataset}-{self.model}"))
        else:
            object.__setattr__(self, "out", pathlib.Path(self.out))

        if self.resume and self.overwrite:
            raise FitError("--resume and --overwrite exclude each other.", "resume", "overwrite")
        if self.warmup_epochs >= self.epochs:
            raise FitError(
                f"--warmup-epochs {self.warmup_epochs} is the whole run ({self.epochs} epochs).",
                "warmup_epochs",
                "epochs",
            )
        if self.dataset != "digits" and self.data_dir is None:
            raise FitError(
                f"--dataset {self.dataset} is read from files: name their directory with --data-dir.",
                "dataset",
                "data_dir",
            )
        if self.devices > 1 and self.batch_size % self.devices:
            raise FitError(
                f"--batch-size {self.batch_size} must be divisible by --devices {self.devices}.",
                "batch_size",
                "devices",
            )
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise FitError(
                "--coordinator, --num-processes and --process-id go together (or give --distributed alone).",
                "coordinator",
                "num_processes",
                "process_id",
            )
        if self.coordinator is not None:
            _coordinator_address(self.coordinator)
        if all(given) and self.process_id >= self.num_processes:
            raise FitError(
                f"--process-id {self.process_id} must be less than --num-processes {self.num_processes}.",
                "process_id",
                "num_processes",
            )
        if self.several_processes and self.devices != 1:
            raise FitError(
                "--devices is for one process; with several, the mesh spans every process's devices.", "devices"
            )
        if self.onednn and (self.devices > 1 or self.several_processes):
            raise FitError(
                "--onednn runs its kernels as custom calls without a sharding rule, on one device: leave out "
                "--devices and the several-process options.",
                "onednn",
            )

    @property
    def several_processes(self) -> bool:
        """Whether the run spans processes (``coordinator``/``num_processes``/``process_id``, or ``distributed``)."""
        return self.distributed or self.coordinator is not None

    def settings(self) -> dict:
        """The run's settings as its checkpoints and ``metrics.json`` record them (``"config"``)."""
        record: dict[str, Any] = {"dataset": self.dataset}
        record.update({key: getattr(self, name) for name, key in RECIPE_FIELDS.items()})
        record.update(seed=self.seed, devices=self.devices)
        return record


#: Settings a resumed run must share with the checkpoint to continue the same trajectory
#: (and ``epochs`` too where the learning rate follows a schedule over the whole run).
_RESUME_KEYS = (
    "model",
    "dataset",
    "batch_size",
    "optimizer",
    "learning_rate",
    "schedule",
    "warmup_epochs",
    "momentum",
    "weight_decay",
    "l2",
    "val_fraction",
    "augment",
    "seed",
)

#: The extras training needs beyond the core install, by module.
_TRAIN_EXTRAS = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors"}


def _missing_extras() -> list[str]:
    missing = []
    for module, package in _TRAIN_EXTRAS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


#: The flag of each key of :meth:`Config.settings` whose flag is not ``--`` + the key.
_SETTING_FLAGS = {key: _flag(name) for name, key in RECIPE_FIELDS.items()}


def _resume_source(ckpt_path: pathlib.Path, best_path: pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """The file ``--resume`` continues from and a note if it is not ``checkpoint.safetensors``; ``ValueError``
    when the run directory holds neither checkpoint.

    Runs write ``checkpoint.safetensors`` before ``best.safetensors`` in each epoch, so a run killed between the two
    has its checkpoint.  Earlier versions wrote them the other way round: a run of theirs killed between the two
    holds only ``best.safetensors``, which is then the epoch's whole state (weights and optimizer) and continues."""
    if os.path.lexists(ckpt_path):
        return ckpt_path, None
    if os.path.lexists(best_path):
        return best_path, (
            f"{ckpt_path.name} does not exist (a run killed between writing {best_path.name} and it); resuming from "
            f"{best_path.name}, which holds the whole state of the epoch it was written in"
        )
    raise ValueError(
        f"{ckpt_path.parent} holds no run to resume (no {ckpt_path.name}): drop --resume to start the run there."
    )


def _resumed(ckpt_path, template, settings: dict, stats, fingerprint: dict):
    """``(state, epoch, history, best)`` from the checkpoint of the run being resumed;
    ``ValueError`` if it does not fit.  The settings are compared first: a changed ``--optimizer`` or ``--model``
    is named as such, not as arrays that do not fit."""
    meta = checkpoint.read_metadata(ckpt_path)
    problems = []
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt_path}: its metadata has no 'config' object (hand-edited?).")
    epoch, history = meta.get("epoch"), meta.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{ckpt_path}: its metadata 'epoch' (={epoch!r}) is not an epoch count (hand-edited?).")
    if not (isinstance(history, list) and len(history) == epoch and all(isinstance(h, dict) for h in history)):
        raise ValueError(
            f"{ckpt_path}: its metadata 'history' does not list the {epoch} epochs trained (hand-edited?)."
        )
    keys = _RESUME_KEYS + (("epochs",) if settings["schedule"] != "constant" else ())
    differ = {k: (saved.get(k), settings[k]) for k in keys if saved.get(k) != settings[k]}
    if differ:
        problems.append(
            ", ".join(
                f"{_SETTING_FLAGS.get(k, _flag(k))} (the checkpoint's {a!r}, now {b!r})" for k, (a, b) in differ.items()
            )
        )
        if "epochs" in differ:
            problems.append(f"the same --epochs: the {settings['schedule']} schedule spans the whole run")
    saved_data = meta.get("data")
    if not isinstance(saved_data, dict):
        raise ValueError(f"{ckpt_path}: its metadata has no 'data' fingerprint of the training images (hand-edited?).")
    if saved_data != fingerprint:
        changed = [
            f"{key} {saved_data.get(key)!r} then, {fingerprint[key]!r} now"
            for key in fingerprint
            if saved_data.get(key) != fingerprint[key]
        ]
        problems.append("the same training images (" + "; ".join(changed) + ")")
    saved_stats = meta.get("standardization")
    if (
        saved_data == fingerprint
        and saved_stats is not None
        and [saved_stats.get("mean"), saved_stats.get("std")] != list(stats)
    ):
        problems.append(
            f"the same training images (their mean/std were {saved_stats.get('mean')}/"
            f"{saved_stats.get('std')}, now {stats[0]}/{stats[1]})"
        )
    if problems:
        raise ValueError(f"{ckpt_path} was written with other settings; --resume needs the same " + "; ".join(problems))
    state, _ = checkpoint.restore(ckpt_path, template)
    best = meta.get("best") if isinstance(meta.get("best"), dict) else None
    return state, epoch, history, best


def _read_bytes(path: pathlib.Path) -> bytes:
    """The bytes of the regular file ``path`` (``ValueError`` for a symbolic link or a special file, never followed;
    ``OSError`` if unreadable)."""
    if os.path.islink(path):
        raise ValueError(f"{str(path)!r} is a symbolic link; not followed")
    with files.open_regular(path, lambda kind: ValueError(f"{str(path)!r} is {kind}, not a regular file")) as (f, _):
        return f.read()


def _repair_run(out: pathlib.Path, source: pathlib.Path, epoch: int, history: list, best: dict | None) -> list[str]:
    """Bring the run's other files up to the checkpoint ``source`` (at ``epoch``) that ``--resume`` continues:
    what a kill between the writes of an epoch leaves behind.  Copies ``source`` to ``checkpoint.safetensors``
    where it is missing, and to ``best.safetensors`` where the checkpoint's best epoch is its own epoch but
    ``best.safetensors`` holds another (or none); returns the repairs made, with ``"metrics.json"`` first
    when ``metrics.json`` is missing or lists other epochs than the checkpoint's history (the caller rewrites it)."""
    repairs = []
    metrics_path = out / "metrics.json"
    try:
        recorded = json.loads(_read_bytes(metrics_path)).get("epochs")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != history:
        repairs.append("metrics.json")
        repairs.append(
            f"metrics.json listed {len(recorded) if isinstance(recorded, list) else 'no'} epochs, the checkpoint "
            f"{len(history)}: rewritten from the checkpoint's history"
        )
    ckpt_path, best_path = out / "checkpoint.safetensors", out / "best.safetensors"
    if source != ckpt_path:
        checkpoint.atomic_write_bytes(ckpt_path, _read_bytes(source))
        repairs.append(f"{ckpt_path.name} rewritten from {source.name} (epoch {epoch})")
    if best is not None and best.get("epoch") == epoch and epoch > 0:
        try:
            best_epoch = checkpoint.read_metadata(best_path).get("epoch")
        except (OSError, ValueError):
            best_epoch = None
        if best_epoch != epoch:
            checkpoint.atomic_write_bytes(best_path, _read_bytes(source))
            repairs.append(
                f"{best_path.name} held epoch {best_epoch}, the checkpoint's best is its own epoch {epoch}: "
                f"rewritten from {source.name}"
            )
    return repairs


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> dict:
    """What identifies a training set: ``{"images": count, "shape": image shape, "sha256": of the images'
    float32 bytes then the labels' int64 bytes}``; recorded in each checkpoint and compared on resume."""
    images = np.ascontiguousarray(images, np.float32)
    labels = np.ascontiguousarray(labels, np.int64)
    digest = hashlib.sha256(images.data)
    digest.update(labels.data)
    return {"images": int(images.shape[0]), "shape": list(images.shape[1:]), "sha256": digest.hexdigest()}


def _coordinator_address(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad("coordinator", coordinator, "'HOST:PORT' with a port from 1 to 65535")
    return host.strip("[]"), int(port)


#: What the processes say to each other in :func:`_rendezvous`.
_HELLO, _GO, _TAKEN, _OTHER_COUNT, _MISSING = b"jaxconv-train process ", b"go", b"taken", b"processes ", b"missing "


def _read_line(conn: socket.socket, deadline: float) -> bytes:
    """One line from ``conn`` (without its newline) before ``deadline``; ``b""`` on EOF; ``TimeoutError`` after."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(256)
        if not chunk:
            return b""
        data += chunk
        if len(data) > 256:
            return data
    return data[:-1]


def _rendezvous(config: Config) -> dict[int, socket.socket]:
    """Meet every process of the run over plain TCP on the coordinator's port, within ``config.init_timeout``
    seconds, before ``jax.distributed.initialize``: that call aborts the process (SIGABRT from C++, after its own
    timeout) when a process never comes, and process 0's coordination service crashes on a port in use.  So:
    process 0 binds the port (``FitError`` if it is in use) and waits for the other ``num_processes - 1`` to
    connect and name their ids; every other process connects (retrying until the coordinator listens); once all
    are there, process 0 answers each, closes the port, and all call ``jax.distributed.initialize``.  A process
    that did not arrive ends with ``FitError`` on every process that waited for it.

    Returns the connections, which stay open for the run (:mod:`jaxconv.train.peers` watches them): process 0's
    to every other process by id, another process's ``{0: its connection to process 0}``."""
    coordinator = _filled(config.coordinator, "coordinator")
    num_processes, process_id = _filled(config.num_processes, "num_processes"), _filled(config.process_id, "process_id")
    host, port = _coordinator_address(coordinator)
    timeout, deadline = config.init_timeout, time.monotonic() + config.init_timeout
    if num_processes == 1:
        return {}
    if process_id == 0:
        try:
            server = socket.create_server(("", port), reuse_port=False)
        except OSError as err:
            raise FitError(
                f"--coordinator {coordinator}: process 0 cannot listen on port {port}: "
                f"{err.strerror or err} (another program, or another run, uses it: choose another port).",
                "coordinator",
            ) from err
        arrived: dict[int, socket.socket] = {}
        kept = False
        try:
            with server:
                while len(arrived) < num_processes - 1:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = sorted(set(range(1, num_processes)) - set(arrived))
                        for conn in arrived.values():  # those waiting learn why they stop
                            with contextlib.suppress(OSError):
                                conn.sendall(_MISSING + ",".join(map(str, missing)).encode() + b"\n")
                        raise FitError(
                            f"--init-timeout {timeout}: process{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} of --num-processes {num_processes} did not "
                            f"connect to --coordinator {coordinator} within {timeout} s; not training.",
                            "init_timeout",
                            "coordinator",
                        )
                    server.settimeout(left)
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        continue
                    try:
                        line = _read_line(conn, min(deadline, time.monotonic() + 5))
                    except (TimeoutError, OSError):
                        conn.close()
                        continue
                    ident, _, count = (line[len(_HELLO) :] if line.startswith(_HELLO) else b"").partition(b" of ")
                    answer = None
                    if count != str(num_processes).encode():
                        answer = _OTHER_COUNT + str(num_processes).encode()
                    elif not ident.isdigit() or not 0 < int(ident) < num_processes or int(ident) in arrived:
                        answer = _TAKEN
                    if answer is not None:
                        with contextlib.suppress(OSError):
                            conn.sendall(answer + b"\n")
                        conn.close()
                        continue
                    arrived[int(ident)] = conn
            for conn in arrived.values():
                with contextlib.suppress(OSError):
                    conn.sendall(_GO + b"\n")
            kept = True
            return arrived
        finally:
            if not kept:
                for conn in arrived.values():
                    conn.close()
    waited = False  # whether process 0 took this process in and it waited for the others
    while True:
        left = deadline - time.monotonic()
        if left <= 0 and waited:
            raise FitError(
                f"--init-timeout {timeout}: process 0 at --coordinator {coordinator} is up, but not all "
                f"--num-processes {num_processes} processes connected to it within {timeout} s; not training.",
                "init_timeout",
                "coordinator",
            )
        if left <= 0:
            raise FitError(
                f"--init-timeout {timeout}: process {process_id} did not get to process 0 at --coordinator "
                f"{coordinator} within {timeout} s (is process 0 running there, and are all "
                f"--num-processes {num_processes} processes started?); not training.",
                "init_timeout",
                "coordinator",
            )
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 5))
        except OSError:
            time.sleep(min(0.2, max(left, 0)))
            continue
        try:
            conn.sendall(_HELLO + f"{process_id} of {num_processes}\n".encode())
            answer = _read_line(conn, deadline)
        except TimeoutError:
            conn.close()
            waited = True
            continue
        except OSError:
            conn.close()
            continue
        if answer == _GO:
            return {0: conn}
        conn.close()
        if answer == _TAKEN:
            raise FitError(
                f"--process-id {process_id}: another process of the run at --coordinator "
                f"{coordinator} has that id already.",
                "process_id",
            )
        if answer.startswith(_OTHER_COUNT):
            raise FitError(
                f"--num-processes {num_processes}: process 0 at --coordinator {coordinator} runs with "
                f"--num-processes {answer[len(_OTHER_COUNT) :].decode(errors='replace')}; start every process with "
                f"the same flags but --process-id.",
                "num_processes",
            )
        if answer.startswith(_MISSING):
            raise FitError(
                f"--init-timeout {timeout}: process(es) {answer[len(_MISSING) :].decode(errors='replace')} of "
                f"--num-processes {num_processes} did not connect to --coordinator {coordinator} within {timeout} s; "
                f"not training.",
                "init_timeout",
                "coordinator",
            )
        time.sleep(0.2)  # not process 0 of a jaxconv run yet (or it went away): try again until the deadline


def _initialize_distributed(config: Config) -> bool:
    """``jax.distributed.initialize`` as ``config`` asks; whether it asked.  ``FitError`` if it fails.

    With ``coordinator`` the processes first meet in :func:`_rendezvous` (a missing process or a port in use is
    a ``FitError`` within ``init_timeout``, not an abort); ``distributed`` alone leaves the cluster to jax."""
    if not config.several_processes:
        return False
    # CPU processes need a collectives implementation for their all-reduces (GPUs bring NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with contextlib.suppress(AttributeError, ValueError):  # unused, and it logs its own errors on a lost process
        jax.config.update("jax_enable_preemption_service", False)
    try:
        if config.coordinator is not None:
            conns = _rendezvous(config)
            if conns:  # from here on a lost process ends the others with a message (exit 2), not jax's abort
                peers.start(
                    _filled(config.process_id, "process_id"),
                    _filled(config.num_processes, "num_processes"),
                    conns,
                    str(_run_dir(config)),
                )
            jax.distributed.initialize(
                config.coordinator,
                num_processes=config.num_processes,
                process_id=config.process_id,
                initialization_timeout=config.init_timeout,
            )
        else:
            jax.distributed.initialize(initialization_timeout=config.init_timeout)
    except (RuntimeError, ValueError) as err:
        if isinstance(err, FitError):
            raise
        raise FitError(f"jax.distributed.initialize failed: {err}", "coordinator", "distributed") from err
    _same_config(config)
    return True


#: The Config fields that may differ between the processes of one run.
_PER_PROCESS = ("process_id",)


def _same_config(config: Config) -> None:
    """``FitError`` on every process unless all processes run with the same Config (all its fields but
    ``process_id``): each all-gathers a 32-bit hash of each field's value."""
    names = [f.name for f in dataclasses.fields(config) if f.name not in _PER_PROCESS]
    mine = np.asarray(
        [
            int.from_bytes(hashlib.sha256(repr(getattr(config, n)).encode()).digest()[:4], "little", signed=True)
            for n in names
        ],
        np.int32,
    )
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(names))
    differ = {}
    for j, name in enumerate(names):
        groups = sorted({int(h) for h in every[:, j]}, key=lambda h: list(every[:, j]).index(h))
        if len(groups) > 1:
            differ[name] = [[p for p in range(len(every)) if every[p, j] == h] for h in groups]
    if differ:
        me = jax.process_index()
        raise FitError(
            "the processes of this run were started with other settings: "
            + "; ".join(
                f"{_flag(name)} differs (processes "
                + " vs ".join(",".join(map(str, g)) for g in groups)
                + f"; process {me} has {getattr(config, name)!r})"
                for name, groups in differ.items()
            )
            + ". Start every process with the same flags but --process-id.",
            *differ,
        )


def _all_agree(code: int) -> int:
    """The largest of every process's ``code`` (0 = ready): all go on, or all stop."""
    if jax.process_count() == 1:
        return code
    return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def _host(tree):
    """Numpy copies of ``tree``'s arrays, from this process's first shard (replicated arrays: the whole)."""

    def get(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(leaf)

    return jax.tree.map(get, tree)


def _augmentation(seed: int, height: int, flip: bool):
    """``augment(step_number, images)``: :func:`jaxconv.train.augment_images` keyed by ``(seed, step)``,
    padding 1/8 of the image size (at least 1 pixel), flipping only where asked (CIFAR's scenes, not digits)."""
    base_key = jax.random.fold_in(jax.random.key(seed), 0xA06)
    pad = max(1, height // 8)

    def augment(step_number, images):
        return augment_images(jax.random.fold_in(base_key, step_number), images, pad=pad, flip=flip)

    return augment


class _Say:
    """Prints what the ``train`` command prints, or nothing (``verbose=False``)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def out(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def err(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


# --- the loop -----------------------------------------------------------------------------------------


Callback = Callable[[dict], Any]


def fit(config: Config, *, callbacks: Iterable[Callback] = (), verbose: bool = True) -> FitResult:
    """Train as ``config`` says, into the run directory ``config.out``; see the module docstring.

    Args:
      config: the run's settings (:class:`Config`).
      callbacks: called in order after each epoch, once that epoch's checkpoint
        and ``metrics.json`` are written, with the epoch's record (a new dict,
        the entry ``history`` and ``metrics.json`` get).  A callback that returns
        ``True`` or raises :class:`StopTraining` ends the run there (status
        :class:`Stopped`, ``reason="callback"``; ``Config(resume=True)`` continues
        it).  Any other exception propagates (the run directory is released; the
        checkpoint of that epoch stays).  With several processes every process
        calls its callbacks, and the run stops if any process asks.  A process of
        the run lost while training (its connection from the meeting closed) ends
        every other process with a message and ``os._exit(2)`` (see
        :mod:`jaxconv.train.peers`): jax's runtime cannot go on without it.
      verbose: print what ``python -m jaxconv train`` prints (a header line,
        a progress bar and a line per epoch on stderr, notes); ``False``: nothing.

    Returns a :class:`FitResult`; divergence is a status (:class:`Diverged`),
    not an exception.  Raises :class:`FitError` (a ``ValueError``, nothing
    trained) for settings, data or a run directory it cannot train with,
    :class:`GradCheckFailed` when ``check_grads`` finds a wrong rule.
    """
    if not isinstance(config, Config):
        raise TypeError(f"`config` must be a jaxconv.train.Config, got {type(config).__name__}.")
    callbacks = tuple(callbacks)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"`callbacks`: {callback!r} is not callable.")
    say = _Say(verbose)
    try:
        result = _fit(config, callbacks, say)
    except BaseException as err:
        watch = peers.current()
        if watch is not None and not watch.finished.is_set():
            if not isinstance(err, (FitError, GradCheckFailed, StopTraining, KeyboardInterrupt)):
                watch.failing(err)  # a collective broken by a lost process: the watch ends this process
            watch.finish(ok=False)
        raise
    watch = peers.current()
    if watch is not None:
        watch.finish(ok=True)
    return result


def _fit(config: Config, callbacks: tuple, say: _Say) -> FitResult:
    missing = _missing_extras()
    if missing:
        raise FitError(
            f"training needs {', '.join(missing)}, not installed: pip install 'jaxconv[train]' "
            f"(from a checkout: pip install -e '.[train]')."
        )
    if config.data_dir is not None and not pathlib.Path(config.data_dir).expanduser().is_dir():
        raise FitError(f"--data-dir {str(config.data_dir)!r} does not exist or is not a directory.", "data_dir")
    multi = _initialize_distributed(config)
    if config.onednn and not plan.onednn.available():  # plan.onednn loads the compiled handler when first asked for
        raise FitError(f"--onednn: {plan.onednn.status()}.", "onednn")

    out = _run_dir(config)
    lock, message = None, None
    if jax.process_index() == 0:
        try:
            lock = rundir.open_run(out, resume=config.resume, overwrite=config.overwrite)
        except rundir.RunDirError as err:
            message = f"--out: {err}"
    if _all_agree(int(message is not None)):
        raise FitError(message or "another process could not open the run directory; see its message.", "out")
    note = lock.stale_note() if lock is not None else None
    if note is not None:
        say.err(f"python -m jaxconv train: note: {note}")
    watch = peers.current()
    if watch is not None and lock is not None:
        watch.cleanup = lambda: _release(lock)
    try:
        if config.onednn:
            with plan.forms(conv_forward="onednn", conv_backward="onednn"):  # traced inside: these forms
                return _train(config, out, callbacks, say, lock, several=multi)
        if config.devices > 1 or config.several_processes:
            # A sharded step: the oneDNN custom calls have no sharding rule, so the planner keeps to XLA's forms.
            with plan.forms(onednn=False):
                return _train(config, out, callbacks, say, lock, several=multi)
        return _train(config, out, callbacks, say, lock, several=multi)
    except (rundir.RunDirError, files.WriteError) as err:
        # The run directory went away under the run, or a write failed (a full disk): the last whole checkpoint
        # stays; nothing more is written.
        raise FitError(f"--out: {err}", "out") from err
    finally:
        if lock is not None:
            with watch.writing() if watch is not None else contextlib.nullcontext():
                _release(lock)


def _release(lock: rundir.RunLock) -> None:
    """Give the run directory back, however the run ended (also from the peer watch of a several-process run)."""
    if lock.held:
        lock.restore_previous()  # a replaced run whose replacement failed before its first checkpoint
        lock.release(remove_directory=True)  # only if the run left nothing in it (it failed before writing)


def _train(
    config: Config, out: pathlib.Path, callbacks: tuple, say: _Say, lock: rundir.RunLock | None, *, several: bool
) -> FitResult:
    from tqdm import tqdm  # optional extra: train

    settings = config.settings()
    # The recipe's fields, which Config.__post_init__ filled in.
    model, epochs, batch_size = (
        _filled(config.model, "model"),
        _filled(config.epochs, "epochs"),
        _filled(config.batch_size, "batch_size"),
    )
    val_fraction, l2 = _filled(config.val_fraction, "val_fraction"), _filled(config.l2, "l2")
    writer = jax.process_index() == 0
    ckpt_path, best_path = out / "checkpoint.safetensors", out / "best.safetensors"
    watch = peers.current()
    # Process 0's writes of the run directory: a lost process ends this one between them, never inside one.
    writing = watch.writing if watch is not None else contextlib.nullcontext
    try:
        mesh = make_mesh() if several else (make_mesh(config.devices) if config.devices > 1 else None)
    except ValueError as err:
        raise FitError(f"--devices {config.devices}: {err}", "devices") from err
    if mesh is not None and batch_size % mesh.size:
        raise FitError(
            f"--batch-size {batch_size} must be divisible by the {mesh.size} devices of the mesh.", "batch_size"
        )
    try:
        dataset = data.load_dataset(config.dataset, config.data_dir)
        x_fit, y_fit, x_val_raw, y_val = split_validation(dataset.train_images, dataset.train_labels, val_fraction)
        stats = standardization(x_fit)
        fingerprint = data_fingerprint(dataset.train_images, dataset.train_labels)
    except (ValueError, OSError) as err:
        raise FitError(f"--dataset {config.dataset}: {err}", "dataset", "data_dir") from err
    if batch_size > len(y_fit):
        raise FitError(f"--batch-size {batch_size} exceeds the {len(y_fit)} training images.", "batch_size")
    steps_per_epoch = data.num_batches(len(y_fit), batch_size)
    try:
        optimizer = build_optimizer(settings, steps_per_epoch)
    except ValueError as err:
        raise FitError(str(err), "warmup_epochs") from err
    try:  # an image smaller than the model's windows: say so, not a shape error from inside a convolution
        check_input_shape(model, tuple(int(d) for d in dataset.train_images.shape[1:]))
    except ValueError as err:
        raise FitError(f"--dataset {config.dataset}: {err}", "dataset", "model") from err
    init_fun, apply_fun = MODELS[model](dataset.num_classes)
    augment = None
    if config.augment:
        augment = _augmentation(config.seed, dataset.train_images.shape[1], config.dataset == "cifar10")
    step = make_train_step(apply_fun, optimizer, l2=l2, mesh=mesh, augment=augment)

    x_train, x_test, x_val = standardize(x_fit, dataset.test_images, x_val_raw, stats=stats)
    y_train, y_test = y_fit, dataset.test_labels
    _, params = init_params(init_fun, x_train.shape, seed=config.seed)
    opt_state = init_optimizer(optimizer, params)
    start_epoch, history, best = 0, [], None
    repairs: list[str] = []
    if config.resume:
        failure = None
        try:
            source, note = _resume_source(ckpt_path, best_path)
            if note is not None:
                say.err(f"python -m jaxconv train: note: --resume: {note}")
            state, start_epoch, history, best = _resumed(
                source, {"params": params, "opt_state": opt_state}, settings, stats, fingerprint
            )
            if writer:
                with writing():
                    repairs = _repair_run(out, source, start_epoch, history, best)
        except (ValueError, OSError) as err:
            failure = FitError(f"--resume: {err}", "resume")
            failure.__cause__ = err
        # All processes resume, or all stop (a process that went on alone would wait in its first step).
        if _all_agree(int(failure is not None)):
            raise failure or FitError("--resume: another process could not resume; see its message.", "resume")
        params, opt_state = state["params"], state["opt_state"]
        if watch is not None:
            watch.saved(start_epoch or None)
    if mesh is not None:
        params, opt_state = replicate((params, opt_state), mesh)
    else:
        params, opt_state = jax.tree.map(jax.numpy.asarray, (params, opt_state))

    device = jax.devices()[0]
    num_devices = mesh.size if mesh is not None else 1
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(nn.partition_state(_host(params))[0]))
    say.out(
        f"jaxconv train: {model} ({num_params:,} params) on {dataset.name} "
        f"({len(y_train)} train / {len(y_val)} validation / {len(y_test)} test, {x_train.shape[1:]}), "
        f"{config.optimizer} lr {config.lr} {config.schedule}, "
        f"{num_devices} x {device.device_kind}"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", jax {jax.__version__}"
        + (f"; resuming after epoch {start_epoch}" if config.resume else "")
    )
    if device.platform == "cpu" and hostmem.environment() is not None:
        say.err(
            f"note: host memory: {hostmem.status().reason} (huge pages for XLA's large temporaries; "
            "python -m jaxconv train does so itself)"
        )

    if config.check_grads:
        images, labels = next(data.batches(x_train, y_train, batch_size, seed=config.seed, epoch=start_epoch))
        say.out(f"--check-grads: every hand rule of {model} on the first batch, float64, vs jax.grad:")
        start = time.perf_counter()
        table = io.StringIO()
        ok = check_model_grads(apply_fun, _host(params), images, labels, l2=l2, stream=table)
        if say.verbose:
            sys.stdout.write(table.getvalue())
        say.out(f"--check-grads: {'all rules agree' if ok else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
        if not ok:
            raise GradCheckFailed(
                "--check-grads found a hand rule that disagrees with jax.grad; not training.", table.getvalue()
            )

    environment = {
        "jax_version": jax.__version__,
        "jaxconv_version": __version__,
        "platform": device.platform,
        "device": device.device_kind,
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
        "host_memory": hostmem.status().reason,
    }
    outputs: list[str] = []

    def guard():
        if lock is not None:
            lock.check()  # RunDirError: the directory was removed or replaced while the run trained

    def write_metrics(**extra):
        if writer:
            with writing():
                guard()
                record = {**environment, "config": settings, "epochs": history, **extra}
                checkpoint.atomic_write_bytes(out / "metrics.json", strict_json_bytes(record))

    def result(status, final_params) -> FitResult:
        return FitResult(
            params=final_params,
            history=list(history),
            test_accuracy=history[-1]["test_accuracy"] if history else None,
            best=best,
            run_dir=out,
            status=status,
            config=config,
            outputs=tuple(sorted(set(outputs))),
        )

    if "metrics.json" in repairs:
        write_metrics(best=best)
        outputs.append("metrics.json")
    for repair in repairs:
        say.err(f"python -m jaxconv train: note: --resume: {repair} (a run killed between its writes)")
    end_epoch = epochs if config.stop_after is None else min(epochs, start_epoch + config.stop_after)
    stop: Stopped | None = None
    for epoch in range(start_epoch, end_epoch):
        if watch is not None:
            watch.at_epoch(epoch + 1)
        start = time.perf_counter()
        epoch_params = params  # finite: the last checkpoint's (nothing is donated, so it stays valid)
        batch_metrics: list = []
        checked = 0
        diverged = None

        with tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (writer and say.verbose),
        ) as bar:
            for i, indices in enumerate(data.epoch_batches(len(y_train), batch_size, seed=config.seed, epoch=epoch)):
                batch: tuple[Any, ...] = (x_train[indices], y_train[indices])
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                if augment is not None:
                    number = np.uint32(epoch * steps_per_epoch + i)
                    batch = (*batch, number if mesh is None else replicate(number, mesh))
                params, opt_state, metrics = step(params, opt_state, batch)
                batch_metrics.append(metrics)
                if i % 8 == 7 or i == steps_per_epoch - 1:
                    # Where the progress bar reads the metrics anyway: no extra host sync.
                    diverged, checked = _first_nonfinite(batch_metrics, checked)
                    if diverged is not None:
                        break
                    recent = _host(batch_metrics[-8:])
                    bar.set_postfix(
                        loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                        acc=f"{np.mean([m['accuracy'] for m in recent]):.3f}",
                        img_s=f"{(i + 1) * batch_size / (time.perf_counter() - start):.0f}",
                        refresh=False,
                    )
                bar.update(1)
        if diverged is not None:
            index, m = diverged
            replacing = lock is not None and bool(lock.previous)
            kept = (history[-1]["epoch"] if history else start_epoch) if ckpt_path.exists() and not replacing else None
            diverged_status = _diverged(
                config, epoch + 1, index + 1, steps_per_epoch, m, _host(params), kept, replacing=replacing
            )
            if replacing:  # nothing of this run is kept: the run it was to replace stays as it was
                return result(diverged_status, _host(epoch_params))
            d = diverged_status
            write_metrics(
                stopped={
                    "reason": "diverged",
                    "epoch": d.epoch,
                    "step": d.step,
                    "loss": d.loss,
                    "objective": d.objective,
                    "finite_loss": d.finite_loss,
                    "finite_params": d.finite_params,
                }
            )
            if writer:
                outputs.append("metrics.json")
            return result(diverged_status, _host(epoch_params))
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        batch_metrics = _host(batch_metrics)
        host_params = _host(params)
        test = evaluate(apply_fun, host_params, x_test, y_test, batch_size=512)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean([m["loss"] for m in batch_metrics])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in batch_metrics])),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": seconds,
            "images_per_second": steps_per_epoch * batch_size / seconds,
        }
        improved = False
        if len(y_val):
            val = evaluate(apply_fun, host_params, x_val, y_val, batch_size=512)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            improved = best is None or (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best = {
                    "epoch": epoch + 1,
                    "val_accuracy": val["accuracy"],
                    "val_loss": val["loss"],
                    "test_accuracy": test["accuracy"],
                }
        history.append(record)
        say.err(
            f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
            + (f", validation accuracy {record['val_accuracy']:.2%}" if len(y_val) else "")
            + f", test loss {test['loss']:.4f}, test accuracy {test['accuracy']:.2%}"
            + (" (best so far)" if improved else "")
        )
        history = json_safe(history)
        meta = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "config": settings,
            "history": history,
            "jax_version": jax.__version__,
            # What evaluation and prediction need besides the weights: a checkpoint alone is enough.
            "model": {
                "name": model,
                "num_classes": dataset.num_classes,
                "input_shape": list(x_train.shape[1:]),
                "steps_per_epoch": steps_per_epoch,
            },
            "standardization": {"mean": stats[0], "std": stats[1]},
            "data": fingerprint,
            "best": best,
        }
        if writer:
            tree = {"params": host_params, "opt_state": _host(opt_state)}
            with writing():  # the epoch's writes, whole: a lost process ends this one before or after them
                if lock is not None:
                    lock.set_previous_aside()  # --overwrite: the previous run makes way for this one's first files
                guard()
                # The checkpoint first: a run killed after it and before best.safetensors or metrics.json continues
                # with --resume, which rewrites those two from the checkpoint (_repair_run).
                checkpoint.save(ckpt_path, tree, meta)
                outputs.append(ckpt_path.name)
                if improved:
                    checkpoint.save(best_path, tree, meta)
                    outputs.append(best_path.name)
                write_metrics(best=best)
                outputs.append("metrics.json")
                if lock is not None:
                    lock.discard_previous()
                if watch is not None:
                    watch.saved(epoch + 1)
        else:
            write_metrics(best=best)
        # Every process calls its callbacks and takes part in the vote (one all-gather an epoch; none alone).
        vote = _all_agree(int(_ask_callbacks(callbacks, history[-1])))
        if watch is not None and not writer:
            watch.saved(epoch + 1)  # process 0 took part in the vote: it had written this epoch's checkpoint
        if vote and epoch + 1 < epochs:
            stop = Stopped(epoch=epoch + 1, epochs=epochs, reason="callback")
            break

    final_epoch = history[-1]["epoch"] if history else start_epoch
    status: Status
    if start_epoch >= epochs:
        say.err(f"nothing to train: {ckpt_path} is at epoch {start_epoch} >= --epochs {epochs}")
        status = Completed(epochs=final_epoch)
    elif stop is not None:
        status = stop
        say.err(f"stopped by a callback after epoch {stop.epoch} of {epochs}; continue with --resume")
    elif end_epoch < epochs:
        status = Stopped(epoch=end_epoch, epochs=epochs, reason="stop_after")
        say.err(
            f"stopped after epoch {end_epoch} of {epochs} (--stop-after {config.stop_after}); continue with --resume"
        )
    else:
        status = Completed(epochs=epochs)
    if isinstance(status, Stopped):
        write_metrics(best=best, stopped={"reason": status.reason, "epoch": status.epoch})
    final_params = _host(params)
    if writer:
        with writing():
            guard()
            plots.plot_curves(history, out / "curves.png", title=f"{model} on {dataset.name}")
            outputs.append("curves.png")
            kernel = plots.first_conv_kernel(final_params)
            if kernel is not None:
                plots.plot_filters(kernel, out / "filters.png", title=f"{model} first-layer filters")
                outputs.append("filters.png")
    return result(status, final_params)


def _first_nonfinite(batch_metrics: list, checked: int):
    """``((index, metrics) of the first step whose loss or weights went non-finite, or None; steps checked)``."""
    for offset, m in enumerate(_host(batch_metrics[checked:])):
        if not (m["finite_loss"] and m["finite_params"]):
            return (checked + offset, m), checked
    return None, len(batch_metrics)


def _ask_callbacks(callbacks: tuple, record: dict) -> bool:
    """Call every callback with a copy of ``record``; whether one asked to stop."""
    stop = False
    for callback in callbacks:
        try:
            stop |= callback(dict(record)) is True
        except StopTraining:
            stop = True
    return stop


def _diverged(
    config: Config,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    m: dict,
    params,
    kept: int | None,
    *,
    replacing: bool = False,
) -> Diverged:
    what = []
    bad = tuple(nonfinite_leaves(params)) if not m["finite_params"] else ()
    if not m["finite_loss"]:
        what.append(f"the objective is {float(m['objective'])}")
    if not m["finite_params"]:
        what.append(f"the updated parameters are not finite ({len(bad)} arrays, first {bad[0] if bad else '?'})")
    ckpt_path = _run_dir(config) / "checkpoint.safetensors"
    ckpt_note = f"{ckpt_path} is kept as it was, at epoch {kept}" if kept is not None else "no checkpoint was written"
    if replacing:
        ckpt_note += f" and the run in {config.out} that --overwrite was to replace is kept as it was"
    message = (
        f"training diverged at epoch {epoch}, step {step} of {steps_per_epoch}: {' and '.join(what)}. "
        f"Stopped; {ckpt_note}. Try a smaller --lr (now {config.lr})."
    )
    return Diverged(
        epoch=epoch,
        step=step,
        steps_per_epoch=steps_per_epoch,
        loss=float(m["loss"]),
        objective=float(m["objective"]),
        finite_loss=bool(m["finite_loss"]),
        finite_params=bool(m["finite_params"]),
        nonfinite_params=bad,
        checkpoint_epoch=kept,
        message=message,
    )
