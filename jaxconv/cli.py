"""Command line: ``python -m jaxconv verify`` and ``python -m jaxconv train``."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np


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
        rng = np.random.default_rng(args.seed)
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


def _add_train_parser(sub) -> None:
    from .data import DATASETS
    from .models import MODELS
    from .train import DEFAULTS

    p = sub.add_parser(
        "train",
        help="train a model with the hand-written rules (default: the bundled digits)",
        description="Train a convnet with optax SGD on jaxconv's hand-derived VJP rules; write per-epoch "
        "metrics (JSON), loss/accuracy curves and first-layer filters (PNG), and a checkpoint each epoch.",
    )
    p.add_argument("--model", choices=sorted(MODELS), default=DEFAULTS["model"])
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits is bundled with scikit-learn; the others are read from --data-dir")
    p.add_argument("--data-dir", help="directory of the MNIST/Fashion-MNIST IDX files or CIFAR-10 .bin files")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="total epochs (also when resuming)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["learning_rate"], help="learning rate")
    p.add_argument("--momentum", type=float, default=DEFAULTS["momentum"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="coupled, added to the gradient")
    p.add_argument("--l2", type=float, default=DEFAULTS["l2"], help="lambda of the L2 term in the objective")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="initialisation and batch order")
    p.add_argument("--devices", type=int, default=1, help="data parallel over this many devices (a batch-sharded mesh)")
    p.add_argument("--out", help="output directory (default runs/<dataset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    p.add_argument("--check-grads", action="store_true",
                   help="before training, check every hand rule the model uses against jax.grad (float64) on the "
                   "first batch; exit 1 on a mismatch")
    p.set_defaults(func=_train)


#: Hyperparameters a resumed run must share with the checkpoint to continue the same trajectory.
_RESUME_KEYS = ("model", "dataset", "batch_size", "learning_rate", "momentum", "weight_decay", "l2", "seed")

#: Ops without kinks: only these get the finite-difference check (the others are
#: compared with jax.grad of the reference, which shares the convention at a kink).
_SMOOTH_OPS = ("conv2d", "linear", "avg_pool2d", "lrn", "flatten", "softmax_cross_entropy", "l2_penalty")


class _RecordingOps:
    """An ``ops=`` namespace for :mod:`jaxconv.nn`: runs the reference op and records each call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        from . import reference

        reference_op = getattr(reference, name)

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
    differences for the ops without kinks (off by default: one more float64
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

    from . import reference
    from .verify import check_vjp

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
            arg_names = list(inspect.signature(getattr(reference, name)).parameters)[: len(args)]
            report = check_vjp(
                lambda *a, _name=name, _kw=kwargs: getattr(jaxconv, _name)(*a, **_kw),
                partial(getattr(reference, name), **kwargs),
                *args,
                names=arg_names,
                finite_differences=finite_differences and name in _SMOOTH_OPS,
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


def _train(args) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from . import __version__, checkpoint, data, models, plots, train

    config = {
        "model": args.model, "dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay, "l2": args.l2,
        "seed": args.seed, "devices": args.devices,
    }
    out = pathlib.Path(args.out if args.out else f"runs/{args.dataset}-{args.model}")
    ckpt_path = out / "checkpoint.safetensors"
    try:
        for name in ("epochs", "batch_size", "devices"):
            if config[name] < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` (={config[name]}) must be >= 1.")
        if args.devices > 1 and args.batch_size % args.devices:
            raise ValueError(f"`--batch-size` (={args.batch_size}) must be divisible by `--devices` (={args.devices}).")
        mesh = train.make_mesh(args.devices) if args.devices > 1 else None
        dataset = data.load_dataset(args.dataset, args.data_dir)
        if args.batch_size > len(dataset.train_labels):
            raise ValueError(f"`--batch-size` (={args.batch_size}) exceeds the {len(dataset.train_labels)} training images.")
        optimizer = train.default_optimizer(args.lr, args.momentum, args.weight_decay)
        init_fun, apply_fun = models.MODELS[args.model](dataset.num_classes)
        step = train.make_train_step(apply_fun, optimizer, l2=args.l2, mesh=mesh)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m jaxconv train: error: {err}", file=sys.stderr)
        return 2

    x_train, x_test = train.standardize(dataset.train_images, dataset.test_images)
    y_train, y_test = dataset.train_labels, dataset.test_labels
    _, params = train.init_params(init_fun, x_train.shape, seed=args.seed)
    opt_state = optimizer.init(params)
    start_epoch, history = 0, []
    if args.resume:
        try:
            state, meta = checkpoint.restore(ckpt_path, {"params": params, "opt_state": opt_state})
            saved = meta.get("config", {})
            differ = {k: (saved.get(k), config[k]) for k in _RESUME_KEYS if saved.get(k) != config[k]}
            if differ:
                raise ValueError(
                    f"{ckpt_path} was written with other settings; --resume needs the same "
                    + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in differ.items())
                )
        except (ValueError, FileNotFoundError) as err:
            print(f"python -m jaxconv train: error: --resume: {err}", file=sys.stderr)
            return 2
        params, opt_state = state["params"], state["opt_state"]
        start_epoch, history = int(meta["epoch"]), list(meta.get("history", []))
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
            print("python -m jaxconv train: --check-grads found a hand rule that disagrees with jax.grad; "
                  "not training.", file=sys.stderr)
            return 1

    def write_metrics():
        record = {
            "jax_version": jax.__version__, "jaxconv_version": __version__, "platform": device.platform,
            "device": device.device_kind, "num_devices": args.devices, "config": config, "epochs": history,
        }
        checkpoint.atomic_write_bytes(out / "metrics.json", (json.dumps(record, indent=1) + "\n").encode())

    steps_per_epoch = data.num_batches(len(y_train), args.batch_size)
    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        batch_metrics = []
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for i, batch in enumerate(data.batches(x_train, y_train, args.batch_size, seed=args.seed, epoch=epoch)):
                if mesh is not None:
                    batch = train.shard_batch(batch, mesh)
                params, opt_state, metrics = step(params, opt_state, batch)
                batch_metrics.append(metrics)
                if i % 8 == 7 or i == steps_per_epoch - 1:
                    recent = jax.device_get(batch_metrics[-8:])
                    bar.set_postfix(
                        loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                        acc=f"{np.mean([m['accuracy'] for m in recent]):.3f}",
                        img_s=f"{(i + 1) * args.batch_size / (time.perf_counter() - start):.0f}",
                        refresh=False,
                    )
                bar.update(1)
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
        checkpoint.save(ckpt_path, {"params": params, "opt_state": opt_state}, {
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "config": config, "history": history,
            "jax_version": jax.__version__,
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="check every hand-written VJP against jax.grad in float64")
    p_verify.add_argument("--op", action="append", help="only this op (repeatable)")
    p_verify.add_argument("--seed", type=int, default=0)
    p_verify.set_defaults(func=_verify)
    _add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
