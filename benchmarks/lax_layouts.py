"""Does the drop-in's layout change cost anything?  jaxconv.lax.conv_general_dilated on NCHW/OIHW (transposed to
channels-last and back inside the jitted program) against the same call on NHWC/HWIO and jaxconv.conv2d itself;
forward and VJP (dL/dx, dL/dw), float32, interleaved.  Not part of run.py's tables; numbers in docs/interop.md.

    python benchmarks/lax_layouts.py [--runs 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (benchmarks/run.py: the interleaved timer)

import jaxconv  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for n, h, c, o in [(128, 32, 32, 64), (128, 16, 64, 64)]:
        x = jnp.asarray(rng.standard_normal((n, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, o)), jnp.float32)
        x_nchw, w_oihw = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
        nhwc = lambda a, b: jaxconv.lax.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        nchw = lambda a, b: jaxconv.lax.conv_general_dilated(a, b, (1, 1), "SAME")  # noqa: E731
        direct = lambda a, b: jaxconv.conv2d(a, b, padding="SAME")  # noqa: E731
        calls = {}
        for name, fn, args_ in (
            ("conv2d", direct, (x, w)),
            ("lax NHWC", nhwc, (x, w)),
            ("lax NCHW", nchw, (x_nchw, w_oihw)),
        ):
            fwd = jax.jit(fn)
            vjp = jax.jit(lambda a, b, fn=fn: jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), (0, 1))(a, b))
            calls[f"{name} forward"] = lambda f=fwd, a=args_: jax.block_until_ready(f(*a))
            calls[f"{name} grad"] = lambda f=vjp, a=args_: jax.block_until_ready(f(*a))
        times = run.interleaved(calls, args.runs)
        print(f"x ({n}, {h}, {h}, {c}) -> {o}, 3x3 SAME, medians of {args.runs}:")
        for name, t in times.items():
            print(f"  {name:18s} {t['median_s'] * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
