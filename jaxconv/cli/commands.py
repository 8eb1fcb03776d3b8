"""Command line: ``python -m jaxconv verify | train | evaluate | predict | synth | check``.

Argument parsing only: each command turns its flags into a call of the library
(:func:`jaxconv.train.fit` with a :class:`jaxconv.train.Config`,
:mod:`jaxconv.train.inference`, :mod:`jaxconv.verify`), prints the result and
returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np

from .._core.version import __version__
from ..nn.models import MODELS
from ..train import hostmem, inference, loop, peers, synthetic
from ..train.data import DATASETS
from ..train.loop import MAX_SEED, Config, FitError, GradCheckFailed, fit
from ..train.step import OPTIMIZERS, RECIPES, SCHEDULES
from ..verify import check_vjp
from ..verify import command as check_cli
from ..verify.registry import SUITES
from . import supervise


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
            report = check_vjp(
                case.f, case.ref, *case.args, names=case.names, name=f"{op} {case.label}", **case.options
            )
            vjp_err = max(vjp_err, report.worst("vjp"), report.worst("forward"))
            fd_err = max(fd_err, report.worst("finite-diff"))
            so_err = max(so_err, report.worst("second-order"))
            if not report.passed:
                bad.append(report)
        failed |= bool(bad)
        rows.append(
            (
                op,
                str(len(cases)),
                f"{vjp_err:.1e}",
                f"{fd_err:.1e}",
                f"{so_err:.1e}",
                f"{time.perf_counter() - start:.1f}",
                "FAIL" if bad else "pass",
            )
        )
        print(f"  {op}: {len(cases)} configurations, {'FAIL' if bad else 'pass'}", file=sys.stderr)
        for report in bad:
            print(report, file=sys.stderr)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
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
#: Stopped by Ctrl-C (SIGINT), as a shell reports a process that SIGINT ended.
EXIT_INTERRUPTED = 130


def _number(kind, *, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type=``: a finite ``kind`` in [low, high] (or open at either end), else a parser error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
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
    keys = (
        "model",
        "epochs",
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
    )
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
        "last finite checkpoint. Exit codes: 0 done, 1 --check-grads failed, 2 bad settings, 3 diverged, "
        "130 interrupted (Ctrl-C).\n\n"
        "Defaults: every setting left out comes from the data set's recipe (a recipe learns without tuning; "
        "the README gives the accuracies and times measured):\n\n" + _recipe_table(),
    )
    positive = _number(int, low=1)
    p.add_argument("--model", choices=sorted(MODELS), help="default: the recipe's")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (the default) is bundled with scikit-learn; the others are read from --data-dir",
    )
    p.add_argument("--data-dir", help="directory of the MNIST/Fashion-MNIST IDX files or CIFAR-10 .bin files")
    p.add_argument("--epochs", type=positive, help="total epochs, also when resuming (default: the recipe's)")
    p.add_argument("--batch-size", type=positive, help="the global batch (default: the recipe's)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="sgd, momentum (heavy ball), adam (coupled decay), adamw (decoupled) (default: the recipe's)",
    )
    p.add_argument(
        "--lr", type=_number(float, low=0, low_open=True), help="peak learning rate > 0 (default: the recipe's)"
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="constant; cosine decay to 0; step (/10 at 50%% and 75%% of the steps) (default: the recipe's)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=_number(float, low=0),
        help="linear warm-up from 0 over this many epochs (default: the recipe's)",
    )
    p.add_argument(
        "--momentum",
        type=_number(float, low=0, high=1, high_open=True),
        help="in [0, 1), for --optimizer momentum (default: the recipe's)",
    )
    p.add_argument(
        "--weight-decay",
        type=_number(float, low=0),
        help="coupled (added to the gradient), decoupled for adamw; >= 0 (default: the recipe's)",
    )
    p.add_argument(
        "--l2", type=_number(float, low=0), help="lambda of the L2 term in the objective (default: the recipe's)"
    )
    p.add_argument(
        "--val-fraction",
        type=_number(float, low=0, high=1, high_open=True),
        help="fraction of the training set held out for validation and model selection, in [0, 1); "
        "0 keeps no best checkpoint (default: the recipe's)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crops (zero padding of 1/8 of the size) and, for cifar10, horizontal flips, "
        "inside the jitted step (default: the recipe's)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, low=0, high=MAX_SEED),
        default=0,
        help=f"initialisation, batch order and augmentation, 0 to {MAX_SEED} (default: 0)",
    )
    p.add_argument(
        "--devices",
        type=positive,
        default=1,
        help="data parallel over this many local devices, a batch-sharded mesh (default: 1)",
    )
    p.add_argument(
        "--onednn",
        action="store_true",
        help="run every float32 convolution through oneDNN's kernels (the 'onednn' forms, "
        "pip install 'jaxconv[onednn]'; one process, one device); without it the planner still "
        "picks them layer by layer where its measured table says they are faster",
    )
    p.add_argument("--out", help="output directory (default: runs/<dataset>-<model>)")
    p.add_argument(
        "--stop-after",
        type=positive,
        metavar="N",
        help="train at most N epochs in this invocation, then stop with a checkpoint (e.g. a job with a "
        "time limit); --resume continues exactly where it stopped",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out: its checkpoints, metrics and plots are deleted once the new "
        "run has written its first checkpoint (until then, and if it fails before, they stay)",
    )
    p.add_argument(
        "--check-grads",
        action="store_true",
        help="before training, check every hand rule the model uses against jax.grad (float64) on the "
        "first batch; exit 1 on a mismatch",
    )
    multi = p.add_argument_group(
        "several processes (jax.distributed)",
        "Run the same command once per process, each with its --process-id (or leave all three out where "
        "jax.distributed.initialize() detects them itself, e.g. under SLURM, and give --distributed). The mesh "
        "spans every process's devices; each process feeds its own rows of each global batch; process 0 writes "
        "the run directory.",
    )
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, reachable by every process")
    multi.add_argument("--num-processes", type=positive, help="how many processes take part")
    multi.add_argument("--process-id", type=_number(int, low=0), help="this process's rank, 0 to --num-processes - 1")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with what it detects from the cluster's environment",
    )
    multi.add_argument(
        "--init-timeout",
        type=positive,
        default=60,
        metavar="SECONDS",
        help="how long the processes wait for each other at start, then stop with exit 2 (default: %(default)s)",
    )
    p.set_defaults(func=_train)


def _train(args) -> int:
    """``train``: the flags as a :class:`Config`, :func:`fit`, its status as the exit code.

    Several processes meeting at ``--coordinator``: this process supervises one that trains
    (:mod:`jaxconv.cli.supervise`); that one, ending with an error, ends at once (``os._exit``) after its
    message, without jax's shutdown, which would wait for processes that stopped."""
    if supervise.needed(args):
        try:  # bad flags are this process's usage error, before a child is started
            Config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Config)})
        except FitError as err:
            print(f"python -m jaxconv train: error: {err}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        return supervise.run(args.argv)
    code = _train_here(args)
    if code != 0 and peers.current() is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train_here(args) -> int:
    def fail(message, code: int = EXIT_BAD_SETTINGS) -> int:
        print(f"python -m jaxconv train: error: {message}", file=sys.stderr)
        return code

    config = None
    try:
        config = Config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Config)})
        result = fit(config)
    except FitError as err:
        return fail(err)
    except GradCheckFailed as err:
        return fail(err, EXIT_CHECK_FAILED)
    except KeyboardInterrupt:  # Ctrl-C: fit has released the run directory; the last checkpoint is whole
        if (
            config is not None
            and config.out is not None
            and (pathlib.Path(config.out) / "checkpoint.safetensors").exists()
        ):
            return fail("interrupted; resume with --resume", EXIT_INTERRUPTED)
        return fail("interrupted before the first checkpoint; nothing to resume", EXIT_INTERRUPTED)
    if isinstance(result.status, loop.Diverged):
        return fail(result.status.message, EXIT_DIVERGED)
    if jax.process_index() != 0:
        return 0
    final, best = result.history[-1], result.best
    seconds = sum(h.get("seconds", 0.0) for h in result.history)
    best_note = (
        f"; best on validation: epoch {best['epoch']} ({best['val_accuracy']:.2%} validation, "
        f"{best['test_accuracy']:.2%} test), best.safetensors"
        if best
        else ""
    )
    print(
        f"test accuracy {final['test_accuracy']:.2%} after {final['epoch']} epochs "
        f"({seconds:.1f} s of training); outputs in {result.run_dir}/: metrics.json, curves.png"
        f"{', filters.png' if 'filters.png' in result.outputs else ''}, checkpoint.safetensors{best_note}"
    )
    return 0


# --- evaluate and predict -----------------------------------------------------------------


def _command_error(command: str):
    """``error(message) -> EXIT_BAD_SETTINGS``, printing ``python -m jaxconv COMMAND: error: message``."""

    def error(message):
        print(f"python -m jaxconv {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    return error


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
    p.add_argument(
        "--confusion",
        metavar="PNG",
        help="where to write the confusion matrix: a .png file, or a directory to write "
        "confusion-<split>.png in (default: RUN_DIR/confusion-<split>.png); where it cannot be "
        "written (a read-only run directory) the result is still printed, with a note",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (with the confusion matrix)")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    try:
        path = inference.checkpoint_path(args.run, args.best)
        png = pathlib.Path(args.confusion) if args.confusion else path.parent
        result = inference.evaluate_run(
            path, dataset=args.dataset, data_dir=args.data_dir, split=args.split, confusion_png=png
        )
    except (ValueError, OSError) as err:
        return _command_error("evaluate")(err)
    if result["confusion_note"]:
        print(f"python -m jaxconv evaluate: note: {result['confusion_note']}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in (
                        "checkpoint",
                        "epoch",
                        "dataset",
                        "split",
                        "images",
                        "accuracy",
                        "loss",
                        "confusion_matrix",
                        "confusion_png",
                        "confusion_note",
                    )
                }
            )
        )
    else:
        where = (
            f"confusion matrix in {result['confusion_png']}"
            if result["confusion_png"]
            else "no confusion matrix written"
        )
        print(
            f"{result['model']} at epoch {result['epoch']} on {result['dataset']} ({args.split}, {result['images']} "
            f"images): accuracy {result['accuracy']:.2%}, loss {result['loss']:.4f}; {where}"
        )
    return 0


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
    try:
        results = inference.predict(args.run, args.images, best=args.best, top_k=args.top_k)
    except (ValueError, OSError) as err:
        return _command_error("predict")(err)
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
    p.add_argument(
        "--num-train", type=_number(int, low=5, high=synthetic.MAX_IMAGES), help="default: 4000 (mnist), 5000 (cifar10)"
    )
    p.add_argument(
        "--num-test", type=_number(int, low=1, high=synthetic.MAX_IMAGES), default=1000, help="default: 1000"
    )
    p.add_argument("--seed", type=_number(int, low=0, high=MAX_SEED), default=0, help="default: 0")
    p.set_defaults(func=_synth)


def _synth(args) -> int:
    write = synthetic.write_mnist_like if args.format == "mnist" else synthetic.write_cifar_like
    num_train = args.num_train or (4000 if args.format == "mnist" else 5000)
    try:
        directory = write(args.directory, num_train=num_train, num_test=args.num_test, seed=args.seed)
    except (OSError, ValueError) as err:
        print(f"python -m jaxconv synth: error: {err}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    print(f"wrote {num_train} train and {args.num_test} test {args.format}-format images to {directory}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxconv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="jaxconv: convnet layers whose backward passes are hand-derived custom_vjp rules.\n\n"
        "  verify    check every hand-written VJP against jax.grad in float64\n"
        "  train     train a model (default: the bundled digits)\n"
        "  evaluate  accuracy, loss and confusion matrix of a trained run\n"
        "  predict   classify image files with a trained run\n"
        "  synth     write MNIST/CIFAR-format check data made from the bundled digits\n"
        "  check     check your own custom_vjp rule against a reference\n\n"
        "`python -m jaxconv COMMAND --help` shows each command's options and defaults.",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse has printed the usage and the error (or --help)
        return done.code if isinstance(done.code, int) else EXIT_BAD_SETTINGS
    args.argv = argv
    return args.func(args)


def program() -> int:
    """``python -m jaxconv``: :func:`main` on ``sys.argv``; ``train`` first starts itself again with huge pages.

    glibc reads its tunables when a process starts: ``train`` runs again (``os.execve``: same process id
    and arguments) with huge pages for XLA's large temporaries where that helps
    (:mod:`jaxconv.train.hostmem`); elsewhere, and for the other commands, nothing changes."""
    if sys.argv[1:2] == ["train"]:
        hostmem.restart_with_huge_pages()
    return main()
