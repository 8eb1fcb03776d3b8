"""``python -m jaxconv check MODULE:FUNCTION``: check a derivative rule from the command line.

Checks a ``jax.custom_vjp`` / ``jax.custom_jvp`` function defined anywhere (a
module on the path or in the current directory, or a ``.py`` file) with
:func:`jaxconv.verify.check_rule`, without writing a test::

    python -m jaxconv check mymodule:my_conv --arg x=2,7,7,3 --arg w=3,3,3,4 --static stride=2
    python -m jaxconv check path/to/rules.py:my_conv --arg x=N,8,8,C --arg w=3,3,C,4 \\
        --dim N=1-2 --dim C=1-3 --sweep 20

``--arg NAME=SHAPE[:VALUES]`` describes an array argument.  SHAPE is
comma-separated sizes (empty, ``()`` or ``scalar`` for a 0-d array); with
``--sweep`` an entry may also be a range ``LO-HI`` (drawn independently) or a
NAME shared with other arguments (its size or range from ``--dim NAME=...``).
VALUES is ``normal`` (default), ``uniform``, ``positive``, ``permutation``
(distinct, kink-free), ``bool``, ``int:LO:HIGH`` (int32 labels in [LO, HIGH))
or ``uniform:LO:HIGH``.  ``--static NAME=VALUE`` passes a Python literal
(held fixed), ``--choices NAME=V1,V2`` draws one of the values per sweep example.

Keyword-only parameters of the reference given with ``--static`` are passed
to both functions by keyword (the checker passes the other arguments by
position).

Exit status: 0 every check passed, 1 a check failed (a function whose output
has no floating-point array, e.g. one returning ``None``, fails: nothing could
be checked), 2 bad usage (arguments, an import that fails or calls
``sys.exit``, a file that is not ``.py``, a function that is not a custom rule
without ``--ref``, arguments the function rejects, a negative or NaN
tolerance, an array of more than ten million elements).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

from .rules import check_rule, check_vjp
from .sweeps import Array, _import_line, sample, sweep

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "python -m jaxconv check"

_VALUE_KINDS = ("normal", "uniform", "positive", "permutation", "bool", "int")


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``check`` subcommand on ``subparsers`` (``set_defaults(func=run)``; ``run`` gives the exit code)."""
    p = subparsers.add_parser(
        "check",
        help="check a custom_vjp/custom_jvp rule of your own (no test needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="the rule: an importable module (current directory and PYTHONPATH are searched) or a .py "
        "file, a colon, and the function's name (dotted for attributes)",
    )
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=SHAPE[:VALUES]",
        help="an array argument, e.g. x=2,7,7,3 or labels=4:int:0:10 (repeatable)",
    )
    p.add_argument(
        "--static",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fixed non-array argument, a Python literal, e.g. stride=2 or padding='SAME' (repeatable)",
    )
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE|LO-HI",
        help="the size (or, with --sweep, the range) of a named dimension used in --arg (repeatable)",
    )
    p.add_argument(
        "--choices",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="with --sweep: an argument drawn from these literals per example (repeatable)",
    )
    p.add_argument(
        "--ref",
        metavar="MODULE:FUNCTION",
        help="compare with this reference (check_vjp) instead of the rule's own primal; needed for a plain function",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32", "bfloat16", "float16"),
        help="the dtype the rule is used in: float32/bfloat16/float16 add checks of the rule in that "
        "dtype against its float64 evaluation (default: float64 only)",
    )
    p.add_argument(
        "--sweep",
        type=_positive_int,
        metavar="N",
        help="draw N configurations (hypothesis) and shrink a failure to the smallest one",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the values (and of the sweep)")
    p.add_argument("--rtol", type=_tolerance, help="tolerance of the float64 comparisons (default 1e-12)")
    p.add_argument("--no-second-order", action="store_true", help="skip the grad-of-grad check")
    p.add_argument(
        "--no-finite-differences",
        action="store_true",
        help="skip the central differences (they still run where they are the only oracle)",
    )
    p.add_argument(
        "--max-residual-ratio",
        type=_tolerance,
        metavar="R",
        help="fail when the rule saves more than R times the bytes autodiff of the primal saves",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _tolerance(text: str) -> float:
    """A finite number >= 0 (argparse names the flag in its message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    """``python -m jaxconv check`` on its own: ``argv`` are the words after ``check``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse printed the usage and the error (or --help)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    return run(args)


# --- parsing -----------------------------------------------------------------------------


def _split(text: str, what: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise UsageError(f"{what} {text!r}: expected NAME=..., NAME a Python identifier")
    return name, rest.strip()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string (padding=SAME)


def _range(text: str, what: str):
    """``7`` -> 7, ``1-8`` -> (1, 8)."""
    lo, sep, hi = text.partition("-")
    try:
        if not sep:
            value = int(text)
            if value < 0:
                raise ValueError
            return value
        low, high = int(lo), int(hi)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a size (e.g. 7) or a range (e.g. 1-8)") from None
    if not 0 <= low <= high:
        raise UsageError(f"{what}: range {text!r} needs 0 <= LO <= HI")
    return (low, high)


def _values(text: str, what: str):
    if not text:
        return "normal"
    kind, *params = text.split(":")
    if kind not in _VALUE_KINDS:
        raise UsageError(f"{what}: unknown values {kind!r}; expected one of {', '.join(_VALUE_KINDS)}")
    if not params:
        return kind
    if kind not in ("int", "uniform") or len(params) != 2:
        raise UsageError(f"{what}: only int:LO:HIGH and uniform:LO:HIGH take bounds, got {text!r}")
    cast = int if kind == "int" else float
    try:
        low, high = cast(params[0]), cast(params[1])
    except ValueError:
        raise UsageError(f"{what}: bounds of {text!r} are not numbers") from None
    if not low < high:
        raise UsageError(f"{what}: {text!r} needs LO < HIGH")
    return (kind, low, high)


def parse_arg(text: str):
    """``NAME=SHAPE[:VALUES]`` -> ``(name, jaxconv.verify.Array)``."""

    name, rest = _split(text, "--arg")
    shape_text, _, values_text = rest.partition(":")
    shape_text = shape_text.strip()
    what = f"--arg {text}"
    shape: list = []
    if shape_text not in ("", "()", "scalar"):
        for token in shape_text.strip("()").split(","):
            token = token.strip()
            if token.isidentifier():
                shape.append(token)
            else:
                shape.append(_range(token, what))
    values = _values(values_text.strip(), what)
    dtype = None
    if isinstance(values, str) and values == "int":
        values = ("int", 0, 10)
    return name, Array(tuple(shape), values, dtype)


# --- loading the user's function -------------------------------------------------------------


def load(target: str):
    """The object ``MODULE:ATTR`` names; MODULE a module name (cwd and PYTHONPATH searched) or a .py file."""
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"{target!r}: expected MODULE:FUNCTION, e.g. mypackage.rules:my_conv or rules.py:my_conv")
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        path = pathlib.Path(module_part)
        if not path.is_file():
            raise UsageError(f"{target!r}: no file {module_part}")
        if path.suffix != ".py":
            raise UsageError(
                f"{target!r}: {module_part} is not a Python source file (.py); name a .py file or an importable module"
            )
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"{target!r}: {module_part} cannot be imported as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if str(path.parent.resolve()) not in sys.path:
            sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except SystemExit as exc:
            del sys.modules[name]
            raise UsageError(_exited(module_part, exc)) from None
        except Exception as exc:
            del sys.modules[name]
            raise UsageError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
    else:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_part)
        except SystemExit as exc:
            raise UsageError(_exited(module_part, exc)) from None
        except Exception as exc:
            raise UsageError(
                f"importing {module_part!r} failed: {type(exc).__name__}: {exc} "
                f"(the current directory and PYTHONPATH are searched)"
            ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_part} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{target} is not callable")
    return obj


def _exited(module: str, exc: SystemExit) -> str:
    return (
        f"importing {module} called sys.exit({exc.code!r}) (a script's main code not under "
        f'`if __name__ == "__main__":`?); nothing was checked'
    )


# --- running ---------------------------------------------------------------------------------

#: The most elements one array argument may have: every check runs the rule several times in float64.
MAX_ELEMENTS = 10**7


def _description(args):

    description, dims, fixed_only = {}, {}, args.sweep is None
    for text in args.arg:
        name, spec = parse_arg(text)
        if name in description:
            raise UsageError(f"argument {name!r} is given twice")
        description[name] = spec
    for text in args.static:
        name, value = _split(text, "--static")
        if name in description:
            raise UsageError(f"argument {name!r} is given twice")
        description[name] = _literal(value)
    for text in args.dim:
        name, value = _split(text, "--dim")
        dims[name] = _range(value, f"--dim {text}")
    choices = {}
    for text in args.choices:
        name, value = _split(text, "--choices")
        if name in description:
            raise UsageError(f"argument {name!r} is given twice")
        choices[name] = [_literal(v.strip()) for v in value.split(",") if v.strip()]
        if not choices[name]:
            raise UsageError(f"--choices {text}: no values")
    if not any(isinstance(spec, Array) for spec in description.values()):
        raise UsageError("give at least one array argument with --arg NAME=SHAPE")
    used = {d for spec in description.values() if isinstance(spec, Array) for d in spec.names}
    missing = sorted(used - set(dims))
    if missing:
        raise UsageError(
            f"dimension(s) {missing} need a size: --dim {missing[0]}=" + ("1-4" if not fixed_only else "3")
        )
    _check_sizes(description, dims)
    if fixed_only:
        ranged = sorted(n for n, v in dims.items() if isinstance(v, tuple))
        if (
            ranged
            or choices
            or any(isinstance(d, tuple) for spec in description.values() if isinstance(spec, Array) for d in spec.shape)
        ):
            raise UsageError(
                "ranges and --choices need --sweep N" + (f" (ranged: {', '.join(ranged)})" if ranged else "")
            )
    return description, dims, choices


def _check_sizes(description, dims) -> None:
    """``UsageError`` for an ``--arg`` whose largest shape has more than :data:`MAX_ELEMENTS` elements."""

    def high(d):
        d = dims.get(d, 0) if isinstance(d, str) else d
        return d[1] if isinstance(d, tuple) else d

    for name, spec in description.items():
        if isinstance(spec, Array):
            count = math.prod(high(d) for d in spec.shape)
            if count > MAX_ELEMENTS:
                raise UsageError(
                    f"--arg {name}: {count} elements (at its largest), more than the {MAX_ELEMENTS} a "
                    f"check can take (each check runs the rule several times in float64); use smaller "
                    f"sizes: a rule that holds on small arrays holds on large ones"
                )


def _keyword_only(ref, description, choices):
    """``(statics for ref's keyword-only parameters, the rest of description)``; ``UsageError`` for a
    keyword-only array or drawn argument (the checker passes arguments by position)."""

    try:
        params = inspect.signature(ref).parameters
    except (TypeError, ValueError):
        return {}, description
    keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    drawn = sorted(keyword & set(choices))
    if drawn:
        name = drawn[0]
        raise UsageError(
            f"--choices {name}: {name} is a keyword-only parameter of the reference, which a sweep "
            f"cannot draw; make it positional or give it with --static"
        )
    for name in sorted(keyword & set(description)):
        if isinstance(description[name], Array):
            raise UsageError(
                f"--arg {name}: {name} is a keyword-only parameter of the reference; the checker "
                f"differentiates arguments by position: make it positional"
            )
    statics = {n: description[n] for n in description if n in keyword}
    return statics, {n: v for n, v in description.items() if n not in keyword}


def _with_statics(reproducer: str, originals, statics: dict) -> str:
    """The sweep's reproducer of ``partial(f, **statics)`` vs ``partial(ref, **statics)``, calling those partials."""

    (f_import, f_name), (ref_import, ref_name) = (_import_line(g) for g in originals)
    keywords = ", ".join(f"{k}={v!r}" for k, v in statics.items())
    lines = [
        line
        for line in reproducer.splitlines()
        if not line.startswith("# f: define or import it here (it is functools.")
    ]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("from jaxconv.verify import check_vjp")), 0)
    lines[at:at] = ["from functools import partial", *dict.fromkeys((f_import, ref_import))]
    return "\n".join(lines).replace(
        "check_vjp(f, f, ", f"check_vjp(partial({f_name}, {keywords}), partial({ref_name}, {keywords}), ", 1
    )


def _nothing_to_check(f, named: dict) -> str | None:
    """Why ``f(**named)`` leaves nothing to check (no floating-point output), or None (or if it cannot be run)."""

    try:
        with jax.enable_x64(True):
            out = jax.eval_shape(lambda: f(**named))
    except Exception:  # noqa: BLE001 - the checks report this themselves
        return None
    leaves = jax.tree.leaves(out)
    if any(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves):
        return None
    what = "None" if out is None else ("no arrays" if not leaves else "no floating-point arrays")
    return f"returned {what}: there is no output to differentiate, so nothing was checked"


def _lowest(description, dims, choices, seed):
    """The arguments at the low end of every range and the first of every choice (a sweep's smallest)."""

    low = {n: (v[0] if isinstance(v, tuple) else v) for n, v in dims.items()}
    fixed = {
        n: (
            Array(tuple(d[0] if isinstance(d, tuple) else d for d in v.shape), v.values, v.dtype)
            if isinstance(v, Array)
            else v
        )
        for n, v in description.items()
    }
    named = _fixed_arguments(fixed, low, seed)
    return {**named, **{n: v[0] for n, v in choices.items()}}


def _fixed_arguments(description, dims, seed):

    named = {}
    for k, (name, spec) in enumerate(description.items()):
        if isinstance(spec, Array):
            shape = tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
            named[name] = sample(shape, spec.values, spec.dtype, seed + k, dims)
        else:
            named[name] = spec
    return named


def _options(args) -> dict:

    options = {"seed": args.seed}
    if args.dtype != "float64":
        options["dtype"] = jnp.dtype(args.dtype)
    if args.rtol is not None:
        options["rtol"] = args.rtol
    if args.no_second_order:
        options["second_order"] = False
    if args.no_finite_differences:
        options["finite_differences"] = False
    if args.max_residual_ratio is not None:
        options["max_residual_ratio"] = args.max_residual_ratio
    return options


def run(args) -> int:
    """The ``check`` subcommand: 0 passed, 1 a check failed, 2 bad usage."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args) -> int:

    description, dims, choices = _description(args)
    f = load(args.target)
    ref = load(args.ref) if args.ref else None
    options = _options(args)
    label = getattr(f, "__name__", None)
    statics, originals = {}, (f, ref)
    if ref is not None:
        options = {
            k: v for k, v in options.items() if k in ("seed", "dtype", "rtol", "second_order", "finite_differences")
        }
        # Keyword-only statics reach both functions (the checker passes the others by position).
        statics, description = _keyword_only(ref, description, choices)
        if statics:
            f, ref = functools.partial(f, **statics), functools.partial(ref, **statics)
    empty = _nothing_to_check(f, _lowest(description, dims, choices, args.seed))
    if empty is not None:
        message = f"{args.target} {empty}"
        if args.json:
            print(
                json.dumps(
                    {
                        "target": args.target,
                        "mode": "sweep" if args.sweep is not None else "check",
                        "passed": False,
                        "error": message,
                    }
                )
            )
        else:
            print(f"{PROG}: FAILED: {message}")
        return EXIT_FAILED

    if args.sweep is not None:
        try:
            from hypothesis import strategies as st
        except ImportError as exc:
            raise UsageError(str(exc)) from exc
        description = {**description, **{n: st.sampled_from(v) for n, v in choices.items()}}
        try:
            result = sweep(
                f,
                description,
                dims=dims,
                ref=ref,
                examples=args.sweep,
                seed=args.seed,
                stream=None,
                **{k: v for k, v in options.items() if k != "seed"},
                **({"name": label} if label and isinstance(f, functools.partial) else {}),
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        if statics and not result.passed:
            result = dataclasses.replace(result, reproducer=_with_statics(result.reproducer, originals, statics))
        if args.json:
            print(
                json.dumps(
                    {"target": args.target, "mode": "sweep", "passed": result.passed, "sweep": result.to_dict()},
                    allow_nan=False,
                )
            )
        else:
            print(result)
        return EXIT_OK if result.passed else EXIT_FAILED

    named = _fixed_arguments(description, dims, args.seed)
    try:
        if ref is None:
            report = check_rule(f, kwargs=named, **options)
        else:
            params = list(inspect.signature(ref).parameters)
            bound = inspect.signature(ref).bind(**named)
            bound.apply_defaults()
            if bound.kwargs:  # **kwargs of the reference: passed by keyword
                f, ref = functools.partial(f, **bound.kwargs), functools.partial(ref, **bound.kwargs)
            report = check_vjp(f, ref, *bound.args, names=params[: len(bound.args)], name=label, **options)
    except TypeError as exc:
        raise UsageError(str(exc) + ("" if ref is not None else " (or pass --ref MODULE:FUNCTION)")) from exc
    except Exception as exc:  # noqa: BLE001 - the function rejected these arguments
        raise UsageError(
            f"{args.target} cannot be evaluated at these arguments: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    if args.json:
        print(
            json.dumps(
                {
                    "target": args.target,
                    "mode": "check",
                    "passed": report.passed,
                    "arguments": {
                        k: list(getattr(v, "shape", ())) if hasattr(v, "shape") else repr(v) for k, v in named.items()
                    },
                    "report": report.to_dict(),
                },
                allow_nan=False,
            )
        )
    else:
        print(report)
        print("all checks passed" if report.passed else report.failure_message(table=False))
    return EXIT_OK if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
