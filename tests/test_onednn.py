"""The optional ``"onednn"`` conv forms (jaxconv.plan.onednn): oneDNN's kernels as XLA FFI custom calls.

oneDNN computes in float32 (or bfloat16), so these forms are checked against
the float64 reference by their float32 error (within 2x the direct form's, as
the planner asks of every form) on every conv and transposed-conv
configuration of the conformance harness (1-3 D, strides, dilations, groups),
through check_vjp's float32 mode, grad-of-grad (the custom calls' tangents
are the lax formulas), jit, vmap (batched, not looped), two threads at once,
``jax.export``, the bounded primitive cache, errors raised by the handler, and
the clean fallback where the handler was not built or the library is missing.
oneDNN's wheel exists for Linux x86-64, where CI installs it (``.ci/run``:
the ``onednn`` extra) and ``pip install`` builds the handler.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import plan, reference
from jaxconv.plan import onednn
from jaxconv.verify import check_vjp
from jaxconv.verify.registry import REGISTRY

pytestmark = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")),
    reason="oneDNN's wheel (onednn-cpu-gomp) exists for Linux x86-64 only",
)

ONEDNN = dict(conv_forward="onednn", conv_backward="onednn")
ONEDNN_BLOCKED = dict(conv_forward="onednn", conv_backward="onednn_blocked")
DIRECT = dict(conv_forward="conv", conv_backward="conv")
ROOT = Path(__file__).resolve().parents[1]


def test_handler_is_built_and_oneDNN_loads():
    """CI builds the handler (pip install) and installs the extra: these forms are tested wherever the wheel exists."""
    assert onednn.handler_path() is not None, "pip install did not build jaxconv/plan/_onednn_ffi.so"
    assert onednn.library_path() is not None, onednn.INSTALL_HINT
    assert onednn.available(), onednn.status()
    low, high = onednn.SUPPORTED_VERSIONS
    version = onednn.version()
    assert version is not None and low <= version[:2] < high
    assert onednn.status() == f"oneDNN {'.'.join(map(str, version))} through jaxconv's XLA FFI handler"
    assert onednn.dtype_supported(np.float32) and not onednn.dtype_supported(np.float64)


def _errors(case, forms, dtype=np.float32):
    """Normwise relative error of the outputs and every gradient of ``case`` in ``dtype`` under ``forms``,
    against its float64 reference."""
    args = [a for a in case.args if a is not None]
    f = (lambda *a: case.f(*a, None)) if len(args) < len(case.args) else case.f
    ref = (lambda *a: case.ref(*a, None)) if len(args) < len(case.args) else case.ref
    y, pullback = jax.vjp(ref, *map(jnp.asarray, args))
    g = np.random.default_rng(7).standard_normal(y.shape)
    exact = (y, *pullback(jnp.asarray(g)))
    with plan.forms(**forms):
        run = jax.jit(lambda a, g: (lambda yp: (yp[0], *yp[1](g)))(jax.vjp(f, *a)))
        low = run([jnp.asarray(a, dtype) for a in args], jnp.asarray(g, dtype))
    return [
        float(np.linalg.norm(np.asarray(b, np.float64) - np.asarray(a)) / np.linalg.norm(np.asarray(a)))
        for a, b in zip(exact, low)
    ]


CONV_CASES = [
    (name, i)
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
    for i in range(len(REGISTRY[name].grid))
]


@pytest.mark.parametrize("name,index", CONV_CASES, ids=[f"{n}-{i}" for n, i in CONV_CASES])
def test_every_conformance_configuration_within_twice_the_direct_forms_float32_error(name, index):
    spec = REGISTRY[name]
    case = spec.make(np.random.default_rng([index, 1]), spec.grid[index])
    direct = _errors(case, DIRECT)
    for forms in (ONEDNN, ONEDNN_BLOCKED):
        for label, e, d in zip(("y", *case.names), _errors(case, forms), direct):
            assert e <= 2 * d + 2e-7, (forms, case.label, label, e, d)


def test_bfloat16_runs_or_is_refused_by_the_planner():
    """Where the CPU has bfloat16 kernels, the forms run them (error within 2x the direct form's bfloat16
    error); elsewhere the planner runs its own forms and says why."""
    spec = REGISTRY["conv2d"]
    case = spec.make(np.random.default_rng(3), spec.grid[0])
    if onednn.dtype_supported(jnp.bfloat16):
        ours, direct = _errors(case, ONEDNN, jnp.bfloat16), _errors(case, DIRECT, jnp.bfloat16)
        for label, e, d in zip(("y", *case.names), ours, direct):
            assert e <= 2 * d + 1e-3, (label, e, d)
        with plan.forms(**ONEDNN):
            chosen = plan.conv_plan(**{**LAYER, "dtype": jnp.bfloat16})
        assert chosen[:2] == ("onednn", "onednn")
    else:
        with plan.forms(**ONEDNN):
            chosen = plan.conv_plan(**{**LAYER, "dtype": jnp.bfloat16})
        assert "onednn" not in chosen[:2] and "a data type it has kernels for" in chosen.reason


def _float32(*arrays):
    return [None if a is None else np.asarray(a, np.float32) for a in arrays]


def test_check_vjp_float32_with_bias_jit_and_eager(forms):
    forms(**ONEDNN)
    rng = np.random.default_rng(1)
    x, w, b = _float32(
        rng.standard_normal((3, 9, 8, 4)), rng.standard_normal((3, 3, 4, 5)) * 0.3, rng.standard_normal(5)
    )
    opts = dict(stride=(1, 2), padding="SAME")
    for jit in (True, False):
        report = check_vjp(
            lambda x, w, b: jaxconv.conv2d(x, w, b, **opts),
            lambda x, w, b: reference.conv2d(x, w, b, **opts),
            x,
            w,
            b,
            dtype=jnp.float32,
            finite_differences=False,
            second_order=False,
            jit=jit,
        )
        report.assert_ok()
        assert report.worst("vjp") <= 1e-5


def test_the_blocked_kernel_gradient_sums_blocks_of_at_most_eight_images(forms):
    """``"onednn_blocked"``: dW over blocks of ONEDNN_DW_BLOCK images (one vmapped custom call, summed in XLA),
    agreeing with the unblocked form, and with float32 error at most the unblocked one's on a long sum."""
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((96, 16, 16, 8)), rng.standard_normal((3, 3, 8, 16)) / 9
    f = lambda x, w: (jaxconv.conv2d(x, w, stride=2, padding="SAME") ** 2).sum() / 2
    exact = jax.grad(f, argnums=1)(x, w)
    got = {}
    for name, chosen in (("one", ONEDNN), ("blocked", ONEDNN_BLOCKED)):
        forms(**chosen)
        step = jax.jit(jax.grad(f, argnums=1))
        text = step.lower(*_float32(x, w)).as_text()
        assert text.count("custom_call @jaxconv_onednn_kernel_grad(") == 1, name
        got[name] = np.asarray(step(*_float32(x, w)), np.float64)
    assert plan.ONEDNN_DW_BLOCK == 8 and "tensor<12x96x8x8x8xf32>" not in text  # 12 blocks of 8 images
    assert re.search(r"custom_call @jaxconv_onednn_kernel_grad\(%\w+, %\w+\).*tensor<12x8x16x16x8xf32>", text)
    errors = {k: float(np.linalg.norm(v - exact) / np.linalg.norm(exact)) for k, v in got.items()}
    assert errors["blocked"] <= errors["one"] * 1.5 and errors["blocked"] < 1e-5, errors


def test_the_custom_calls_really_run(forms):
    forms(**ONEDNN)
    x, w = jnp.ones((2, 6, 6, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)
    step = jax.jit(lambda x, w: jax.value_and_grad(lambda x, w: jaxconv.conv2d(x, w).sum(), argnums=(0, 1))(x, w))
    text = step.lower(x, w).as_text()
    for target in onednn.TARGETS.values():
        assert text.count(f"custom_call @{target}(") == 1, target
    assert "convolution" not in text and "callback" not in text
    # Each call's workspace is its second result, allocated by XLA (counted by memory_analysis).
    calls = [line for line in text.splitlines() if "custom_call @jaxconv_onednn" in line]
    assert len(calls) == 3 and all(re.search(r", tensor<\d+xui8>\)$", line) for line in calls), calls


def test_second_order_through_the_lax_tangents(forms):
    """grad-of-grad: the callbacks' derivatives are the lax formulas (bilinear tangents)."""
    rng = np.random.default_rng(2)
    x, w = (jnp.asarray(a, jnp.float32) for a in (rng.standard_normal((2, 7, 6, 3)), rng.standard_normal((3, 3, 3, 4))))

    def hessian_vector(op):
        inner = lambda x, w: (op(x, w, padding=1) ** 2).sum()
        return jax.grad(lambda x, w: (jax.grad(inner, argnums=1)(x, w) ** 2).sum(), argnums=(0, 1))(x, w)

    forms(**ONEDNN)
    ours = jax.jit(lambda: hessian_vector(jaxconv.conv2d))()
    want = hessian_vector(reference.conv2d)
    for a, b in zip(ours, want):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5


def test_vmap_over_images_is_one_call_on_the_folded_batch(forms):
    """vmap with one kernel: one custom call per formula on (B, N, ...) operands (the handler folds B into
    N), no loop; vmapped kernels: one call too, and both agree with the lax forms."""
    forms(**ONEDNN)
    rng = np.random.default_rng(5)
    xs, w = _float32(rng.standard_normal((3, 2, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4)))
    f = lambda x, w: (jaxconv.conv2d(x, w, padding="SAME") ** 2).sum()
    step = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(0, None)))
    text = step.lower(xs, w).as_text()
    assert "while" not in text and text.count("custom_call @jaxconv_onednn_forward(") == 1
    ours = step(xs, w)
    with plan.forms(**DIRECT):
        want = jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(0, None))(xs, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)
    ws = np.stack([w, -w, 2 * w])
    per = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1))))
    assert "while" not in per.lower(xs, ws).as_text()
    with plan.forms(**DIRECT):
        want = jax.vmap(jax.value_and_grad(f, argnums=(0, 1)))(xs, ws)
    for a, b in zip(jax.tree.leaves(per(xs, ws)), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)


def test_vmap_and_transposed_convolution(forms):
    forms(**ONEDNN)
    rng = np.random.default_rng(3)
    xs, ws = _float32(rng.standard_normal((2, 3, 6, 6, 2)), rng.standard_normal((2, 3, 3, 2, 4)))
    batched = lambda op: jax.vmap(lambda x, w: op(x, w, padding="SAME"))
    check_vjp(
        batched(jaxconv.conv2d),
        batched(reference.conv2d),
        xs,
        ws,
        dtype=jnp.float32,
        finite_differences=False,
        second_order=False,
    ).assert_ok()
    y, w = _float32(rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((3, 3, 2, 3)))
    opts = dict(stride=2, padding=1, output_padding=1)
    check_vjp(
        lambda y, w: jaxconv.conv_transpose2d(y, w, **opts),
        lambda y, w: reference.conv_transpose2d(y, w, **opts),
        y,
        w,
        dtype=jnp.float32,
        finite_differences=False,
        second_order=False,
    ).assert_ok()


def test_keeps_x_and_w_only(forms, capsys):
    forms(**ONEDNN)
    x, w = jnp.zeros((4, 10, 10, 3), jnp.float32), jnp.zeros((3, 3, 3, 5), jnp.float32)
    capsys.readouterr()
    print_saved_residuals(lambda x, w: jaxconv.conv2d(x, w, padding="SAME").sum(), x, w)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "f32[4,10,10,3]" in lines[0] and "f32[3,3,3,5]" in lines[1], lines


def test_float64_and_other_platforms_run_the_planners_forms(forms):
    forms(**ONEDNN)
    common = dict(
        batch=8,
        out_spatial=(12, 11),
        kernel_spatial=(3, 3),
        in_channels=4,
        out_channels=8,
        stride=(1, 1),
        platform="cpu",
    )
    assert plan.conv_plan(groups=1, dtype=jnp.float32, **common)[:2] == ("onednn", "onednn")
    assert plan.conv_plan(groups=2, dtype=jnp.float32, **common)[:2] == ("onednn", "onednn")
    for case in (dict(groups=1, dtype=jnp.float64), dict(groups=1, dtype=jnp.float32, platform="gpu")):
        chosen = plan.conv_plan(**{**common, **case})
        assert "onednn" not in chosen[:2] and "onednn needs" in chosen.reason
    # float64 (the suite's default here) then simply runs and agrees to 1e-12.
    rng = np.random.default_rng(4)
    check_vjp(
        lambda x, w: jaxconv.conv2d(x, w, padding=1),
        lambda x, w: reference.conv2d(x, w, padding=1),
        rng.standard_normal((2, 6, 6, 2)),
        rng.standard_normal((3, 3, 2, 3)),
        finite_differences=False,
        second_order=False,
    ).assert_ok()


def test_two_threads_at_once_agree_with_one():
    """No global lock: two threads run the compiled step concurrently (each call brings its own scratchpad
    and stream); every result equals the one-thread result to float32 rounding (oneDNN's OpenMP reductions
    may split differently when two calls share the cores: measured <= 7e-7 of the largest entry; a race on
    a shared buffer would be off by O(1))."""
    rng = np.random.default_rng(6)
    cases = [
        _float32(rng.standard_normal((8, 16, 16, 8)), rng.standard_normal((3, 3, 8, 16))),
        _float32(rng.standard_normal((4, 12, 12, 16)), rng.standard_normal((5, 5, 16, 8))),
    ]
    with plan.forms(**ONEDNN):
        steps = [
            jax.jit(jax.grad(lambda x, w: (jaxconv.conv2d(x, w, padding="SAME") ** 2).sum(), argnums=(0, 1)))
            for _ in cases
        ]
        want = [jax.block_until_ready(step(*case)) for step, case in zip(steps, cases)]
    failures: list = []

    def work(k):
        try:
            for _ in range(25):
                got = jax.block_until_ready(steps[k](*cases[k]))
                worst = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want[k]))
                if worst > 1e-5:
                    failures.append((k, worst))
        except Exception as err:  # reported below
            failures.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_export_with_the_custom_calls_allowed(forms):
    forms(**ONEDNN)
    rng = np.random.default_rng(8)
    x, w = _float32(rng.standard_normal((2, 9, 9, 3)), rng.standard_normal((3, 3, 3, 4)))
    grads = jax.jit(jax.grad(lambda x, w: (jaxconv.conv2d(x, w, stride=2, padding=1) ** 2).sum(), argnums=(0, 1)))
    with pytest.raises(ValueError, match="jaxconv_onednn"):
        jax.export.export(grads)(x, w)  # custom calls are refused unless named
    exported = jax.export.export(grads, disabled_checks=onednn.disabled_checks())(x, w)
    assert all(f"@{t}(" in exported.mlir_module() for t in ("jaxconv_onednn_input_grad", "jaxconv_onednn_kernel_grad"))
    for a, b in zip(exported.call(x, w), grads(x, w)):
        np.testing.assert_array_equal(a, b)


def test_the_primitive_cache_is_bounded_and_frees_the_least_recently_used():
    rng = np.random.default_rng(9)
    before = onednn.cache_info()
    try:
        onednn.set_cache_size(2)
        assert onednn.cache_info()["entries"] <= 2 and onednn.cache_info()["capacity"] == 2
        for size in (5, 6, 7, 8):
            x, w = _float32(rng.standard_normal((2, size, size, 3)), rng.standard_normal((3, 3, 3, 4)))
            y = onednn.forward(x, w, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
            with plan.forms(**DIRECT):
                np.testing.assert_allclose(y, jaxconv.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)
            assert onednn.cache_info()["entries"] <= 2
        onednn.clear_cache()
        assert onednn.cache_info()["entries"] == 0
    finally:
        onednn.set_cache_size(before["capacity"])
    with pytest.raises(ValueError, match=r"`capacity` \(=-1\)"):
        onednn.set_cache_size(-1)


def test_the_handlers_errors_are_xla_errors_naming_the_cause():
    x, w = np.ones((2, 6, 6, 3)), np.ones((3, 3, 3, 4))  # float64: no oneDNN kernels
    with pytest.raises(Exception, match="jaxconv oneDNN: only float32 and bfloat16"):
        jax.block_until_ready(onednn.forward(x, w, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)))
    x, w = _float32(x, w)
    with pytest.raises(Exception, match="jaxconv oneDNN: the kernel's input channels times groups"):
        jax.block_until_ready(onednn.forward(x, w, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=3))


def _child(code: str, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, env=environ)  # fmt: skip


FALLBACK = """
    import jax, jax.numpy as jnp, jaxconv
    from jaxconv import plan
    from jaxconv.plan import onednn
    print("available", onednn.available())
    print("status", onednn.status())
    try:
        plan.forms(conv_forward="onednn").__enter__()
    except ValueError as err:
        print("forced", err)
    print(repr(plan.conv_plan(batch=8, out_spatial=(8, 8), kernel_spatial=(3, 3), in_channels=4, out_channels=8,
                              groups=1, stride=(1, 1), platform="cpu", dtype=jnp.float32)))
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    g = jax.grad(lambda x, w: jaxconv.conv2d(x, w, padding=1).sum(), argnums=(0, 1))(x, w)
    print("grads", float(g[0].sum()), float(g[1].sum()))
"""


@pytest.mark.parametrize("missing", ["handler", "library"])
def test_without_the_handler_or_the_library_the_xla_forms_run_and_say_why(tmp_path, missing):
    env = {onednn.HANDLER_ENV if missing == "handler" else onednn.LIBRARY_ENV: str(tmp_path / "absent.so")}
    out = _child(FALLBACK, **env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "available False" in lines
    why = "cannot load jaxconv's oneDNN handler" if missing == "handler" else "oneDNN could not be opened"
    status = next(line for line in lines if line.startswith("status "))
    assert why in status and "absent.so" in status and status.endswith("the XLA forms run")
    assert any(line.startswith("forced `conv_forward` (='onednn') cannot run here: oneDNN forms unavailable")
               for line in lines)  # fmt: skip
    assert any(line.startswith("  note: oneDNN forms unavailable") for line in lines), lines
    assert lines[-1] == "grads 432.0 432.0" or lines[-1].startswith("grads ")
    assert float(lines[-1].split()[1]) > 0


def test_a_build_without_a_compiler_installs_without_the_handler(tmp_path):
    """setup.py's extension is optional: with no working C++ compiler the build succeeds, no handler is
    written, and jaxconv then runs on the XLA forms (the test above)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "jaxconv", tmp_path / "jaxconv", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    broken = {"CC": "false", "CXX": "false", "LDSHARED": "false", "LDCXXSHARED": "false"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, **broken})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not list((tmp_path / "jaxconv" / "plan").glob("_onednn_ffi*.so"))
    assert "_onednn_ffi" in out.stderr + out.stdout  # setuptools names the optional extension it skipped


def _table(tmp_path, forward, backward, errors=(1.2, 1.1, 1.5), blocked_errors=None, **geometry):
    ratios = {"onednn/onednn": list(errors)}
    if blocked_errors is not None:
        ratios["onednn/onednn_blocked"] = list(blocked_errors)
    row = dict(
        name="a measured layer", batch=64, out_spatial=[16, 16], kernel=[3, 3], in_channels=32, out_channels=32,
        stride=[1, 1], forward=forward, backward=backward, error_ratio=ratios,
    )  # fmt: skip
    row.update(geometry)
    path = tmp_path / f"table{len(list(tmp_path.glob('table*.json')))}.json"  # a new path: tables are read once
    path.write_text(json.dumps(dict(machine=dict(cpu="test"), layers=[row])))
    return str(path)


LAYER = dict(
    batch=64, out_spatial=(16, 16), kernel_spatial=(3, 3), in_channels=32, out_channels=32, groups=1, stride=(1, 1),
    platform="cpu", dtype=jnp.float32,
)  # fmt: skip


def test_the_planner_picks_onednn_where_the_table_measured_it_faster(tmp_path, monkeypatch):
    with plan.forms(onednn=False):  # the hand-set rules' choice
        own = plan.conv_plan(**LAYER)
    assert "onednn" not in own[:2]
    faster = {own.forward: 0.004, "onednn": 0.002}, {own.backward: 0.009, "onednn": 0.003}
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *faster))
    chosen = plan.conv_plan(**LAYER)
    assert chosen[:2] == ("onednn", "onednn"), chosen
    assert "measured on a measured layer: forward onednn 2.00 ms vs" in chosen.reason
    # A neighbour within 2x of channels and positions stands for the layer; farther ones do not.
    assert plan.conv_plan(**{**LAYER, "in_channels": 48, "batch": 100})[:2] == ("onednn", "onednn")
    for other in (dict(in_channels=128), dict(batch=8), dict(kernel_spatial=(5, 5)), dict(stride=(2, 2))):
        assert "onednn" not in plan.conv_plan(**{**LAYER, **other})[:2], other
    # Kept off it: float64, groups, another platform, a forced form, or forms(onednn=False).
    for other in (dict(dtype=jnp.float64), dict(groups=2), dict(platform="gpu")):
        assert "onednn" not in plan.conv_plan(**{**LAYER, **other})[:2], other
    with plan.forms(onednn=False):
        assert plan.conv_plan(**LAYER)[:2] == own[:2]
    with plan.forms(conv_forward="conv", conv_backward="conv"):
        assert plan.conv_plan(**LAYER)[:2] == ("conv", "conv")
    # Part by part: near-ties go to oneDNN; the planner's own form stays where it measured MEASURED_MARGIN faster.
    close = {own.forward: 0.004, "onednn": 0.0042}, {own.backward: 0.003, "onednn": 0.009}
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *close))
    assert plan.conv_plan(**LAYER)[:2] == ("onednn", own.backward)
    slower = {own.forward: 0.004, "onednn": 0.0045}, {own.backward: 0.003, "onednn": 0.0031}
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *slower))
    assert plan.conv_plan(**LAYER)[:2] == (own.forward, "onednn")
    # Never where its float32 error on that layer was over 2x the direct form's (y: forward; dx, dw: backward).
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *faster, errors=(1.0, 1.3, 2.78)))
    chosen = plan.conv_plan(**LAYER)
    assert chosen[:2] == ("onednn", own.backward) and "backward onednn's float32 error 2.78x" in chosen.reason
    # ... where the blocked dW keeps within it, the backward is that form (if it is still faster).
    blocked = faster[0], {**faster[1], "onednn_blocked": 0.005}
    monkeypatch.setenv(
        plan.planner.TABLE_ENV, _table(tmp_path, *blocked, errors=(1.0, 1.3, 2.78), blocked_errors=(1.0, 1.3, 1.4))
    )
    assert plan.conv_plan(**LAYER)[:2] == ("onednn", "onednn_blocked")
    slow_blocked = faster[0], {**faster[1], "onednn_blocked": 0.011}
    monkeypatch.setenv(
        plan.planner.TABLE_ENV,
        _table(tmp_path, *slow_blocked, errors=(1.0, 1.3, 2.78), blocked_errors=(1.0, 1.3, 1.4)),
    )
    assert plan.conv_plan(**LAYER)[:2] == ("onednn", own.backward)
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *faster, errors=(2.5, 1.3, 1.0)))
    assert plan.conv_plan(**LAYER)[:2] == (own.forward, "onednn")
    monkeypatch.setenv(plan.planner.TABLE_ENV, _table(tmp_path, *faster, errors=()))
    assert plan.conv_plan(**LAYER)[:2] == own[:2]  # no errors measured: not picked
    with pytest.raises(ValueError, match=r"`onednn` \(='yes'\)"):
        plan.forms(onednn="yes").__enter__()


def test_an_unreadable_table_leaves_the_hand_set_rules(tmp_path, monkeypatch):
    for text in ("not json", json.dumps({"layers": "no"}), json.dumps({"layers": [{"kernel": 3}]})):
        (tmp_path / "bad.json").write_text(text)
        monkeypatch.setenv(plan.planner.TABLE_ENV, str(tmp_path / "bad.json"))
        plan.planner._read_table.cache_clear()  # tables are read once per path
        assert "onednn" not in plan.conv_plan(**LAYER)[:2]


def test_the_shipped_table_and_the_default_choice_end_to_end():
    """The installed table covers the benchmark layers with every form's times; on a layer where it measured
    oneDNN faster, the default (nothing forced) program runs the custom calls and agrees with the lax forms."""
    layers = plan.measured_layers()
    assert len(layers) >= 10 and all({"conv", "onednn"} <= set(r["forward"]) for r in layers)
    row = min(
        (r for r in layers if r["backward"]["onednn"] * plan.planner.MEASURED_MARGIN < min(r["backward"].values())
         or r["backward"]["onednn"] == min(r["backward"].values())),
        key=lambda r: r["batch"] * np.prod(r["out_spatial"]) * r["in_channels"] * r["out_channels"],
    )  # fmt: skip
    k, s = row["kernel"][0], row["stride"][0]
    x_size = (row["out_spatial"][0] - 1) * s + k if "VALID" in row["name"] else row["out_spatial"][0] * s
    padding = "VALID" if "VALID" in row["name"] else "SAME"
    rng = np.random.default_rng(10)
    x, w = _float32(
        rng.standard_normal((row["batch"], x_size, x_size, row["in_channels"])),
        rng.standard_normal((k, k, row["in_channels"], row["out_channels"])) / np.sqrt(k * k * row["in_channels"]),
    )
    loss = lambda x, w: (jaxconv.conv2d(x, w, stride=s, padding=padding) ** 2).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "custom_call @jaxconv_onednn" in step.lower(x, w).as_text(), row["name"]
    with plan.forms(**DIRECT):
        want = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    for a, b in zip(step(x, w), want):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5
    with plan.forms(onednn=False):
        assert "jaxconv_onednn" not in jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
