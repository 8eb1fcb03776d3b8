"""Command line: ``python -m jaxconv verify``."""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="check every hand-written VJP against jax.grad in float64")
    p_verify.add_argument("--op", action="append", help="only this op (repeatable)")
    p_verify.add_argument("--seed", type=int, default=0)
    p_verify.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    return args.func(args)
