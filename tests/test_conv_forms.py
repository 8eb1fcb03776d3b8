"""conv2d's backward forms beyond tests/test_conv.py: the blocked im2row form
split into several batch blocks (test_conv.py's small shapes fit in one block),
the platform/shape switch, and residual memory against autodiff."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.ad_checkpoint import print_saved_residuals

import jaxconv
from jaxconv import reference
from jaxconv.ops import conv as conv_module
from jaxconv.plan import im2row
from jaxconv.verify import check_vjp

from ._grids import CONV2D_GRID, conv_arrays, conv_pair
from .strategies import conv_configs

# CONV2D_GRID's first five configurations with batches of 4-6 images, cut into blocks of 1-3.
BLOCKED_GRID = [
    ((batch, *x_shape[1:]), w_shape, options)
    for batch, (x_shape, w_shape, options) in zip((4, 6, 4, 4, 6), CONV2D_GRID)
]


@pytest.fixture(params=[(1, "im2row_blocked"), (2, "im2row_blocked"), (1, "mixed")])
def blocked(request, forms):
    """Force a blocked backward ("im2row_blocked", or "mixed": its dL/dw) and the
    blocked forward, with a block budget of about `param[0]` images."""
    images, backward = request.param
    forms(conv_backward=backward, conv_forward="im2row_blocked")
    return images


def _set_budget(monkeypatch, images, x_shape, w_shape, options):
    """A phi budget that holds exactly ``images`` images of this convolution."""
    out = jax.eval_shape(lambda x, w: reference.conv2d(x, w, **options), jnp.zeros(x_shape), jnp.zeros(w_shape)).shape
    per_image = out[1] * out[2] * w_shape[0] * w_shape[1] * x_shape[3] * 8
    monkeypatch.setattr(im2row, "BLOCK_BYTES", images * per_image)
    n = x_shape[0]
    block = im2row.batch_block(n, per_image, images * per_image)
    assert block < n and n % block == 0  # really split into several blocks
    return block


@pytest.mark.parametrize("x_shape,w_shape,options", BLOCKED_GRID)
def test_blocked_float64_full_check(blocked, monkeypatch, x_shape, w_shape, options):
    _set_budget(monkeypatch, blocked, x_shape, w_shape, options)
    f, ref = conv_pair(options)
    report = check_vjp(f, ref, *conv_arrays(np.random.default_rng(0), x_shape, w_shape), names=("x", "w", "b"))
    report.assert_ok()
    assert report.worst("vjp") <= 1e-12


@pytest.mark.parametrize("x_shape,w_shape,options", BLOCKED_GRID[:3])
def test_blocked_float32(monkeypatch, forms, x_shape, w_shape, options):
    forms(conv_backward="im2row_blocked", conv_forward="im2row_blocked")
    _set_budget(monkeypatch, 2, x_shape, w_shape, options)
    f, ref = conv_pair(options)
    report = check_vjp(
        f,
        ref,
        *conv_arrays(np.random.default_rng(1), x_shape, w_shape, dtype=np.float32),
        dtype=jnp.float32,
        finite_differences=False,
        second_order=False,
    )
    report.assert_ok()
    assert report.worst("vjp") <= 1e-5


@settings(max_examples=6)
@given(config=conv_configs())
def test_blocked_hypothesis(config):
    """Drawn configurations with batch 2-6, blocks of one image: every block path."""
    x_shape = (2 * config["x_shape"][0],) + config["x_shape"][1:]
    previous, im2row.BLOCK_BYTES = im2row.BLOCK_BYTES, 1
    try:
        with jaxconv.plan.forms(conv_backward="im2row_blocked", conv_forward="im2row_blocked"):
            f, ref = conv_pair(config["options"])
            args = conv_arrays(np.random.default_rng(2), x_shape, config["w_shape"], config["bias"])
            check_vjp(f, ref, *args, finite_differences=False, second_order=False).assert_ok()
    finally:
        im2row.BLOCK_BYTES = previous


def test_blocked_vmap_and_jit(monkeypatch, forms):
    forms(conv_backward="im2row_blocked", conv_forward="im2row_blocked")
    monkeypatch.setattr(im2row, "BLOCK_BYTES", 1)
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((3, 4, 6, 6, 2)))
    ws = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)))
    opts = dict(stride=2, padding=1)
    batched = lambda op: jax.vmap(lambda x, w: op(x, w, **opts))
    check_vjp(batched(jaxconv.conv2d), batched(reference.conv2d), xs, ws).assert_ok()


@pytest.mark.parametrize(
    "n,per_image,budget,expected",
    [
        (128, 10, 45, 4),
        (128, 10, 10**9, 128),
        (128, 10, 5, 1),
        (7, 1, 6, 1),
        (12, 1, 5, 4),
        (1, 100, 1, 1),
    ],
)
def test_batch_block_is_largest_fitting_divisor(n, per_image, budget, expected):
    assert im2row.batch_block(n, per_image, budget) == expected


def _plan(x_shape, w_shape, stride=(1, 1), groups=1, platform="cpu"):
    """The planner's choice for a VALID convolution of these shapes."""
    n, h, w, c = x_shape
    kh, kw, _, o = w_shape
    out = tuple((size - k) // s + 1 for size, k, s in zip((h, w), (kh, kw), stride))
    return jaxconv.plan.conv_plan(
        batch=n,
        out_spatial=out,
        kernel_spatial=(kh, kw),
        in_channels=c,
        out_channels=o,
        groups=groups,
        stride=stride,
        platform=platform,
    )


def test_backward_plan_by_platform_and_shape(forms):
    big = ((128, 32, 32, 64), (3, 3, 64, 64))
    tiny = ((2, 6, 6, 3), (3, 3, 3, 4))
    narrow = ((128, 32, 32, 16), (3, 3, 16, 16))  # dY F^T would contract over 16
    assert _plan(*big).backward == "winograd2"  # 3x3, stride 1, 64 channels: F(2x2, 3x3)
    assert _plan(*big, stride=(2, 2)).backward == "im2row_blocked"
    assert _plan((128, 14, 14, 64), (5, 5, 64, 128)).backward == "im2row_blocked"  # 5x5: no tile within 2x
    assert _plan(*tiny).backward == "conv"
    assert _plan((1, 2048, 2048, 64), (3, 3, 64, 64)).backward == "conv"  # phi: 2.4e9 entries
    assert _plan((128, 16, 16, 128), (3, 3, 32, 128), groups=4).backward == "im2row_blocked"
    assert _plan(*narrow).backward == "conv"  # narrow GEMMs both ways: XLA's convolutions
    assert _plan(*narrow, stride=(2, 2)).backward == "im2row_blocked"  # strided: dX's conv form is slow
    assert _plan((128, 16, 16, 64), (3, 3, 16, 64), groups=4).backward == "conv"  # 16 per group
    assert _plan(*big, platform="gpu") == ("conv", "conv", "on gpu, XLA's convolutions", "gpu")
    forms(conv_backward="im2row")
    forced = _plan(*big, platform="gpu")
    assert forced.backward == "im2row" and forced.forward == "conv" and "forced" in forced.reason
    assert set(jaxconv.plan.CONV_BACKWARD_FORMS) == set(conv_module._BACKWARD_FORMS)
    assert set(jaxconv.plan.CONV_FORWARD_FORMS) == set(conv_module._FORWARD_FORMS)


def test_forward_plan_by_platform_and_shape(forms):
    """The matrix-product forward where the blocked backward pays and the GEMM is
    at least 32 wide both ways; XLA's convolution otherwise and on GPU."""
    assert _plan((128, 14, 14, 64), (5, 5, 64, 128)).forward == "im2row_blocked"  # LeNet-CIFAR conv 2
    assert _plan((128, 32, 32, 3), (5, 5, 3, 64)).forward == "im2row_blocked"  # K = 75
    assert _plan((128, 28, 28, 1), (5, 5, 1, 32)).forward == "conv"  # K = 25
    assert _plan((128, 32, 32, 16), (3, 3, 16, 16)).forward == "conv"  # 16 output channels
    assert _plan((128, 16, 16, 128), (3, 3, 1, 128), groups=128).forward == "conv"  # depthwise: K = 9
    assert _plan((2, 6, 6, 3), (3, 3, 3, 64)).forward == "conv"  # tiny
    assert _plan((128, 16, 16, 128), (3, 3, 128, 128), stride=(2, 2)).forward == "conv"  # XLA's is at peak
    assert _plan((128, 16, 16, 128), (3, 3, 128, 128)).forward == "winograd2"  # stride 1: F(2x2, 3x3)
    assert _plan((128, 16, 16, 128), (3, 3, 64, 128), groups=2).forward == "im2row_blocked"  # 64 per group
    assert _plan((128, 14, 14, 64), (5, 5, 64, 128), platform="gpu").forward == "conv"
    forms(conv_forward="im2row_blocked")
    assert _plan((2, 6, 6, 3), (3, 3, 3, 4)).forward == "im2row_blocked"


def test_unknown_forced_form_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`conv_forward` \(='winograd'\) must be one of"):
        with jaxconv.plan.forms(conv_forward="winograd"):
            pass
    with pytest.raises(ValueError, match=r"`conv_backward` \(='winograd'\)"):
        jaxconv.plan.forms(conv_backward="winograd").__enter__()
    with pytest.raises(ValueError, match=r"`pool` \(='tiles'\)"):
        jaxconv.plan.forms(pool="tiles").__enter__()


def test_forced_forms_nest_and_end_with_their_block():
    x, w = jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1))
    with jaxconv.plan.forms(conv_backward="im2row"):
        with jaxconv.plan.forms(conv_forward="im2row_blocked"):
            assert (jaxconv.plan.forced("conv_backward"), jaxconv.plan.forced("conv_forward")) == (
                "im2row",
                "im2row_blocked",
            )
        assert jaxconv.plan.forced("conv_forward") is None
    assert jaxconv.plan.forced("conv_backward") is None
    jaxconv.conv2d(x, w)  # the planner's again


def test_platform_is_the_arrays_device():
    cpu = jax.devices("cpu")[0]
    assert jaxconv.plan.platform_of(jax.device_put(jnp.zeros(3), cpu)) == "cpu"
    assert jaxconv.plan.platform_of(np.zeros(3)) == jax.default_backend()
    with jax.default_device(cpu):
        assert jaxconv.plan.platform_of(np.zeros(3)) == "cpu"
    seen = []
    jax.jit(lambda x: seen.append(jaxconv.plan.platform_of(x)) or x)(jnp.zeros(3))
    assert seen == [jax.default_backend()]  # a tracer: the default device's platform


def test_symbolic_batch_exports_every_model():
    """jax.export with a symbolic batch: the planner takes the forms that need no size."""
    from jax import export

    from jaxconv import train
    from jaxconv.nn import models

    for name, shape in [("resnet_small", (8, 8, 1)), ("lenet5", (28, 28, 1)), ("alexnet_small", (32, 32, 3))]:
        init, apply = models.MODELS[name](10)
        _, params = train.init_params(init, (1, *shape))
        spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, " + ", ".join(map(str, shape))), jnp.float32)
        loss = jax.jit(jax.grad(lambda p, x: apply(p, x).sum()))
        exported = export.export(loss)(params, spec)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((3, *shape)), jnp.float32)
        for a, b in zip(jax.tree.leaves(exported.call(params, x)), jax.tree.leaves(loss(params, x))):
            # float32, two compilations that may associate sums differently; gradients are O(1).
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    symbolic = jaxconv.plan.conv_plan(
        batch=export.symbolic_shape("b")[0],
        out_spatial=(30, 30),
        kernel_spatial=(3, 3),
        in_channels=64,
        out_channels=64,
        groups=1,
        stride=(1, 1),
        platform="cpu",
    )
    assert symbolic.backward == symbolic.forward == "conv" and "symbolic" in symbolic.reason


@pytest.mark.parametrize("forward", sorted(conv_module._FORWARD_FORMS))
def test_forward_forms_agree_in_float32(monkeypatch, forms, forward):
    """Each forward on a LeNet-sized layer, in float32, within rounding of XLA's."""
    forms(conv_forward=forward)
    monkeypatch.setattr(im2row, "BLOCK_BYTES", 2**16)  # several blocks
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((8, 14, 14, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 5, 16, 32)) / 20, jnp.float32)
    b = jnp.asarray(rng.standard_normal(32), jnp.float32)
    got = jax.jit(lambda x, w, b: jaxconv.conv2d(x, w, b, stride=2, padding="SAME"))(x, w, b)
    want = reference.conv2d(x, w, b, stride=2, padding="SAME")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _residual_bytes(capsys, f, *args):
    """Bytes of what reverse mode keeps for ``f``, read off print_saved_residuals."""
    capsys.readouterr()
    print_saved_residuals(f, *args)
    lines = capsys.readouterr().out.splitlines()
    sizes = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}
    total = 0
    for line in lines:
        match = re.match(r"(\w+)\[([\d,]*)\]", line)
        assert match, line
        dims = [int(d) for d in match.group(2).split(",") if d]
        total += sizes[match.group(1)] * int(np.prod(dims))
    return total, lines


@pytest.mark.parametrize("form", sorted(conv_module._BACKWARD_FORMS))
@pytest.mark.parametrize("forward", sorted(conv_module._FORWARD_FORMS))
@pytest.mark.parametrize("bias", [False, True])
def test_saves_no_more_residuals_than_autodiff(forms, capsys, form, forward, bias):
    """The rule keeps x and w, as autodiff does, never phi, the output or b."""
    forms(conv_backward=form, conv_forward=forward)
    x, w = jnp.zeros((8, 12, 12, 4)), jnp.zeros((3, 3, 4, 6))
    b = jnp.zeros(6) if bias else None
    opts = dict(stride=2, padding="SAME")
    ours, ours_lines = _residual_bytes(capsys, lambda x, w: jaxconv.conv2d(x, w, b, **opts).sum(), x, w)
    autodiff, _ = _residual_bytes(capsys, lambda x, w: reference.conv2d(x, w, b, **opts).sum(), x, w)
    assert ours <= autodiff, ours_lines
    assert ours == (x.size + w.size) * x.dtype.itemsize


def test_importing_and_running_an_op_does_not_load_onednn():
    """The optional oneDNN module (ctypes, a shared library) loads only when a oneDNN form is forced or asked
    about: not on ``import jaxconv``, nor when the planner's own forms run; ``jaxconv.plan.onednn`` stays
    reachable and loads it then."""
    child = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp
        import jaxconv
        x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
        jax.grad(lambda x, w: jaxconv.conv2d(x, w, padding=1).sum(), argnums=(0, 1))(x, w)
        jaxconv.plan.conv_plan(batch=2, out_spatial=(8, 8), kernel_spatial=(3, 3), in_channels=3, out_channels=4,
                               groups=1, stride=(1, 1), platform="cpu")
        before = "jaxconv.plan.onednn" in sys.modules
        available = jaxconv.plan.onednn.available()
        print(before, "jaxconv.plan.onednn" in sys.modules, callable(jaxconv.plan.onednn.forward))
    """)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(jaxconv.__file__)), os.environ.get("PYTHONPATH", "")]
        ),
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"], out.stdout


def test_a_function_jitted_before_a_forms_block_is_traced_again_inside_it():
    """The forced forms are part of jit's cache key: the same jitted function traces again inside the block
    (with the forced forms: matrix products, no convolution), and reuses its first trace after it."""
    traces = []

    def grads(x, w):
        traces.append(jaxconv.plan.forced("conv_backward"))
        return jax.grad(lambda x, w: (jaxconv.conv2d(x, w, padding=1) ** 2).sum(), argnums=(0, 1))(x, w)

    f = jax.jit(grads)
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    outside = f(x, w)
    text = f.lower(x, w).as_text()
    assert "stablehlo.convolution" in text and "stablehlo.dot_general" not in text  # the planner's: "conv"
    with jaxconv.plan.forms(conv_forward="im2row_blocked", conv_backward="im2row"):
        inside = f(x, w)
        text = f.lower(x, w).as_text()
    assert "stablehlo.convolution" not in text and "stablehlo.dot_general" in text
    assert traces[:2] == [None, "im2row"]
    f(x, w)
    assert len(traces) == len(set(traces)) == 2, traces  # after the block: the first trace, from jit's cache
    for a, b in zip(outside, inside):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize(
    "forward,backward",
    [
        (f, b)
        for f in jaxconv.plan.CONV_FORWARD_FORMS
        for b in jaxconv.plan.CONV_BACKWARD_FORMS
        if f == b or (f, b) in {("conv", "mixed"), ("conv", "im2row"), ("im2row_blocked", "conv")}
    ],
)
def test_export_with_a_symbolic_batch_under_every_forced_form(forms, forward, backward):
    """Forms that need every size (the blocked products, mixed, Winograd) give way to "conv" when the batch is
    symbolic (the plan's reason says so); the exported gradient runs at any batch and equals the reference's."""
    from jax import export

    forms(conv_forward=forward, conv_backward=backward)
    plan = jaxconv.plan.conv_plan(
        batch=export.symbolic_shape("b")[0],
        out_spatial=(8, 8),
        kernel_spatial=(3, 3),
        in_channels=3,
        out_channels=4,
        groups=1,
        stride=(1, 1),
        platform="cpu",
        dtype=np.float32,
    )
    for wanted, got in ((forward, plan.forward), (backward, plan.backward)):
        if wanted in jaxconv.plan.SIZED_FORMS:
            assert got == "conv" and f"{wanted} needs every size" in plan.reason, plan
    loss = lambda op: lambda x, w: (op(x, w, padding=1) ** 2).sum()  # noqa: E731
    spec = (
        jax.ShapeDtypeStruct(export.symbolic_shape("b, 8, 8, 3"), jnp.float32),
        jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32),
    )
    exported = export.export(jax.jit(jax.grad(loss(jaxconv.conv2d), argnums=(0, 1))))(*spec)
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x, w = (
            rng.standard_normal((n, 8, 8, 3)).astype(np.float32),
            rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
        )
        for a, b in zip(exported.call(x, w), jax.grad(loss(reference.conv2d), argnums=(0, 1))(x, w)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-3)
