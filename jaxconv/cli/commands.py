"""Command line: ``python -m jaxconv verify | train | evaluate | predict | check``."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import importlib
import inspect
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P



from .. import __version__, ops, plan
from .._core.jsonsafe import json_safe, strict_json_bytes
from ..nn import layers as nn
from ..nn import models
from ..nn.models import MODELS
from ..ops import losses
from ..plan import onednn
from ..train import checkpoint, data, plots, rundir, synthetic
from ..train import step as train
from ..train.data import DATASETS
from ..train.step import OPTIMIZERS, RECIPES, SCHEDULES
from ..verify import check_vjp
from ..verify import command as check_cli
from ..verify.registry import REGISTRY, SUITES, reference_ops


def _verify(args) -> int:


    ops = args.op or list(SUITES)
    unknown = [op for op in ops if op not in SUITES]
    if unknown:
        print(f"unknown op(s) {unknown}; known: {sorted(SUITES)}", file=sys.stderr)
        return 2
    print(f"jaxconv verify: float64, jax {jax.__version__}, device {jax.devices()[0].device_kind}")
    header = ("op", "configs", "max rel err vs jax.grad", "finite-diff err", "second-order err", "seconds", "result")
    rows = []
    failed = False
    for op in ops:
        start = time.perf_counter()
        # Inputs from their own stream: drawn from default_rng(seed) they would repeat the
        # checker's cotangents (check_vjp's seed), which for batch_norm makes the
        # cotangent an affine function of x and dL/dx vanish to rounding.
        rng = np.random.default_rng([args.seed, 1])
        cases = SUITES[op](rng)
        vjp_err = fd_err = so_err = 0.0
        bad = []
        for case in cases:
            report = check_vjp(case.f, case.ref, *case.args, names=case.names, name=f"{op} {case.label}", **case.options)
            vjp_err = max(vjp_err, report.worst("vjp"), report.worst("forward"))
            fd_err = max(fd_err, report.worst("finite-diff"))
            so_err = max(so_err, report.worst("second-order"))
            if not report.passed:
                bad.append(report)
        failed |= bool(bad)
        rows.append((op, str(len(cases)), f"{vjp_err:.1e}", f"{fd_err:.1e}", f"{so_err:.1e}",
                     f"{time.perf_counter() - start:.1f}", "FAIL" if bad else "pass"))
        print(f"  {op}: {len(cases)} configurations, {'FAIL' if bad else 'pass'}", file=sys.stderr)
        for report in bad:
            print(report, file=sys.stderr)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*header))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row))
    print("all passed" if not failed else "FAILED")
    return 1 if failed else 0


# --- train ---------------------------------------------------------------------------

#: ``python -m jaxconv train`` exit codes beyond argparse's 2 for bad settings.
EXIT_CHECK_FAILED = 1
EXIT_BAD_SETTINGS = 2
EXIT_DIVERGED = 3

#: The largest ``--seed``: seeds are stored as uint32 in the PRNG keys and the shuffles.
MAX_SEED = 2**32 - 1


def _number(kind, *, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type=``: a finite ``kind`` in [low, high] (or open at either end), else a parser error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(p for p in (lo, hi) if p)}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _recipe_table() -> str:

    keys = ("model", "epochs", "batch_size", "optimizer", "learning_rate", "schedule", "warmup_epochs",
            "momentum", "weight_decay", "l2", "val_fraction", "augment")
    names = list(RECIPES)
    rows = [("setting", *names)] + [(k, *(str(RECIPES[n][k]) for n in names)) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _add_train_parser(sub) -> None:

    p = sub.add_parser(
        "train",
        help="train a model with the hand-written rules (default: the bundled digits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a convnet on jaxconv's hand-derived VJP rules (optax); write per-epoch metrics "
        "(JSON), loss/accuracy curves and first-layer filters (PNG), the last checkpoint each epoch and the "
        "best-on-validation one.\n\n"
        "The run directory is locked for the run; one that already holds a run is refused unless --resume or "
        "--overwrite is given. A run whose loss or weights become NaN or infinite stops (exit 3) and keeps the "
        "last finite checkpoint. Exit codes: 0 done, 1 --check-grads failed, 2 bad settings, 3 diverged.\n\n"
        "Defaults: every setting left out comes from the data set's recipe (a recipe learns without tuning; "
        "the README gives the accuracies and times measured):\n\n" + _recipe_table(),
    )
    positive = _number(int, low=1)
    p.add_argument("--model", choices=sorted(MODELS), help="default: the recipe's")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (the default) is bundled with scikit-learn; the others are read from --data-dir")
    p.add_argument("--data-dir", help="directory of the MNIST/Fashion-MNIST IDX files or CIFAR-10 .bin files")
    p.add_argument("--epochs", type=positive, help="total epochs, also when resuming (default: the recipe's)")
    p.add_argument("--batch-size", type=positive, help="the global batch (default: the recipe's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="sgd, momentum (heavy ball), adam (coupled decay), adamw (decoupled) (default: the recipe's)")
    p.add_argument("--lr", type=_number(float, low=0, low_open=True), help="peak learning rate > 0 (default: the recipe's)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="constant; cosine decay to 0; step (/10 at 50%% and 75%% of the steps) (default: the recipe's)")
    p.add_argument("--warmup-epochs", type=_number(float, low=0),
                   help="linear warm-up from 0 over this many epochs (default: the recipe's)")
    p.add_argument("--momentum", type=_number(float, low=0, high=1, high_open=True),
                   help="in [0, 1), for --optimizer momentum (default: the recipe's)")
    p.add_argument("--weight-decay", type=_number(float, low=0),
                   help="coupled (added to the gradient), decoupled for adamw; >= 0 (default: the recipe's)")
    p.add_argument("--l2", type=_number(float, low=0), help="lambda of the L2 term in the objective (default: the recipe's)")
    p.add_argument("--val-fraction", type=_number(float, low=0, high=1, high_open=True),
                   help="fraction of the training set held out for validation and model selection, in [0, 1); "
                   "0 keeps no best checkpoint (default: the recipe's)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crops (zero padding of 1/8 of the size) and, for cifar10, horizontal flips, "
                   "inside the jitted step (default: the recipe's)")
    p.add_argument("--seed", type=_number(int, low=0, high=MAX_SEED), default=0,
                   help=f"initialisation, batch order and augmentation, 0 to {MAX_SEED} (default: 0)")
    p.add_argument("--devices", type=positive, default=1,
                   help="data parallel over this many local devices, a batch-sharded mesh (default: 1)")
    p.add_argument("--onednn", action="store_true",
                   help="run float32 convolutions through oneDNN's kernels (the optional 'onednn' forms, "
                   "pip install 'jaxconv[onednn]'; one process, one device); faster on CPU for LeNet-sized "
                   "nets (benchmarks/README.md)")
    p.add_argument("--out", help="output directory (default: runs/<dataset>-<model>)")
    p.add_argument("--stop-after", type=positive, metavar="N",
                   help="train at most N epochs in this invocation, then stop with a checkpoint (e.g. a job with a "
                   "time limit); --resume continues exactly where it stopped")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its checkpoints, metrics and plots are deleted first)")
    p.add_argument("--check-grads", action="store_true",
                   help="before training, check every hand rule the model uses against jax.grad (float64) on the "
                   "first batch; exit 1 on a mismatch")
    multi = p.add_argument_group(
        "several processes (jax.distributed)",
        "Run the same command once per process, each with its --process-id (or leave all three out where "
        "jax.distributed.initialize() detects them itself, e.g. under SLURM, and give --distributed). The mesh "
        "spans every process's devices; each process feeds its own rows of each global batch; process 0 writes "
        "the run directory.")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, reachable by every process")
    multi.add_argument("--num-processes", type=positive, help="how many processes take part")
    multi.add_argument("--process-id", type=_number(int, low=0), help="this process's rank, 0 to --num-processes - 1")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with what it detects from the cluster's environment")
    p.set_defaults(func=_train)


#: Settings a resumed run must share with the checkpoint to continue the same trajectory
#: (and ``epochs`` too where the learning rate follows a schedule over the whole run).
_RESUME_KEYS = ("model", "dataset", "batch_size", "optimizer", "learning_rate", "schedule", "warmup_epochs",
                "momentum", "weight_decay", "l2", "val_fraction", "augment", "seed")

class _RecordingOps:
    """An ``ops=`` namespace for :mod:`jaxconv.nn`: runs the op's registered reference and records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):

        if name not in REGISTRY:
            raise AttributeError(f"{name}: no reference registered in jaxconv.verify.registry.REGISTRY")
        reference_op = REGISTRY[name].ref

        def op(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return reference_op(*args, **kwargs)

        return op


def _shapes(tree) -> str:

    shapes = [str(tuple(leaf.shape)) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")]
    return " ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} arrays"


def check_model_grads(apply_fun, params, images, labels, *, l2=0.0, finite_differences=False,
                      stream=None) -> bool:
    """Check every hand rule ``apply_fun`` uses, at this batch's activations, against ``jax.grad``.

    Float64.  The network is run once with :mod:`jaxconv.reference` ops that
    record each call (op, its actual inputs, its options); then, for every
    distinct call (op, input shapes, options), :func:`jaxconv.verify.check_vjp`
    compares the ``jaxconv`` op (looked up at call time, its ``custom_vjp``
    rule) with the reference's autodiff: forward, VJP for two random
    cotangents, grad-of-grad; with ``finite_differences=True`` also central
    differences for the ops without kinks (``OpSpec.smooth``; the others are
    compared with jax.grad of the reference, which shares the convention at a
    kink; off by default: one more float64
    compile per argument, and ``python -m jaxconv verify`` and the tests run
    them on kink-free inputs already).  The loss rules
    (``softmax_cross_entropy`` on the logits, ``l2_penalty`` when ``l2 > 0``)
    are checked too, and finally the whole objective's gradient with respect to
    params and images, jaxconv ops against reference ops.  Prints a table to
    ``stream``; returns whether everything passed.
    """




    reference = reference_ops()
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(np.asarray(images), jnp.float64)
        labels = jnp.asarray(np.asarray(labels), jnp.int32)
        recorder = _RecordingOps()
        # Networks with batch normalisation are checked in training mode, the mode their gradients are taken in.
        mode = {"train": True} if nn.has_state(params64) else {}
        logits = apply_fun(params64, x64, ops=recorder, **mode)
        recorder.softmax_cross_entropy(logits, labels)
        if l2 > 0:
            recorder.l2_penalty(params64, l2)

        rows, passed = [], True
        seen = set()
        for name, args, kwargs in recorder.calls:
            key = (name, _shapes(args), repr(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            arg_names = list(inspect.signature(REGISTRY[name].op).parameters)[: len(args)]
            report = check_vjp(
                lambda *a, _name=name, _kw=kwargs: getattr(ops, _name)(*a, **_kw),
                partial(getattr(reference, name), **kwargs),
                *args,
                names=arg_names,
                finite_differences=finite_differences and REGISTRY[name].smooth,
                name=f"{name} {_shapes(args)}",
            )
            passed &= report.passed
            rows.append((name, _shapes(args), report))

        def objective(ops, loss_ops):
            def loss(p, x, y):
                value = loss_ops.softmax_cross_entropy(apply_fun(p, x, ops=ops, **mode), y)
                return value + loss_ops.l2_penalty(p, l2) if l2 > 0 else value

            return loss

        report = check_vjp(objective(None, ops), objective(reference, reference), params64, x64, labels,
                           names=["params", "images", "labels"], finite_differences=False, second_order=False,
                           name="whole objective")
        passed &= report.passed
        rows.append(("objective", f"{len(jax.tree.leaves(params64))} params, images {tuple(x64.shape)}", report))

    stream = sys.stdout if stream is None else stream
    header = ("rule", "inputs", "vjp rel err", "2nd order", "finite diff", "ok")
    table = [header] + [
        (name, shapes, f"{max(r.worst('vjp'), r.worst('forward')):.1e}",
         f"{r.worst('second-order'):.1e}" if any(c.kind == "second-order" for c in r.checks) else "-",
         f"{r.worst('finite-diff'):.1e}" if any(c.kind == "finite-diff" for c in r.checks) else "-",
         "yes" if r.passed else "NO")
        for name, shapes, r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)), file=stream)
    for _, _, r in rows:
        if not r.passed:
            print(r, file=stream)
    return bool(passed)


def _fail(message: str, code: int = EXIT_BAD_SETTINGS) -> int:
    print(f"python -m jaxconv train: error: {message}", file=sys.stderr)
    return code


class _Diverged(Exception):
    pass


def _resumed(ckpt_path, template, config, stats):
    """``(state, epoch, history, best)`` from the checkpoint of the run being resumed; ``ValueError`` if it does not fit."""

    state, meta = checkpoint.restore(ckpt_path, template)
    problems = []
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{ckpt_path}: its metadata has no 'config' object (hand-edited?).")
    epoch, history = meta.get("epoch"), meta.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{ckpt_path}: its metadata 'epoch' (={epoch!r}) is not an epoch count (hand-edited?).")
    if not (isinstance(history, list) and len(history) == epoch and all(isinstance(h, dict) for h in history)):
        raise ValueError(f"{ckpt_path}: its metadata 'history' does not list the {epoch} epochs trained (hand-edited?).")
    keys = _RESUME_KEYS + (("epochs",) if config["schedule"] != "constant" else ())
    differ = {k: (saved.get(k), config[k]) for k in keys if saved.get(k) != config[k]}
    if differ:
        problems.append(", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in differ.items()))
        if "epochs" in differ:
            problems.append(f"the same --epochs: the {config['schedule']} schedule spans the whole run")
    saved_stats = meta.get("standardization")
    if saved_stats is not None and [saved_stats.get("mean"), saved_stats.get("std")] != list(stats):
        problems.append(f"the same training images (their mean/std were {saved_stats.get('mean')}/"
                        f"{saved_stats.get('std')}, now {stats[0]}/{stats[1]})")
    if problems:
        raise ValueError(f"{ckpt_path} was written with other settings; --resume needs the same " + "; ".join(problems))
    best = meta.get("best") if isinstance(meta.get("best"), dict) else None
    return state, epoch, history, best


#: The extras ``train`` needs beyond the core install, by module.
_TRAIN_EXTRAS = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors"}


def _missing_extras() -> list[str]:

    missing = []
    for module, package in _TRAIN_EXTRAS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _settings(args) -> dict:
    """The run's settings: the flags given, the rest from the data set's recipe."""

    recipe = RECIPES[args.dataset]
    given = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
             "learning_rate": args.lr, "schedule": args.schedule, "warmup_epochs": args.warmup_epochs,
             "momentum": args.momentum, "weight_decay": args.weight_decay, "l2": args.l2,
             "val_fraction": args.val_fraction, "augment": args.augment}
    config = {"dataset": args.dataset}
    config.update({k: recipe[k] if v is None else v for k, v in given.items()})
    config.update(seed=args.seed, devices=args.devices)
    return config


def build_optimizer(config: dict, steps_per_epoch: int):
    """The optax optimizer a run's settings describe (``config`` as a checkpoint's metadata holds it).

    Checkpoints of the previous release (no ``optimizer`` entry) were SGD with
    momentum at a constant rate.
    """

    total = int(config["epochs"]) * steps_per_epoch
    schedule = config.get("schedule", "constant")
    warmup = int(round(float(config.get("warmup_epochs", 0)) * steps_per_epoch))
    if warmup >= total:
        raise ValueError(f"--warmup-epochs {config.get('warmup_epochs')} is the whole run ({config['epochs']} epochs).")
    lr = config["learning_rate"]
    if schedule != "constant" or warmup:
        lr = train.make_schedule(lr, schedule, total_steps=total, warmup_steps=warmup)
    return train.make_optimizer(config.get("optimizer", "momentum"), lr, momentum=config["momentum"],
                                weight_decay=config["weight_decay"])


def _distributed(args):
    """``jax.distributed.initialize`` as the flags ask; ``None`` if they ask nothing, else an error message or ``True``."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if not any(given) and not args.distributed:
        return None
    if any(given) and not all(given):
        return "--coordinator, --num-processes and --process-id go together (or give --distributed alone)."
    if all(given) and args.process_id >= args.num_processes:
        return f"--process-id {args.process_id} must be less than --num-processes {args.num_processes}."
    if args.devices != 1:
        return "--devices is for one process; with several, the mesh spans every process's devices."

    # CPU processes need a collectives implementation for their all-reduces (GPUs bring NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if all(given):
            jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
        else:
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as err:
        return f"jax.distributed.initialize failed: {err}"
    return True


def _all_agree(code: int) -> int:
    """The largest of every process's ``code`` (0 = ready): all go on, or all stop."""

    if jax.process_count() == 1:
        return code

    return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def _train(args) -> int:

    missing = _missing_extras()
    if missing:
        return _fail(f"training needs {', '.join(missing)}, not installed: pip install 'jaxconv[train]' "
                     f"(from a checkout: pip install -e '.[train]').")
    config = _settings(args)
    out = pathlib.Path(args.out if args.out else f"runs/{args.dataset}-{config['model']}")
    if args.dataset != "digits" and args.data_dir is None:
        return _fail(f"--dataset {args.dataset} is read from files: name their directory with --data-dir.")
    if args.data_dir is not None and not pathlib.Path(args.data_dir).expanduser().is_dir():
        return _fail(f"--data-dir {args.data_dir!r} does not exist or is not a directory.")
    if args.devices > 1 and config["batch_size"] % args.devices:
        return _fail(f"--batch-size {config['batch_size']} must be divisible by --devices {args.devices}.")
    multi = _distributed(args)
    if isinstance(multi, str):
        return _fail(multi)
    if args.onednn:

        if args.devices > 1 or multi:
            return _fail("--onednn runs its kernels as host callbacks on one device: leave out --devices and the "
                         "several-process options.")
        if not onednn.available():
            return _fail(f"--onednn: the oneDNN library is not installed: {onednn.INSTALL_HINT}.")

    lock, code = None, 0
    if jax.process_index() == 0:
        try:
            lock = rundir.open_run(out, resume=args.resume, overwrite=args.overwrite)
        except rundir.RunDirError as err:
            code = _fail(f"--out: {err}")
    if _all_agree(code):
        return code or _fail("another process could not open the run directory; see its message.")
    if lock is not None and lock.stale_pid is not None:
        print(f"python -m jaxconv train: note: {lock.path} was left by process {lock.stale_pid}, which ended "
              f"without releasing it (killed?); the lock is stale and now held by process {os.getpid()}.",
              file=sys.stderr)
    try:
        if args.onednn:

            with plan.forms(conv_forward="onednn", conv_backward="onednn"):  # traced inside: these forms
                return _run(args, config, out)
        return _run(args, config, out)
    finally:
        if lock is not None:
            lock.release()
            if lock.created_directory:
                try:
                    out.rmdir()  # only if the run left nothing in it (it failed before writing)
                except OSError:
                    pass


def _host(tree):
    """Numpy copies of ``tree``'s arrays, from this process's first shard (replicated arrays: the whole)."""

    def get(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(leaf)

    return jax.tree.map(get, tree)


def _global(tree, sharding):
    """Every array of ``tree`` (the same in every process) as a global array with ``sharding``."""

    def put(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(put, tree)


def _batch_on_mesh(images, labels, indices, mesh):
    """The global batch ``images[indices]``, ``labels[indices]`` split over ``mesh``: each process gathers
    only the rows its own devices hold."""

    sharding = NamedSharding(mesh, P("batch"))

    def put(source):
        shape = (len(indices), *source.shape[1:])
        return jax.make_array_from_callback(shape, sharding, lambda index: source[indices[index[0]]])

    return put(images), put(labels)


def _augmentation(config: dict, height: int, flip: bool):
    """``augment(step_number, images)``: :func:`jaxconv.train.augment_images` keyed by ``(seed, step)``,
    padding 1/8 of the image size (at least 1 pixel), flipping only where asked (CIFAR's scenes, not digits)."""


    base_key = jax.random.fold_in(jax.random.key(config["seed"]), 0xA06)
    pad = max(1, height // 8)

    def augment(step_number, images):
        return train.augment_images(jax.random.fold_in(base_key, step_number), images, pad=pad, flip=flip)

    return augment


def _run(args, config: dict, out: pathlib.Path) -> int:
    from tqdm import tqdm  # optional extra: train

    writer = jax.process_index() == 0
    ckpt_path, best_path = out / "checkpoint.safetensors", out / "best.safetensors"
    try:
        if jax.process_count() > 1:
            mesh = Mesh(np.asarray(jax.devices()), ("batch",))
        else:
            mesh = train.make_mesh(args.devices) if args.devices > 1 else None
    except ValueError as err:
        return _fail(f"--devices {args.devices}: {err}")
    if mesh is not None and config["batch_size"] % mesh.size:
        return _fail(f"--batch-size {config['batch_size']} must be divisible by the {mesh.size} devices of the mesh.")
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir)
        x_fit, y_fit, x_val_raw, y_val = train.split_validation(dataset.train_images, dataset.train_labels,
                                                                config["val_fraction"])
        stats = train.standardization(x_fit)
    except (ValueError, OSError) as err:
        return _fail(f"--dataset {args.dataset}: {err}")
    if config["batch_size"] > len(y_fit):
        return _fail(f"--batch-size {config['batch_size']} exceeds the {len(y_fit)} training images.")
    steps_per_epoch = data.num_batches(len(y_fit), config["batch_size"])
    try:
        optimizer = build_optimizer(config, steps_per_epoch)
    except ValueError as err:
        return _fail(str(err))
    init_fun, apply_fun = models.MODELS[config["model"]](dataset.num_classes)
    augment = None
    if config["augment"]:
        augment = _augmentation(config, dataset.train_images.shape[1], args.dataset == "cifar10")
    step = train.make_train_step(apply_fun, optimizer, l2=config["l2"], mesh=mesh, augment=augment)

    x_train, x_test, x_val = train.standardize(x_fit, dataset.test_images, x_val_raw, stats=stats)
    y_train, y_test = y_fit, dataset.test_labels
    _, params = train.init_params(init_fun, x_train.shape, seed=config["seed"])
    opt_state = train.init_optimizer(optimizer, params)
    start_epoch, history, best = 0, [], None
    if args.resume:
        try:
            state, start_epoch, history, best = _resumed(ckpt_path, {"params": params, "opt_state": opt_state},
                                                         config, stats)
        except (ValueError, OSError) as err:
            return _fail(f"--resume: {err}")
        params, opt_state = state["params"], state["opt_state"]
    if mesh is not None:
        params, opt_state = _global((params, opt_state), NamedSharding(mesh, P()))
    else:
        params, opt_state = jax.tree.map(jax.numpy.asarray, (params, opt_state))

    device = jax.devices()[0]
    num_devices = mesh.size if mesh is not None else 1
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(nn.partition_state(_host(params))[0]))
    print(
        f"jaxconv train: {config['model']} ({num_params:,} params) on {dataset.name} "
        f"({len(y_train)} train / {len(y_val)} validation / {len(y_test)} test, {x_train.shape[1:]}), "
        f"{config['optimizer']} lr {config['learning_rate']} {config['schedule']}, "
        f"{num_devices} x {device.device_kind}"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f", jax {jax.__version__}" + (f"; resuming after epoch {start_epoch}" if args.resume else "")
    )

    if args.check_grads:
        images, labels = next(data.batches(x_train, y_train, config["batch_size"], seed=config["seed"],
                                           epoch=start_epoch))
        print(f"--check-grads: every hand rule of {config['model']} on the first batch, float64, vs jax.grad:")
        start = time.perf_counter()
        ok = check_model_grads(apply_fun, _host(params), images, labels, l2=config["l2"])
        print(f"--check-grads: {'all rules agree' if ok else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
        if not ok:
            return _fail("--check-grads found a hand rule that disagrees with jax.grad; not training.",
                         EXIT_CHECK_FAILED)

    environment = {"jax_version": jax.__version__, "jaxconv_version": __version__, "platform": device.platform,
                   "device": device.device_kind, "num_devices": num_devices, "num_processes": jax.process_count()}

    def write_metrics(**extra):
        if writer:
            record = {**environment, "config": config, "epochs": history, **extra}
            checkpoint.atomic_write_bytes(out / "metrics.json", strict_json_bytes(record))

    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    end_epoch = config["epochs"] if args.stop_after is None else min(config["epochs"], start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        start = time.perf_counter()
        batch_metrics = []
        checked = 0

        def check_finite():
            # Called where the progress bar reads the metrics anyway: no extra host sync.
            nonlocal checked
            for offset, m in enumerate(_host(batch_metrics[checked:])):
                if not (m["finite_loss"] and m["finite_params"]):
                    i = checked + offset
                    raise _Diverged(epoch + 1, i + 1, m, _host(params))
            checked = len(batch_metrics)

        try:
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config['epochs']}", unit="batch",
                      file=sys.stderr, dynamic_ncols=True, disable=not writer) as bar:
                for i, indices in enumerate(data.epoch_batches(len(y_train), config["batch_size"],
                                                                seed=config["seed"], epoch=epoch)):
                    if mesh is not None:
                        batch = _batch_on_mesh(x_train, y_train, indices, mesh)
                    else:
                        batch = (x_train[indices], y_train[indices])
                    if augment is not None:
                        number = np.uint32(epoch * steps_per_epoch + i)
                        batch = (*batch, number if mesh is None else _global(number, NamedSharding(mesh, P())))
                    params, opt_state, metrics = step(params, opt_state, batch)
                    batch_metrics.append(metrics)
                    if i % 8 == 7 or i == steps_per_epoch - 1:
                        check_finite()
                        recent = _host(batch_metrics[-8:])
                        bar.set_postfix(
                            loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                            acc=f"{np.mean([m['accuracy'] for m in recent]):.3f}",
                            img_s=f"{(i + 1) * config['batch_size'] / (time.perf_counter() - start):.0f}",
                            refresh=False,
                        )
                    bar.update(1)
        except _Diverged as diverged:
            stopped_epoch, stopped_step, m, last_params = diverged.args
            what = []
            if not m["finite_loss"]:
                what.append(f"the objective is {float(m['objective'])}")
            if not m["finite_params"]:
                bad = train.nonfinite_leaves(last_params)
                what.append(f"the updated parameters are not finite ({len(bad)} arrays, first {bad[0] if bad else '?'})")
            ckpt_note = (f"{ckpt_path} is kept as it was, at epoch {start_epoch if not history else history[-1]['epoch']}"
                         if ckpt_path.exists() else "no checkpoint was written")
            message = (f"training diverged at epoch {stopped_epoch}, step {stopped_step} of {steps_per_epoch}: "
                       f"{' and '.join(what)}. Stopped; {ckpt_note}. Try a smaller --lr (now "
                       f"{config['learning_rate']}).")
            write_metrics(stopped={"reason": "diverged", "epoch": stopped_epoch, "step": stopped_step,
                                   "loss": float(m["loss"]), "objective": float(m["objective"]),
                                   "finite_loss": bool(m["finite_loss"]), "finite_params": bool(m["finite_params"])})
            return _fail(message, EXIT_DIVERGED)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        batch_metrics = _host(batch_metrics)
        host_params = _host(params)
        test = train.evaluate(apply_fun, host_params, x_test, y_test, batch_size=512)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean([m["loss"] for m in batch_metrics])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in batch_metrics])),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": seconds,
            "images_per_second": steps_per_epoch * config["batch_size"] / seconds,
        }
        improved = False
        if len(y_val):
            val = train.evaluate(apply_fun, host_params, x_val, y_val, batch_size=512)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            improved = best is None or (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best = {"epoch": epoch + 1, "val_accuracy": val["accuracy"], "val_loss": val["loss"],
                        "test_accuracy": test["accuracy"]}
        history.append(record)
        print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
              + (f", validation accuracy {record['val_accuracy']:.2%}" if len(y_val) else "")
              + f", test loss {test['loss']:.4f}, test accuracy {test['accuracy']:.2%}"
              + (" (best so far)" if improved else ""), file=sys.stderr)
        history = json_safe(history)
        meta = {
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "config": config, "history": history,
            "jax_version": jax.__version__,
            # What evaluation and prediction need besides the weights: a checkpoint alone is enough.
            "model": {"name": config["model"], "num_classes": dataset.num_classes,
                      "input_shape": list(x_train.shape[1:]), "steps_per_epoch": steps_per_epoch},
            "standardization": {"mean": stats[0], "std": stats[1]},
            "best": best,
        }
        if writer:
            tree = {"params": host_params, "opt_state": _host(opt_state)}
            if improved:
                checkpoint.save(best_path, tree, meta)
            checkpoint.save(ckpt_path, tree, meta)
        write_metrics(best=best)

    if start_epoch >= config["epochs"]:
        print(f"nothing to train: {ckpt_path} is at epoch {start_epoch} >= --epochs {config['epochs']}",
              file=sys.stderr)
    if end_epoch < config["epochs"]:
        print(f"stopped after epoch {end_epoch} of {config['epochs']} (--stop-after {args.stop_after}); "
              f"continue with --resume", file=sys.stderr)
    if not writer:
        return 0
    plots.plot_curves(history, out / "curves.png", title=f"{config['model']} on {dataset.name}")
    kernel = plots.first_conv_kernel(_host(params))
    if kernel is not None:
        plots.plot_filters(kernel, out / "filters.png", title=f"{config['model']} first-layer filters")
    final = history[-1]
    best_note = (f"; best on validation: epoch {best['epoch']} ({best['val_accuracy']:.2%} validation, "
                 f"{best['test_accuracy']:.2%} test), best.safetensors" if best else "")
    print(f"test accuracy {final['test_accuracy']:.2%} after {final['epoch']} epochs "
          f"({train_seconds:.1f} s of training); outputs in {out}/: metrics.json, curves.png"
          f"{', filters.png' if kernel is not None else ''}, checkpoint.safetensors{best_note}")
    return 0


# --- evaluate and predict -----------------------------------------------------------------


def _checkpoint_path(run, best: bool) -> pathlib.Path:
    """The checkpoint file of ``run``: a run directory (its last or best checkpoint) or a checkpoint file."""
    path = pathlib.Path(run)
    if path.is_dir():
        path = path / ("best.safetensors" if best else "checkpoint.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: {run} holds no such checkpoint"
                                    + (" (was the run trained with --val-fraction 0?)" if best else "") + ".")
    elif best:
        raise ValueError(f"--best needs a run directory, got the file {run}.")
    return path


def load_trained(path):
    """``(apply_fun, params, metadata)`` from a checkpoint ``train`` wrote: everything evaluation needs.

    ``path`` is a checkpoint file or a run directory (its ``checkpoint.safetensors``).
    The model is rebuilt from the metadata's ``model`` entry and the parameters
    restored into it (checksums verified).  Standardise inputs with
    ``train.standardize(images, stats=(m["mean"], m["std"]))`` where ``m =
    metadata["standardization"]``.  ``apply_fun(params, x)`` runs in evaluation
    mode (batch normalisation with its running statistics).  ``ValueError`` if
    the file is not such a checkpoint.
    """

    path = _checkpoint_path(path, best=False)
    meta = checkpoint.read_metadata(path)
    model, config, stats = meta.get("model"), meta.get("config"), meta.get("standardization")
    if not (isinstance(model, dict) and isinstance(config, dict) and isinstance(stats, dict)):
        raise ValueError(f"{path}: no 'model', 'config' and 'standardization' in its metadata: not a checkpoint "
                         f"written by `python -m jaxconv train` of this version.")
    try:
        init_fun, apply_fun = models.MODELS[model["name"]](int(model["num_classes"]))
        _, params = train.init_params(init_fun, (-1, *model["input_shape"]), seed=0)
        optimizer = build_optimizer(config, int(model.get("steps_per_epoch", 1)))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its metadata does not describe a model and optimizer ({err!r}).") from err
    state, meta = checkpoint.restore(path, {"params": params, "opt_state": train.init_optimizer(optimizer, params)})
    return apply_fun, state["params"], meta


def _command_error(command: str):
    """``error(message) -> EXIT_BAD_SETTINGS``, printing ``python -m jaxconv COMMAND: error: message``."""

    def error(message):
        print(f"python -m jaxconv {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    return error


def _standardized(images, meta):
    """``images`` standardised with the mean and std the checkpoint's model was trained with."""

    stats = meta["standardization"]
    return train.standardize(images, stats=(stats["mean"], stats["std"]))[0]


def _add_evaluate_parser(sub) -> None:

    p = sub.add_parser(
        "evaluate",
        help="accuracy, loss and a confusion matrix of a trained run on a data split",
        description="Evaluate a run of `python -m jaxconv train` from its checkpoint alone: the checkpoint says "
        "which model it holds and how its training images were standardised; the data set defaults to the one "
        "it was trained on. Prints accuracy and loss, writes a confusion-matrix PNG.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (or a checkpoint .safetensors file)")
    p.add_argument("--best", action="store_true", help="the best-on-validation checkpoint, not the last")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    p.add_argument("--data-dir", help="directory of the data set's files (not needed for digits)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="default: test")
    p.add_argument("--confusion", metavar="PNG",
                   help="where to write the confusion matrix (default: RUN_DIR/confusion-<split>.png)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with the confusion matrix)")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:


    error = _command_error("evaluate")

    try:
        path = _checkpoint_path(args.run, args.best)
        apply_fun, params, meta = load_trained(path)
        name = args.dataset or meta["config"]["dataset"]
        if name != "digits" and args.data_dir is None:
            return error(f"the {name} files are read from a directory: name it with --data-dir.")
        dataset = data.load_dataset(name, args.data_dir)
    except (ValueError, OSError) as err:
        return error(err)
    images, labels = ((dataset.test_images, dataset.test_labels) if args.split == "test"
                      else (dataset.train_images, dataset.train_labels))
    expected = tuple(meta["model"]["input_shape"])
    if images.shape[1:] != expected:
        return error(f"{name} images are {images.shape[1:]}, the model takes {expected}.")
    x = _standardized(images, meta)
    result = train.evaluate(apply_fun, params, x, labels, batch_size=512)
    predict = jax.jit(lambda p, batch: jax.numpy.argmax(apply_fun(p, batch), axis=-1))
    predictions = np.concatenate([np.asarray(predict(params, x[i : i + 512])) for i in range(0, len(x), 512)])
    matrix = plots.confusion_matrix(labels, predictions, dataset.num_classes)
    png = pathlib.Path(args.confusion) if args.confusion else path.parent / f"confusion-{args.split}.png"
    title = f"{meta['model']['name']}, epoch {meta.get('epoch')}, {name} {args.split}: {result['accuracy']:.2%}"
    try:
        plots.plot_confusion(matrix, png, title=title)
    except OSError as err:
        return error(f"cannot write the confusion matrix to {png}: {err}")
    if args.json:
        print(json.dumps({"checkpoint": str(path), "epoch": meta.get("epoch"), "dataset": name, "split": args.split,
                          "images": int(len(labels)), "accuracy": result["accuracy"], "loss": result["loss"],
                          "confusion_matrix": matrix.tolist(), "confusion_png": str(png)}))
    else:
        print(f"{meta['model']['name']} at epoch {meta.get('epoch')} on {name} ({args.split}, {len(labels)} images): "
              f"accuracy {result['accuracy']:.2%}, loss {result['loss']:.4f}; confusion matrix in {png}")
    return 0


def _read_image(path: pathlib.Path, shape: tuple) -> np.ndarray:
    """An image file (PNG, or NPY with values in [0, 1] or uint8) as float32 ``shape`` ``(H, W, C)`` in [0, 1]."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".png":
        import matplotlib.image  # optional extra: train

        array = matplotlib.image.imread(path)  # float in [0, 1] for PNG
    else:
        raise ValueError(f"{path}: not a .png or .npy file.")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: holds {array.dtype}, not pixel values.")
    array = np.asarray(array, np.float32)
    h, w, c = shape
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # drop PNG's alpha
    if array.ndim == 3 and c == 1 and array.shape[-1] == 3:
        array = array.mean(axis=-1)  # a colour image for a grey-scale model
    if array.ndim == 2 and c == 1:
        array = array[..., None]
    if array.shape != (h, w, c):
        raise ValueError(f"{path}: image {array.shape}, but the model takes {h}x{w} with {c} channel(s).")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{path}: pixel values must be finite and in [0, 1] (or uint8).")
    return array


def _add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained run",
        description="Classify images (PNG, or NPY with values in [0, 1] or uint8) with a run of `python -m jaxconv "
        "train`, from its checkpoint alone. Each image must have the model's input size; a colour PNG is averaged "
        "to grey for a grey-scale model. Prints the top-k classes and their probabilities.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (or a checkpoint .safetensors file)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help=".png or .npy files")
    p.add_argument("--best", action="store_true", help="the best-on-validation checkpoint, not the last")
    p.add_argument("--top-k", type=_number(int, low=1), default=3, help="classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    p.set_defaults(func=_predict)


def _predict(args) -> int:


    error = _command_error("predict")

    try:
        path = _checkpoint_path(args.run, args.best)
        apply_fun, params, meta = load_trained(path)
        shape = tuple(meta["model"]["input_shape"])
        images = np.stack([_read_image(pathlib.Path(p), shape) for p in args.images])
    except (ValueError, OSError) as err:
        return error(err)
    x = _standardized(images, meta)
    probabilities = np.asarray(jax.jit(lambda p, b: losses.softmax(apply_fun(p, b)))(params, x), np.float64)
    k = min(args.top_k, probabilities.shape[1])
    results = []
    for name, probs in zip(args.images, probabilities):
        top = np.argsort(-probs, kind="stable")[:k]
        results.append({"image": name, "top": [{"class": int(c), "probability": float(probs[c])} for c in top]})
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} ({t['probability']:.1%})" for t in r["top"]))
    return 0


def _add_synth_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write MNIST- or CIFAR-format check data made from the bundled digits",
        description="Write realistic stand-ins for MNIST (28x28 grey, IDX files) or CIFAR-10 (32x32 colour, "
        "binary records) made from scikit-learn's bundled digits (resampled, shifted, noisy; coloured for "
        "cifar10), to try the MNIST/CIFAR recipes where the real files are not at hand. Train images come "
        "from the digits' training split only, test images from its test split only.",
    )
    p.add_argument("format", choices=("mnist", "cifar10"))
    p.add_argument("directory", help="where to write the files (created if missing)")
    p.add_argument("--num-train", type=_number(int, low=5), help="default: 4000 (mnist), 5000 (cifar10)")
    p.add_argument("--num-test", type=_number(int, low=1), default=1000, help="default: 1000")
    p.add_argument("--seed", type=_number(int, low=0, high=MAX_SEED), default=0, help="default: 0")
    p.set_defaults(func=_synth)


def _synth(args) -> int:

    write = synthetic.write_mnist_like if args.format == "mnist" else synthetic.write_cifar_like
    num_train = args.num_train or (4000 if args.format == "mnist" else 5000)
    try:
        directory = write(args.directory, num_train=num_train, num_test=args.num_test, seed=args.seed)
    except OSError as err:
        print(f"python -m jaxconv synth: error: {err}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    print(f"wrote {num_train} train and {args.num_test} test {args.format}-format images to {directory}")
    return 0


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m jaxconv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="jaxconv: convnet layers whose backward passes are hand-derived custom_vjp rules.\n\n"
        "  verify    check every hand-written VJP against jax.grad in float64\n"
        "  train     train a model (default: the bundled digits)\n"
        "  evaluate  accuracy, loss and confusion matrix of a trained run\n"
        "  predict   classify image files with a trained run\n"
        "  synth     write MNIST/CIFAR-format check data made from the bundled digits\n"
        "  check     check your own custom_vjp rule against a reference\n\n"
        "`python -m jaxconv COMMAND --help` shows each command's options and defaults.")
    parser.add_argument("--version", action="version", version=f"jaxconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_verify = sub.add_parser("verify", help="check every hand-written VJP against jax.grad in float64")
    p_verify.add_argument("--op", action="append", help="only this op (repeatable; default: every op)")
    p_verify.add_argument("--seed", type=int, default=0, help="default: 0")
    p_verify.set_defaults(func=_verify)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_synth_parser(sub)

    check_cli.add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse has printed the usage and the error (or --help)
        return done.code if isinstance(done.code, int) else EXIT_BAD_SETTINGS
    return args.func(args)
