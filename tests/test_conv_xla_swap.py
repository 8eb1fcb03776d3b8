"""Second derivatives of the convolutions on shapes XLA's CPU compiler used to abort on.

XLA's algebraic simplifier swaps a convolution's operands when the kernel is
the larger and mishandles a spatial dimension with lhs dilation ``k``, stride
``k - 1``, no padding and an input not of size ``k``: a failed CHECK, which
kills the process.  jax.grad of the rules' formulas emitted that shape (e.g.
the second derivative of ``conv_transpose3d`` below); the rules now give such
a dimension a zero tap (``jaxconv._core.window.xla_extra_taps``).  Each case
runs in a subprocess, so an abort fails the test instead of ending pytest.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from jaxconv._core import window

ROOT = Path(__file__).resolve().parents[1]

# (ndim, transposed, spatial, kernel, stride, dilation, padding), size-1 kernel axes with dilation > 1 among them.
# The first four aborted the compiler before the fix (the first is the reported case); the others emit the shape
# too, where XLA's cost test did not swap.  A 1-D convolution never aborted: the swap needs a second spatial
# dimension, one where the kernel is larger than the input.
CASES = [
    (3, True, (3, 1, 2), (2, 1, 3), (2, 3, 1), (2, 1, 2), ((0, 0), (0, 0), (1, 1))),
    (2, True, (2, 2), (3, 1), (1, 3), (2, 1), ((1, 1), (1, 1))),
    (2, True, (1, 4), (2, 2), (1, 2), (3, 1), ((2, 0), (1, 1))),
    (3, False, (4, 3, 1), (2, 3, 1), (2, 3, 3), (1, 1, 2), ((1, 2), (2, 1), (1, 1))),
    (1, True, (3,), (2,), (2,), (1,), ((1, 1),)),
    (2, False, (4, 4), (2, 1), (2, 3), (1, 1), ((1, 1), (1, 0))),
    (3, False, (4, 1, 3), (2, 1, 1), (2, 2, 3), (1, 2, 3), ((1, 2), (2, 2), (2, 1))),
    (3, True, (2, 2, 3), (1, 1, 2), (1, 1, 2), (1, 3, 1), ((1, 0), (1, 0), (1, 1))),
]
# jaxconv.lax.conv_general_dilated (NHWC, HWIO): (spatial, kernel, window_strides, padding, lhs_dilation,
# rhs_dilation); the drop-in runs the same rules, and this one aborted before the fix.
LAX_CASES = [
    ((3, 2), (2, 3), (2, 3), ((0, 0), (0, 2)), (2, 2), (1, 1)),
]

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    import jaxconv
    from jaxconv import reference

    module = jaxconv if sys.argv[1] == "jaxconv" else reference
    lax_conv = jaxconv.lax.conv_general_dilated if sys.argv[1] == "jaxconv" else jax.lax.conv_general_dilated
    cases, lax_cases = eval(sys.argv[2])
    results = {}
    for i, case in enumerate(cases + lax_cases):
        rng = np.random.default_rng(i)
        if i < len(cases):
            ndim, transposed, spatial, kernel, stride, dilation, padding = case
            name = f"conv_transpose{ndim}d" if transposed else f"conv{ndim}d"
            x = rng.standard_normal((1, *spatial, 3 if transposed else 2))
            w = rng.standard_normal((*kernel, 2, 3))
            f = lambda a, b, op=getattr(module, name), o=dict(stride=stride, padding=padding, dilation=dilation): \
                op(a, b, **o)
        else:
            spatial, kernel, strides, padding, lhs_dilation, rhs_dilation = case
            x = rng.standard_normal((1, *spatial, 2))
            w = rng.standard_normal((*kernel, 2, 3))
            f = lambda a, b, c=case[2:]: lax_conv(a, b, *c, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        r = rng.standard_normal(jax.eval_shape(f, x, w).shape)
        loss = lambda a, b, f=f, r=r: jnp.sum(jnp.sin(f(a, b)) * r)
        outer = lambda a, b, loss=loss: sum(jnp.sum(jnp.cos(g)) for g in jax.grad(loss, (0, 1))(a, b))
        grads = jax.jit(jax.grad(outer, (0, 1)))(x, w)
        results.update({f"{i}x": np.asarray(grads[0]), f"{i}w": np.asarray(grads[1])})
    np.savez(sys.argv[3], **results)
""")


def _second_derivatives(module: str, path: Path, xla_flags: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), xla_flags]))
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, module, repr((CASES, LAX_CASES)), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_second_derivatives_compile_and_match_reference(tmp_path):
    # The rules' program under XLA's default passes: exit 0 (before the fix every case aborted here).
    got = _second_derivatives("jaxconv", tmp_path / "jaxconv.npz")
    assert got.returncode == 0, (got.returncode, got.stderr[-4000:])
    # jax.grad of plain lax, the reference, emits the mishandled shape on some of these cases too, so it runs
    # with the algebraic simplifier (the pass that aborts) switched off.
    want = _second_derivatives("reference", tmp_path / "reference.npz", "--xla_disable_hlo_passes=algsimp")
    assert want.returncode == 0, (want.returncode, want.stderr[-4000:])
    got, want = np.load(tmp_path / "jaxconv.npz"), np.load(tmp_path / "reference.npz")
    cases = CASES + LAX_CASES
    assert sorted(got.files) == sorted(want.files) and len(got.files) == 2 * len(cases)
    for key in want.files:
        scale = max(float(np.max(np.abs(want[key]))), 1e-300)
        err = float(np.max(np.abs(got[key] - want[key]))) / scale
        assert err <= 1e-12, (cases[int(key[:-1])], key[-1], err)


def test_extra_taps_only_for_the_mishandled_shape():
    # lhs dilation 2 = window 2, stride 1, no padding, input 3 != 2: the shape XLA's operand swap mishandles.
    assert window.xla_extra_taps(3, 2, 1, 0, 0, lhs_dil=2, depth=0) > 0
    # The same with an input of the window's size, or any padding: no tap.
    assert window.xla_extra_taps(2, 2, 1, 0, 0, lhs_dil=2, depth=0) == 0
    assert window.xla_extra_taps(3, 2, 1, 1, 0, lhs_dil=2, depth=0) == 0
    # A plain convolution and its transposes: no tap.
    assert window.xla_extra_taps(8, 3, 1, 1, 1) == 0
    assert window.xla_extra_taps(8, 3, 2, 1, 1, rhs_dil=2) == 0
    # The kernel gradient of the reported case (dilation 2 as stride, size-2 gradient as window, padding 1):
    # its lhs transpose has the shape; one zero tap clears it and its transposes.
    assert window.xla_extra_taps(4, 2, 2, 1, 1, depth=0) == 0
    assert window.xla_extra_taps(4, 2, 2, 1, 1, depth=1) > 0
