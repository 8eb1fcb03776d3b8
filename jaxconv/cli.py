"""Command line: ``python -m jaxconv verify | train | evaluate | check``."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

from ._json import json_safe, strict_json_bytes


def _verify(args) -> int:
    import jax

    from ._suite import SUITES
    from .verify import check_vjp

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
    import math

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


def _add_train_parser(sub) -> None:
    from .data import DATASETS
    from .models import MODELS
    from .train import DEFAULTS

    p = sub.add_parser(
        "train",
        help="train a model with the hand-written rules (default: the bundled digits)",
        description="Train a convnet with optax SGD on jaxconv's hand-derived VJP rules; write per-epoch "
        "metrics (JSON), loss/accuracy curves and first-layer filters (PNG), and a checkpoint each epoch. "
        "The run directory is locked for the run; one that already holds a run is refused unless --resume or "
        "--overwrite is given. A run whose loss or weights become NaN or infinite stops (exit 3) and keeps the "
        "last finite checkpoint. Exit codes: 0 done, 1 --check-grads failed, 2 bad settings, 3 diverged.",
    )
    positive = _number(int, low=1)
    p.add_argument("--model", choices=sorted(MODELS), default=DEFAULTS["model"])
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits is bundled with scikit-learn; the others are read from --data-dir")
    p.add_argument("--data-dir", help="directory of the MNIST/Fashion-MNIST IDX files or CIFAR-10 .bin files")
    p.add_argument("--epochs", type=positive, default=DEFAULTS["epochs"], help="total epochs (also when resuming)")
    p.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=_number(float, low=0, low_open=True), default=DEFAULTS["learning_rate"],
                   help="learning rate (> 0)")
    p.add_argument("--momentum", type=_number(float, low=0, high=1, high_open=True), default=DEFAULTS["momentum"],
                   help="in [0, 1)")
    p.add_argument("--weight-decay", type=_number(float, low=0), default=DEFAULTS["weight_decay"],
                   help="coupled, added to the gradient (>= 0)")
    p.add_argument("--l2", type=_number(float, low=0), default=DEFAULTS["l2"],
                   help="lambda of the L2 term in the objective (>= 0)")
    p.add_argument("--seed", type=_number(int, low=0, high=MAX_SEED), default=DEFAULTS["seed"],
                   help=f"initialisation and batch order, 0 to {MAX_SEED}")
    p.add_argument("--devices", type=positive, default=1, help="data parallel over this many devices (a batch-sharded mesh)")
    p.add_argument("--out", help="output directory (default runs/<dataset>-<model>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its checkpoint, metrics and plots are deleted first)")
    p.add_argument("--check-grads", action="store_true",
                   help="before training, check every hand rule the model uses against jax.grad (float64) on the "
                   "first batch; exit 1 on a mismatch")
    p.set_defaults(func=_train)


#: Hyperparameters a resumed run must share with the checkpoint to continue the same trajectory.
_RESUME_KEYS = ("model", "dataset", "batch_size", "learning_rate", "momentum", "weight_decay", "l2", "seed")

class _RecordingOps:
    """An ``ops=`` namespace for :mod:`jaxconv.nn`: runs the op's registered reference and records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        from ._suite import REGISTRY

        if name not in REGISTRY:
            raise AttributeError(f"{name}: no reference registered in jaxconv._suite.REGISTRY")
        reference_op = REGISTRY[name].ref

        def op(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return reference_op(*args, **kwargs)

        return op


def _shapes(tree) -> str:
    import jax

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
    import inspect
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxconv

    from ._suite import REGISTRY, reference_ops
    from .verify import check_vjp

    reference = reference_ops()
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(np.asarray(images), jnp.float64)
        labels = jnp.asarray(np.asarray(labels), jnp.int32)
        recorder = _RecordingOps()
        logits = apply_fun(params64, x64, ops=recorder)
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
                lambda *a, _name=name, _kw=kwargs: getattr(jaxconv, _name)(*a, **_kw),
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
                value = loss_ops.softmax_cross_entropy(apply_fun(p, x, ops=ops), y)
                return value + loss_ops.l2_penalty(p, l2) if l2 > 0 else value

            return loss

        report = check_vjp(objective(None, jaxconv), objective(reference, reference), params64, x64, labels,
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
    """``(state, epoch, history)`` from the checkpoint of the run being resumed; ``ValueError`` if it does not fit."""
    from . import checkpoint

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
    differ = {k: (saved.get(k), config[k]) for k in _RESUME_KEYS if saved.get(k) != config[k]}
    if differ:
        problems.append(", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in differ.items()))
    saved_stats = meta.get("standardization")
    if saved_stats is not None and [saved_stats.get("mean"), saved_stats.get("std")] != list(stats):
        problems.append(f"the same training images (their mean/std were {saved_stats.get('mean')}/"
                        f"{saved_stats.get('std')}, now {stats[0]}/{stats[1]})")
    if problems:
        raise ValueError(f"{ckpt_path} was written with other settings; --resume needs the same " + "; ".join(problems))
    return state, epoch, history


def _train(args) -> int:
    from . import rundir

    out = pathlib.Path(args.out if args.out else f"runs/{args.dataset}-{args.model}")
    if args.dataset != "digits" and args.data_dir is None:
        return _fail(f"--dataset {args.dataset} is read from files: name their directory with --data-dir.")
    if args.data_dir is not None and not pathlib.Path(args.data_dir).expanduser().is_dir():
        return _fail(f"--data-dir {args.data_dir!r} does not exist or is not a directory.")
    if args.devices > 1 and args.batch_size % args.devices:
        return _fail(f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}.")
    try:
        lock = rundir.open_run(out, resume=args.resume, overwrite=args.overwrite)
    except rundir.RunDirError as err:
        return _fail(f"--out: {err}")
    if lock.stale_pid is not None:
        print(f"python -m jaxconv train: note: {lock.path} was left by process {lock.stale_pid}, which ended "
              f"without releasing it (killed?); the lock is stale and now held by process {os.getpid()}.",
              file=sys.stderr)
    try:
        return _run(args, out)
    finally:
        lock.release()
        if lock.created_directory:
            try:
                out.rmdir()  # only if the run left nothing in it (it failed before writing)
            except OSError:
                pass


def _run(args, out: pathlib.Path) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from . import __version__, checkpoint, data, models, plots, train

    config = {
        "model": args.model, "dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay, "l2": args.l2,
        "seed": args.seed, "devices": args.devices,
    }
    ckpt_path = out / "checkpoint.safetensors"
    try:
        mesh = train.make_mesh(args.devices) if args.devices > 1 else None
    except ValueError as err:
        return _fail(f"--devices {args.devices}: {err}")
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir)
        stats = train.standardization(dataset.train_images)
    except (ValueError, OSError) as err:
        return _fail(f"--dataset {args.dataset}: {err}")
    if args.batch_size > len(dataset.train_labels):
        return _fail(f"--batch-size {args.batch_size} exceeds the {len(dataset.train_labels)} training images.")
    optimizer = train.default_optimizer(args.lr, args.momentum, args.weight_decay)
    init_fun, apply_fun = models.MODELS[args.model](dataset.num_classes)
    step = train.make_train_step(apply_fun, optimizer, l2=args.l2, mesh=mesh)

    x_train, x_test = train.standardize(dataset.train_images, dataset.test_images, stats=stats)
    y_train, y_test = dataset.train_labels, dataset.test_labels
    _, params = train.init_params(init_fun, x_train.shape, seed=args.seed)
    opt_state = optimizer.init(params)
    start_epoch, history = 0, []
    if args.resume:
        try:
            state, start_epoch, history = _resumed(ckpt_path, {"params": params, "opt_state": opt_state}, config, stats)
        except (ValueError, OSError) as err:
            return _fail(f"--resume: {err}")
        params, opt_state = state["params"], state["opt_state"]
    params, opt_state = jax.tree.map(jax.numpy.asarray, (params, opt_state))
    if mesh is not None:
        params, opt_state = train.replicate((params, opt_state), mesh)

    device = jax.devices()[0]
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    print(
        f"jaxconv train: {args.model} ({num_params:,} params) on {dataset.name} "
        f"({len(y_train)} train / {len(y_test)} test, {x_train.shape[1:]}), "
        f"{args.devices} x {device.device_kind}, jax {jax.__version__}"
        + (f"; resuming after epoch {start_epoch}" if args.resume else "")
    )

    if args.check_grads:
        images, labels = next(data.batches(x_train, y_train, args.batch_size, seed=args.seed, epoch=start_epoch))
        print(f"--check-grads: every hand rule of {args.model} on the first batch, float64, vs jax.grad:")
        start = time.perf_counter()
        ok = check_model_grads(apply_fun, jax.device_get(params), images, labels, l2=args.l2)
        print(f"--check-grads: {'all rules agree' if ok else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
        if not ok:
            return _fail("--check-grads found a hand rule that disagrees with jax.grad; not training.",
                         EXIT_CHECK_FAILED)

    environment = {"jax_version": jax.__version__, "jaxconv_version": __version__, "platform": device.platform,
                   "device": device.device_kind, "num_devices": args.devices}

    def write_metrics(**extra):
        record = {**environment, "config": config, "epochs": history, **extra}
        checkpoint.atomic_write_bytes(out / "metrics.json", strict_json_bytes(record))

    steps_per_epoch = data.num_batches(len(y_train), args.batch_size)
    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        batch_metrics = []
        checked = 0

        def check_finite():
            # Called where the progress bar reads the metrics anyway: no extra host sync.
            nonlocal checked
            for offset, m in enumerate(jax.device_get(batch_metrics[checked:])):
                if not (m["finite_loss"] and m["finite_params"]):
                    i = checked + offset
                    raise _Diverged(epoch + 1, i + 1, m, jax.device_get(params))
            checked = len(batch_metrics)

        try:
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                      file=sys.stderr, dynamic_ncols=True) as bar:
                for i, batch in enumerate(data.batches(x_train, y_train, args.batch_size, seed=args.seed,
                                                       epoch=epoch)):
                    if mesh is not None:
                        batch = train.shard_batch(batch, mesh)
                    params, opt_state, metrics = step(params, opt_state, batch)
                    batch_metrics.append(metrics)
                    if i % 8 == 7 or i == steps_per_epoch - 1:
                        check_finite()
                        recent = jax.device_get(batch_metrics[-8:])
                        bar.set_postfix(
                            loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                            acc=f"{np.mean([m['accuracy'] for m in recent]):.3f}",
                            img_s=f"{(i + 1) * args.batch_size / (time.perf_counter() - start):.0f}",
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
                       f"{' and '.join(what)}. Stopped; {ckpt_note}. Try a smaller --lr (now {args.lr}).")
            write_metrics(stopped={"reason": "diverged", "epoch": stopped_epoch, "step": stopped_step,
                                   "loss": float(m["loss"]), "objective": float(m["objective"]),
                                   "finite_loss": bool(m["finite_loss"]), "finite_params": bool(m["finite_params"])})
            return _fail(message, EXIT_DIVERGED)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        batch_metrics = jax.device_get(batch_metrics)
        test = train.evaluate(apply_fun, params, x_test, y_test, batch_size=512)
        history.append({
            "epoch": epoch + 1,
            "train_loss": float(np.mean([m["loss"] for m in batch_metrics])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in batch_metrics])),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": seconds,
            "images_per_second": steps_per_epoch * args.batch_size / seconds,
        })
        print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, test loss {test['loss']:.4f}, "
              f"test accuracy {test['accuracy']:.2%}", file=sys.stderr)
        history = json_safe(history)
        checkpoint.save(ckpt_path, {"params": params, "opt_state": opt_state}, {
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "config": config, "history": history,
            "jax_version": jax.__version__,
            # What evaluation and prediction need besides the weights: a checkpoint alone is enough.
            "model": {"name": args.model, "num_classes": dataset.num_classes,
                      "input_shape": list(x_train.shape[1:])},
            "standardization": {"mean": stats[0], "std": stats[1]},
        })
        write_metrics()

    if start_epoch >= args.epochs:
        print(f"nothing to train: {ckpt_path} is at epoch {start_epoch} >= --epochs {args.epochs}", file=sys.stderr)
    plots.plot_curves(history, out / "curves.png", title=f"{args.model} on {dataset.name}")
    kernel = plots.first_conv_kernel(jax.device_get(params))
    if kernel is not None:
        plots.plot_filters(kernel, out / "filters.png", title=f"{args.model} first-layer filters")
    final = history[-1]
    print(f"test accuracy {final['test_accuracy']:.2%} after {final['epoch']} epochs "
          f"({train_seconds:.1f} s of training); outputs in {out}/: metrics.json, curves.png"
          f"{', filters.png' if kernel is not None else ''}, checkpoint.safetensors")
    return 0


# --- evaluate ----------------------------------------------------------------------------


def _add_evaluate_parser(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint written by `train` on a test split",
        description="Evaluate a checkpoint written by `python -m jaxconv train`. The checkpoint alone says which "
        "model it holds and how its training images were standardised; the data set defaults to the one it was "
        "trained on.",
    )
    p.add_argument("checkpoint", help="a checkpoint.safetensors written by `train`")
    p.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's")
    p.add_argument("--data-dir", help="directory of the data set's files (not needed for digits)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.set_defaults(func=_evaluate)


def load_trained(path):
    """``(apply_fun, params, metadata)`` from a checkpoint ``train`` wrote: everything evaluation needs.

    The model is rebuilt from the metadata's ``model`` entry and the parameters
    restored into it (checksums verified).  Standardise inputs with
    ``train.standardize(images, stats=(m["mean"], m["std"]))`` where ``m =
    metadata["standardization"]``.  ``ValueError`` if the file is not such a
    checkpoint.
    """
    from . import checkpoint, models, train

    meta = checkpoint.read_metadata(path)
    model, config, stats = meta.get("model"), meta.get("config"), meta.get("standardization")
    if not (isinstance(model, dict) and isinstance(config, dict) and isinstance(stats, dict)):
        raise ValueError(f"{path}: no 'model', 'config' and 'standardization' in its metadata: not a checkpoint "
                         f"written by `python -m jaxconv train` of this version.")
    try:
        init_fun, apply_fun = models.MODELS[model["name"]](int(model["num_classes"]))
        _, params = train.init_params(init_fun, (-1, *model["input_shape"]), seed=0)
        optimizer = train.default_optimizer(config["learning_rate"], config["momentum"], config["weight_decay"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its metadata does not describe a model and optimizer ({err!r}).") from err
    state, meta = checkpoint.restore(path, {"params": params, "opt_state": optimizer.init(params)})
    return apply_fun, state["params"], meta


def _evaluate(args) -> int:
    from . import data, train

    try:
        apply_fun, params, meta = load_trained(args.checkpoint)
        name = args.dataset or meta["config"]["dataset"]
        dataset = data.load_dataset(name, args.data_dir)
    except (ValueError, OSError) as err:
        print(f"python -m jaxconv evaluate: error: {err}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    images, labels = ((dataset.test_images, dataset.test_labels) if args.split == "test"
                      else (dataset.train_images, dataset.train_labels))
    expected = tuple(meta["model"]["input_shape"])
    if images.shape[1:] != expected:
        print(f"python -m jaxconv evaluate: error: {name} images are {images.shape[1:]}, the model takes {expected}.",
              file=sys.stderr)
        return EXIT_BAD_SETTINGS
    stats = meta["standardization"]
    (x,) = train.standardize(images, stats=(stats["mean"], stats["std"]))
    result = train.evaluate(apply_fun, params, x, labels, batch_size=512)
    print(f"{meta['model']['name']} at epoch {meta.get('epoch')} on {name} ({args.split}, {len(labels)} images): "
          f"accuracy {result['accuracy']:.2%}, loss {result['loss']:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="check every hand-written VJP against jax.grad in float64")
    p_verify.add_argument("--op", action="append", help="only this op (repeatable)")
    p_verify.add_argument("--seed", type=int, default=0)
    p_verify.set_defaults(func=_verify)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    from . import check_cli

    check_cli.add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse has printed the usage and the error (or --help)
        return done.code if isinstance(done.code, int) else EXIT_BAD_SETTINGS
    return args.func(args)
