"""Benchmarks: jaxconv's hand-written VJPs side by side with jax.grad and PyTorch.

Run from the repository root::

    python benchmarks/run.py                 # everything, a few minutes on 2 CPU cores
    python benchmarks/run.py --quick         # fewer shapes, for a smoke run
    python benchmarks/run.py --only conv,pool,step

Sections (see benchmarks/README.md):

* ``peak``: float32 matrix product (2048^3), the machine's reference GFLOP/s.
* ``conv``: per shape, the forward and the VJP (dL/dx and dL/dw from dL/dy) of
  ``jaxconv.conv2d`` against ``jax.vjp`` of ``jaxconv.reference.conv2d`` (XLA's
  autodiff), with GFLOP/s of the backward (2x the forward's multiply-adds x 2).
  Each op is timed three ways: the VJP program (inputs and dL/dy in, cotangents
  out), the backward alone (the pullback applied to residuals a forward already
  saved, as in a training step) and the forward alone; plus the residual bytes.
* ``pool``, ``lrn``, ``loss``: the same for max/avg pooling, LRN and softmax
  cross-entropy (skipped, with the reason recorded, if an op is not there yet).
* ``step``: one jitted SGD training step of LeNet-MNIST, LeNet-CIFAR and a small
  ResNet with jaxconv's ops, with the same network in plain lax under
  ``jax.grad``, and in PyTorch CPU when ``torch`` is importable; achieved GFLOP/s
  (useful multiply-adds: forward, dX except for the input layer, dW) and their
  fraction of the matrix-product peak; XLA's compiled memory for each step.
* ``flax``: one jitted SGD step of a Flax linen ResNet of resnet_small's geometry
  (batch norm in training mode), stock (``lax.conv_general_dilated``) and with
  the one-line drop-in (``nn.Conv(..., conv_general_dilated=jaxconv.lax.conv_general_dilated)``),
  interleaved (skipped if Flax is not installed).

The script starts itself again with huge pages for large host allocations where
that helps (``jaxconv.train.hostmem``, as ``python -m jaxconv train`` does; every
contender, PyTorch included, runs in that one process);
``JAXCONV_HOST_MEMORY=default`` measures glibc's default instead.  The header
of the results says which, with the load average before the run.

Every time is the median of ``--runs`` (>= 10) calls after a warm-up call,
each ended by ``block_until_ready``, all in this one process.  Results go to
``benchmarks/results/<device>.json`` and ``<device>.md``, and the markdown table
into benchmarks/README.md between this device's markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv
from jaxconv import reference
from jaxconv.train import hostmem

HERE = Path(__file__).resolve().parent
SECTIONS = ("peak", "conv", "forms", "pool", "lrn", "loss", "step", "flax", "accuracy")

# (N, H, W, C) -> O with a k x k kernel: the issue's shapes.  The 5x5 ones are
# LeNet-CIFAR's two layers (VALID), the 3x3 ones ResNet-style (SAME).
CONV_SHAPES = [
    dict(x=(128, 32, 32, 3), o=64, k=5, stride=1, padding="VALID"),
    dict(x=(128, 14, 14, 64), o=128, k=5, stride=1, padding="VALID"),
    dict(x=(128, 32, 32, 64), o=64, k=3, stride=1, padding="SAME"),
    dict(x=(128, 16, 16, 128), o=128, k=3, stride=1, padding="SAME"),
    dict(x=(128, 32, 32, 64), o=128, k=3, stride=2, padding="SAME"),
]
# resnet_small's stride-1 3x3 layers (16, 32, 64 channels), for the forms section.
RESNET_SHAPES = [
    dict(x=(128, 32, 32, 16), o=16, k=3, stride=1, padding="SAME"),
    dict(x=(128, 16, 16, 32), o=32, k=3, stride=1, padding="SAME"),
    dict(x=(128, 8, 8, 64), o=64, k=3, stride=1, padding="SAME"),
]
# The other step rows' layers (LeNet-MNIST; VGG-style's first and 64->128 convs; resnet_small's strided ones
# and stem), for the forms section and the planner's measured table.
STEP_LAYER_SHAPES = [
    dict(x=(128, 28, 28, 1), o=32, k=5, stride=1, padding="VALID"),
    dict(x=(128, 12, 12, 32), o=64, k=5, stride=1, padding="VALID"),
    dict(x=(128, 32, 32, 3), o=64, k=3, stride=1, padding="SAME"),
    dict(x=(128, 16, 16, 64), o=128, k=3, stride=1, padding="SAME"),
    # resnet_small's stride-2 3x3 convs and 1x1 projections.
    dict(x=(128, 32, 32, 16), o=32, k=3, stride=2, padding="SAME"),
    dict(x=(128, 16, 16, 32), o=64, k=3, stride=2, padding="SAME"),
    dict(x=(128, 32, 32, 16), o=32, k=1, stride=2, padding="VALID"),
    dict(x=(128, 16, 16, 32), o=64, k=1, stride=2, padding="VALID"),
    # resnet_small's stem (3 -> 16 channels).
    dict(x=(128, 32, 32, 3), o=16, k=3, stride=1, padding="SAME"),
]
# (forward, backward) pairs the forms section forces; the Winograd ones only at stride 1.
FORM_PAIRS = [
    ("conv", "conv"),
    ("im2row_blocked", "im2row_blocked"),
    ("conv", "mixed"),
    ("winograd2", "winograd2"),
    ("winograd4", "winograd4"),
]


# --- timing --------------------------------------------------------------------


def timed(fn, *args, runs: int) -> dict:
    """Median (and min) seconds of ``runs`` calls of ``fn(*args)`` after one warm-up call."""
    return interleaved({"fn": lambda: jax.block_until_ready(fn(*args))}, runs)["fn"]


def interleaved(calls: dict, runs: int) -> dict:
    """Time zero-argument, blocking ``calls`` in rounds (each once per round, after a
    warm-up round): on a shared machine every contender sees the same load, so
    their ratio is fair even when the absolute times drift.  Each timed call
    follows an untimed one of the same contender.  Median and min per name."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            # An untimed call first: the previous contender's buffers (tens of
            # MiB) leave the allocator handing out fresh pages, whose first
            # touch cost up to 3x a memory-bound op's time (max-pool backward:
            # 15 ms back to back, 40-50 ms right after another contender).
            call()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: dict(median_s=statistics.median(ts), min_s=min(ts), runs=runs) for name, ts in times.items()}


def vjp_program(f, nargs: int):
    """jit of ``(args, g) -> all cotangents``: the forward is kept only where the rule needs it."""

    def pullback(*args_and_g):
        args, g = args_and_g[:nargs], args_and_g[nargs]
        return jax.vjp(f, *args)[1](g)

    return jax.jit(pullback)


def compare_vjp(name, ours, ref, args, runs, flops=None, extra=None):
    """One row: ``ours`` against autodiff of ``ref``, three ways.

    * ``jaxconv`` / ``autodiff``: the VJP program (args, g) -> cotangents, with
      whatever of the forward the backward needs (not y itself);
    * ``backward_jaxconv`` / ``backward_autodiff``: the pullback alone, applied
      to residuals already computed by a forward (what a training step's
      backward pass costs);
    * ``forward`` / ``forward_reference``: y alone.
    """
    y = jax.jit(ref)(*args)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), y.dtype)
    ours_vjp, ref_vjp = vjp_program(ours, len(args)), vjp_program(ref, len(args))
    got, want = ours_vjp(*args, g), ref_vjp(*args, g)
    error = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(got, want))
    forward, forward_ref = jax.jit(ours), jax.jit(ref)
    # A training forward: y and the residuals its backward will need (max pooling's selection S).
    forward_train, forward_train_ref = (jax.jit(lambda *a, f=f: jax.vjp(f, *a)) for f in (ours, ref))
    # jax.vjp's pullback is a pytree of its residuals: computed once, then timed alone.
    pullbacks = {
        who: jax.block_until_ready(jax.jit(lambda *a, f=f: jax.vjp(f, *a)[1])(*args))
        for who, f in (("ours", ours), ("ref", ref))
    }
    apply = jax.jit(lambda pullback, g: pullback(g))
    start = time.perf_counter()
    jax.block_until_ready(ref_vjp(*args, g))
    if time.perf_counter() - start < 0.02:
        runs *= 10  # millisecond ops: more rounds, or one load spike decides the median
    row = dict(
        op=name,
        max_rel_error_f32=error,
        **interleaved(
            dict(
                jaxconv=lambda: jax.block_until_ready(ours_vjp(*args, g)),
                autodiff=lambda: jax.block_until_ready(ref_vjp(*args, g)),
                backward_jaxconv=lambda: jax.block_until_ready(apply(pullbacks["ours"], g)),
                backward_autodiff=lambda: jax.block_until_ready(apply(pullbacks["ref"], g)),
                forward=lambda: jax.block_until_ready(forward(*args)),
                forward_reference=lambda: jax.block_until_ready(forward_ref(*args)),
                forward_train=lambda: jax.block_until_ready(forward_train(*args)),
                forward_train_reference=lambda: jax.block_until_ready(forward_train_ref(*args)),
            ),
            runs,
        ),
    )
    row["speedup"] = row["autodiff"]["median_s"] / row["jaxconv"]["median_s"]
    row["speedup_backward"] = row["backward_autodiff"]["median_s"] / row["backward_jaxconv"]["median_s"]
    row["speedup_forward"] = row["forward_reference"]["median_s"] / row["forward"]["median_s"]
    row["speedup_forward_train"] = row["forward_train_reference"]["median_s"] / row["forward_train"]["median_s"]
    row["residual_bytes"] = {
        who: int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(pb)))
        for who, pb in (("jaxconv", pullbacks["ours"]), ("autodiff", pullbacks["ref"]))
    }
    if flops:
        row["backward_flops"] = flops
        row["gflops_jaxconv"] = flops / row["jaxconv"]["median_s"] / 1e9
        row["gflops_autodiff"] = flops / row["autodiff"]["median_s"] / 1e9
    row.update(extra or {})
    print(
        f"  {name:42s} VJP jaxconv {row['jaxconv']['median_s'] * 1e3:7.1f} ms  autodiff "
        f"{row['autodiff']['median_s'] * 1e3:7.1f} ms  x{row['speedup']:.2f} | backward x{row['speedup_backward']:.2f}"
        f" | forward x{row['speedup_forward']:.2f} | err {error:.1e}",
        flush=True,
    )
    return row


def missing(*names, module=jaxconv):
    return [n for n in names if not hasattr(module, n)]


# --- sections --------------------------------------------------------------------


def bench_peak(runs):
    n = 2048
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    t = timed(jax.jit(jnp.matmul), a, b, runs=runs)
    gflops = 2 * n**3 / t["median_s"] / 1e9
    print(f"  matmul {n}^3 float32: {gflops:.1f} GFLOP/s", flush=True)
    return dict(op=f"matmul {n}x{n}x{n} f32", time=t, gflops=gflops)


def bench_conv(runs, quick):
    rows = []
    for spec in CONV_SHAPES[:2] if quick else CONV_SHAPES:
        name, x, wt, g, opts, macs = _conv_case(spec)
        ours = lambda x, w, opts=opts: jaxconv.conv2d(x, w, **opts)
        ref = lambda x, w, opts=opts: reference.conv2d(x, w, **opts)
        chosen = _planned(spec, x, g)
        row = compare_vjp(
            f"conv {name}",
            ours,
            ref,
            (x, wt),
            runs,
            flops=4 * macs,
            extra=dict(forward_flops=2 * macs, strategy=f"fwd {chosen.forward}, bwd {chosen.backward}"),
        )
        row["gflops_forward"] = 2 * macs / row["forward"]["median_s"] / 1e9
        rows.append(row)
    return rows


def _conv_case(spec, dtype=jnp.float32, batch=None, seed=0):
    n, h, w, c = spec["x"]
    n = batch or n
    k, o = spec["k"], spec["o"]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
    wt = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), dtype)
    opts = dict(stride=spec["stride"], padding=spec["padding"])
    out = jax.eval_shape(lambda x, w: reference.conv2d(x, w, **opts), x, wt).shape
    g = jnp.asarray(rng.standard_normal(out), dtype)
    name = f"({spec['x'][0] if batch is None else n},{h},{w},{c}->{o},{k}) s{spec['stride']} {spec['padding']}"
    return name, x, wt, g, opts, int(np.prod(out)) * k * k * c


def _planned(spec, x, g):
    """The forms the planner picks for this layer (``g``: an output gradient, for the output size)."""
    return jaxconv.plan.conv_plan(
        batch=x.shape[0],
        out_spatial=g.shape[1:3],
        kernel_spatial=(spec["k"],) * 2,
        in_channels=x.shape[-1],
        out_channels=spec["o"],
        groups=1,
        stride=(spec["stride"],) * 2,
        platform=jaxconv.plan.platform_of(x),
        dtype=x.dtype,
    )


def _form_pairs():
    """FORM_PAIRS, and oneDNN's forms where the optional library is installed."""
    onednn = [("onednn", "onednn"), ("onednn", "onednn_blocked")]
    return FORM_PAIRS + (onednn if jaxconv.plan.onednn.available() else [])


def _pairs(spec):
    return [p for p in _form_pairs() if spec["stride"] == 1 or not p[0].startswith("winograd")]


def bench_forms(runs, quick):
    """Every conv form forced on each layer: forward alone and backward alone (pullback on saved residuals),
    all forms of one layer interleaved; the planner's pick named."""
    rows = []
    for spec in CONV_SHAPES[1:3] if quick else CONV_SHAPES + RESNET_SHAPES + STEP_LAYER_SHAPES:
        name, x, wt, g, opts, macs = _conv_case(spec)
        calls = {}
        for fwd, bwd in _pairs(spec):
            with jaxconv.plan.forms(conv_forward=fwd, conv_backward=bwd):
                forward = jax.jit(lambda x, w: jaxconv.conv2d(x, w, **opts))
                pullback = jax.block_until_ready(
                    jax.jit(lambda x, w: jax.vjp(lambda x, w: jaxconv.conv2d(x, w, **opts), x, w)[1])(x, wt)
                )
                backward = jax.jit(lambda pb, g: pb(g))
                forward(x, wt), backward(pullback, g)  # traced inside the block
            calls[f"{fwd}|{bwd}|forward"] = lambda f=forward: jax.block_until_ready(f(x, wt))
            calls[f"{fwd}|{bwd}|backward"] = lambda b=backward, p=pullback: jax.block_until_ready(b(p, g))
        times = interleaved(calls, runs)
        planned = _planned(spec, x, g)
        row = dict(
            op=f"conv {name}",
            macs=macs,
            planned=[planned.forward, planned.backward],
            forms={},
            geometry=dict(
                batch=x.shape[0],
                out_spatial=list(g.shape[1:3]),
                kernel=[spec["k"]] * 2,
                in_channels=x.shape[-1],
                out_channels=spec["o"],
                stride=[spec["stride"]] * 2,
            ),
        )
        for fwd, bwd in _pairs(spec):
            tf, tb = times[f"{fwd}|{bwd}|forward"], times[f"{fwd}|{bwd}|backward"]
            row["forms"][f"{fwd}/{bwd}"] = dict(
                forward=tf,
                backward=tb,
                gflops_forward=2 * macs / tf["median_s"] / 1e9,
                gflops_backward=4 * macs / tb["median_s"] / 1e9,
            )
        print(
            f"  conv {name:34s} "
            + "  ".join(
                f"{k}: {v['forward']['median_s'] * 1e3:.1f}+{v['backward']['median_s'] * 1e3:.1f}"
                for k, v in row["forms"].items()
            )
            + f"  planner: {planned.forward}/{planned.backward}",
            flush=True,
        )
        rows.append(row)
    return rows


def write_table(path: Path, result: dict) -> None:
    """The planner's measured table (jaxconv.plan.MEASURED_TABLE) from the forms and accuracy sections: per
    layer, the fastest median of each forward form and each backward form, and each form pair's float32 error
    as a ratio to the direct form's (y, dx, dw; the planner picks oneDNN only within 2x)."""
    if len(result.get("forms", [])) != len(result.get("accuracy", [])):
        raise SystemExit(
            "--write-table needs the forms and accuracy sections over the same layers: --only forms,accuracy"
        )
    layers = []
    for row, accuracy in zip(result.get("forms", []), result.get("accuracy", [])):
        forward: dict = {}
        backward: dict = {}
        for pair, t in row["forms"].items():
            fwd, bwd = pair.split("/")
            forward[fwd] = min(forward.get(fwd, np.inf), t["forward"]["median_s"])
            backward[bwd] = min(backward.get(bwd, np.inf), t["backward"]["median_s"])
        layers.append(
            dict(
                name=row["op"],
                **row["geometry"],
                forward=forward,
                backward=backward,
                error_ratio={
                    pair: [round(r, 3) for r in ratios] for pair, ratios in accuracy["ratio_to_direct"].items()
                },
            )
        )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    machine = dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        jax_version=jax.__version__,
        onednn=jaxconv.plan.onednn.status(),
        date=result["date"],
        load_average_before=result["load_average"],
        host_memory=result.get("host_memory"),
        runs=result["runs"],
    )
    path.write_text(json.dumps(dict(machine=machine, layers=layers), indent=1) + "\n")
    print(f"wrote the planner's measured table {path}", flush=True)


def bench_accuracy(runs, quick):
    """float32 error of every conv form against float64 (normwise, relative), y, dL/dx and dL/dw, and its
    ratio to XLA's direct convolution's float32 error: the planner keeps a Winograd tile only within 2x.
    Turns on float64 for the rest of the process: run it last."""
    del runs
    jax.config.update("jax_enable_x64", True)
    rows = []
    for spec in CONV_SHAPES[1:3] if quick else CONV_SHAPES + RESNET_SHAPES + STEP_LAYER_SHAPES:
        # The layer's own batch: a form's float32 error grows with the length of its sums (dW sums over it).
        name, x, wt, g, opts, _ = _conv_case(spec, jnp.float64, seed=1)

        def run(x, w, g):
            y, pullback = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, **opts), x, w)
            return (y, *pullback(g))

        # A fresh jit per form: jit's cache does not see the forms context.
        with jaxconv.plan.forms(conv_forward="conv", conv_backward="conv"):
            exact = [np.asarray(a) for a in jax.jit(lambda *a: run(*a))(x, wt, g)]
        row = dict(op=f"conv {name}", errors={})
        for fwd, bwd in _pairs(spec):
            with jaxconv.plan.forms(conv_forward=fwd, conv_backward=bwd):
                low = jax.jit(lambda *a: run(*a))(*(a.astype(jnp.float32) for a in (x, wt, g)))
            row["errors"][f"{fwd}/{bwd}"] = [
                float(np.linalg.norm(np.asarray(b, np.float64) - a) / np.linalg.norm(a)) for a, b in zip(exact, low)
            ]
        direct = row["errors"]["conv/conv"]
        row["ratio_to_direct"] = {k: [e / d for e, d in zip(v, direct)] for k, v in row["errors"].items()}
        print(
            f"  conv {name:34s} " + "  ".join(f"{k}: {max(r):.2f}x" for k, r in row["ratio_to_direct"].items()),
            flush=True,
        )
        rows.append(row)
    return rows


def bench_pool(runs, quick):
    absent = missing("max_pool2d", "avg_pool2d") + [
        f"reference.{n}" for n in missing("max_pool2d", "avg_pool2d", module=reference)
    ]
    if absent:
        print(f"  skipped: {absent} not available", flush=True)
        return [dict(op="pooling", skipped=f"not available: {absent}")]
    rng = np.random.default_rng(0)
    # A permutation: no ties, so every rule routes the gradient the same way.
    x = jnp.asarray(rng.permutation(128 * 32 * 32 * 64).reshape(128, 32, 32, 64) / 1e6, jnp.float32)
    cases = [
        ("max_pool2d", 2, 2, "VALID"),
        ("max_pool2d", 3, 2, "VALID"),
        ("avg_pool2d", 2, 2, "VALID"),
        ("avg_pool2d", 3, 2, "SAME"),
    ]
    rows = []
    for op, window, stride, padding in cases[:2] if quick else cases:
        opts = dict(stride=stride, padding=padding)
        ours = lambda x, op=op, window=window, opts=opts: getattr(jaxconv, op)(x, window, **opts)
        ref = lambda x, op=op, window=window, opts=opts: getattr(reference, op)(x, window, **opts)
        rows.append(compare_vjp(f"{op} {window}x{window}/{stride} {padding} (128,32,32,64)", ours, ref, (x,), runs))
    return rows


def bench_lrn(runs, quick):
    if missing("lrn") or missing("lrn", module=reference):
        return [dict(op="lrn", skipped="not available")]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 16, 16, 96)), jnp.float32)
    opts = dict(size=5, kappa=2.0, alpha=1e-4, beta=0.75)
    return [
        compare_vjp(
            "lrn size 5 (128,16,16,96)",
            lambda x: jaxconv.lrn(x, **opts),
            lambda x: reference.lrn(x, **opts),
            (x,),
            runs,
        )
    ]


def bench_loss(runs, quick):
    if missing("softmax_cross_entropy") or missing("softmax_cross_entropy", module=reference):
        return [dict(op="softmax_cross_entropy", skipped="not available")]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((1024, 1000)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, 1024))
    return [
        compare_vjp(
            "softmax_cross_entropy (1024, 1000)",
            lambda s: jaxconv.softmax_cross_entropy(s, labels),
            lambda s: reference.softmax_cross_entropy(s, labels),
            (logits,),
            runs,
        )
    ]


# --- training steps ------------------------------------------------------------------
# Each network is a jaxconv.nn (stax-style) model, run with ``ops=jaxconv``'s
# hand rules and with ``ops=jaxconv.reference`` (plain lax, jax.grad): the same
# architecture and parameters; a counting namespace reads the multiply-adds off
# the shapes; a torch.nn twin gives the PyTorch column.

STEP_OPS = ("conv2d", "max_pool2d", "avg_pool2d", "relu", "linear", "flatten", "softmax_cross_entropy")


def lenet(channels, hidden=256, classes=10):
    """conv5x5 VALID - ReLU - maxpool 2 - conv5x5 VALID - ReLU - maxpool 2 - FC - ReLU - FC."""
    from jaxconv import nn

    c1, c2 = channels
    model = nn.serial(
        nn.Conv(c1, 5),
        nn.Relu,
        nn.MaxPool(2),
        nn.Conv(c2, 5),
        nn.Relu,
        nn.MaxPool(2),
        nn.Flatten,
        nn.Dense(hidden),
        nn.Relu,
        nn.Dense(classes),
    )

    def torch_module(in_shape, flat):
        import torch.nn as tnn

        return tnn.Sequential(
            tnn.Conv2d(in_shape[3], c1, 5),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Conv2d(c1, c2, 5),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Flatten(),
            tnn.Linear(flat, hidden),
            tnn.ReLU(),
            tnn.Linear(hidden, classes),
        )

    return model, torch_module


def resnet_small(widths=(16, 32, 64), classes=10, batch_norm=True):
    """``jaxconv.nn.models.resnet_small``: conv3x3 16 - BN - ReLU, one basic block per
    stage (16, 32, 64 channels; conv-BN-ReLU-conv-BN; stride 2 and a 1x1
    conv-BN projection from stage 2), global average pool, FC.  BN in training
    mode (batch statistics, running statistics updated).  ``batch_norm=False``:
    biased convolutions and no normalisation."""
    from jaxconv.nn import models

    def torch_module(in_shape, flat):
        import torch
        import torch.nn as tnn

        def conv_bn(cin, cout, k, stride, pad):
            if not batch_norm:
                return [tnn.Conv2d(cin, cout, k, stride, pad)]
            return [tnn.Conv2d(cin, cout, k, stride, pad, bias=False), tnn.BatchNorm2d(cout)]

        class Block(tnn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.a = tnn.Sequential(*conv_bn(cin, cout, 3, stride, 1), tnn.ReLU(), *conv_bn(cout, cout, 3, 1, 1))
                self.p = tnn.Sequential(*conv_bn(cin, cout, 1, stride, 0)) if stride > 1 else None

            def forward(self, x):
                return torch.relu(self.a(x) + (x if self.p is None else self.p(x)))

        layers = [*conv_bn(in_shape[3], widths[0], 3, 1, 1), tnn.ReLU()]
        prev = widths[0]
        for i, wd in enumerate(widths):
            layers.append(Block(prev, wd, 1 if i == 0 else 2))
            prev = wd
        return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(prev, classes))

    return models.resnet_small(classes, widths=widths, batch_norm=batch_norm), torch_module


def vgg_style(classes=10):
    """3x3 SAME convs of 64, 64 - maxpool 2 - 128, 128 - maxpool 2 - FC, ReLU after every conv."""
    from jaxconv import nn

    model = nn.serial(
        nn.Conv(64, 3, padding="SAME"),
        nn.Relu,
        nn.Conv(64, 3, padding="SAME"),
        nn.Relu,
        nn.MaxPool(2),
        nn.Conv(128, 3, padding="SAME"),
        nn.Relu,
        nn.Conv(128, 3, padding="SAME"),
        nn.Relu,
        nn.MaxPool(2),
        nn.Flatten,
        nn.Dense(classes),
    )

    def torch_module(in_shape, flat):
        import torch.nn as tnn

        return tnn.Sequential(
            tnn.Conv2d(in_shape[3], 64, 3, padding=1),
            tnn.ReLU(),
            tnn.Conv2d(64, 64, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Conv2d(64, 128, 3, padding=1),
            tnn.ReLU(),
            tnn.Conv2d(128, 128, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Flatten(),  # NCHW: torch flattens (C, H, W), jaxconv (H, W, C); the same layer sizes
            tnn.Linear(flat, classes),
        )

    return model, torch_module


NETS = {
    "LeNet-MNIST": (lambda: lenet((32, 64)), (128, 28, 28, 1)),
    "LeNet-CIFAR": (lambda: lenet((64, 128)), (128, 32, 32, 3)),
    "VGG-style": (vgg_style, (128, 32, 32, 3)),
    "resnet_small": (resnet_small, (128, 32, 32, 3)),
    "resnet_small (no BN)": (lambda: resnet_small(batch_norm=False), (128, 32, 32, 3)),
}


class _Counter:
    """An ``ops`` namespace (the reference ops) that records each layer's multiply-adds."""

    def __init__(self):
        self.network_input = None
        self.layers = []  # (kind, multiply-adds, reads the network input (no dX owed), weight shape)

    def __getattr__(self, name):
        return getattr(reference, name)

    def conv2d(self, x, w, b=None, **opts):
        y = reference.conv2d(x, w, b, **opts)
        macs = int(np.prod(y.shape)) * int(np.prod(w.shape[:3]))
        self.layers.append(("conv", macs, x is self.network_input, tuple(w.shape)))
        return y

    def linear(self, x, w, b=None):
        self.layers.append(("linear", int(x.shape[0]) * int(np.prod(w.shape)), x is self.network_input, tuple(w.shape)))
        return reference.linear(x, w, b)


def training_flops(apply, params, x_shape):
    """Useful FLOPs of one step: 2 x multiply-adds for the forward, dW, and dX except the input layer's."""
    counter = _Counter()

    def run(p, x):
        counter.network_input = x
        return apply(p, x, ops=counter)

    jax.eval_shape(run, params, jax.ShapeDtypeStruct(x_shape, jnp.float32))
    total = sum(2 * macs * (2 if is_input else 3) for _, macs, is_input, _ in counter.layers)
    return total, counter.layers


def bench_steps(runs, quick):
    absent = missing(*STEP_OPS) + [f"reference.{n}" for n in missing(*STEP_OPS, module=reference)]
    if absent:
        print(f"  skipped: {absent} not available", flush=True)
        return [dict(net="all", skipped=f"not available: {absent}")]
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    from jaxconv import nn

    rows = []
    for net_name, (make, x_shape) in NETS.items():
        if quick and net_name != "LeNet-CIFAR":
            continue
        (init, apply), torch_module = make()
        _, params = init(jax.random.key(0), x_shape)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 10, x_shape[0]))
        flops, layers = training_flops(apply, params, x_shape)
        flat = next(w_shape[0] for kind, _, _, w_shape in layers if kind == "linear")  # torch's first Linear
        row = dict(
            net=net_name,
            batch=x_shape,
            step_flops=flops,
            params=int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        )
        calls, compiled = {}, {}
        columns = [("jaxconv", jaxconv, None), ("autodiff", reference, None)]
        if jaxconv.plan.onednn.available():  # the optional compiled oneDNN handler (pip install 'jaxconv[onednn]')
            # The planner's default without it (XLA forms only), and every conv forced onto it.
            columns.append(("jaxconv_xla", jaxconv, dict(onednn=False)))
            columns.append(("jaxconv_onednn", jaxconv, dict(conv_forward="onednn", conv_backward="onednn")))
        for column, ops, forms in columns:

            def loss(p, x, y, ops=ops):
                # Training mode: batch norm on the batch's statistics, running statistics updated.
                logits, updated = nn.train_apply(apply, p, x, ops=ops)
                return ops.softmax_cross_entropy(logits, y), updated

            def step(p, x, y, loss=loss):
                (value, updated), grads = jax.value_and_grad(loss, has_aux=True)(p, x, y)
                # The running statistics' gradient is zero (stop_gradient): SGD moves the weights only.
                return jax.tree.map(lambda a, g: a - 0.01 * g, updated, grads), value

            with jaxconv.plan.forms(**forms) if forms else contextlib.nullcontext():
                compiled[column] = program = jax.jit(step).lower(params, x, labels).compile()
            calls[column] = lambda program=program: jax.block_until_ready(program(params, x, labels))
        if torch is not None:
            model = torch_module(x_shape, flat)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
            ty = torch.from_numpy(np.array(labels)).long()

            def torch_step():
                opt.zero_grad(set_to_none=True)
                value = torch.nn.functional.cross_entropy(model(tx), ty)
                value.backward()
                opt.step()
                return value

            calls["pytorch"] = torch_step
        times = interleaved(calls, runs)
        for column, t in times.items():
            row[column] = dict(time=t, gflops=flops / t["median_s"] / 1e9)
            if column in compiled:
                memory = compiled[column].memory_analysis()
                row[column].update(
                    loss=float(compiled[column](params, x, labels)[1]),
                    temp_bytes=getattr(memory, "temp_size_in_bytes", None),
                    argument_bytes=getattr(memory, "argument_size_in_bytes", None),
                    output_bytes=getattr(memory, "output_size_in_bytes", None),
                )
            else:
                row[column].update(version=torch.__version__, threads=torch.get_num_threads())
        row["speedup_vs_autodiff"] = row["autodiff"]["time"]["median_s"] / row["jaxconv"]["time"]["median_s"]
        if "pytorch" in row:
            for column, key in (("jaxconv", ""), ("jaxconv_xla", "_xla"), ("jaxconv_onednn", "_onednn")):
                if column in row:
                    row[f"speedup{key}_vs_pytorch"] = (
                        row["pytorch"]["time"]["median_s"] / row[column]["time"]["median_s"]
                    )
        print(
            f"  {net_name:13s} jaxconv {row['jaxconv']['time']['median_s'] * 1e3:7.1f} ms "
            f"({row['jaxconv']['gflops']:.0f} GFLOP/s)  "
            f"autodiff {row['autodiff']['time']['median_s'] * 1e3:7.1f} ms  "
            + (f"pytorch {row['pytorch']['time']['median_s'] * 1e3:7.1f} ms" if "pytorch" in row else "pytorch n/a")
            + (
                f"  XLA forms only {row['jaxconv_xla']['time']['median_s'] * 1e3:7.1f} ms"
                f"  oneDNN forced {row['jaxconv_onednn']['time']['median_s'] * 1e3:7.1f} ms"
                if "jaxconv_onednn" in row
                else ""
            ),
            flush=True,
        )
        rows.append(row)
    return rows


def flax_resnet(conv_general_dilated=None, widths=(16, 32, 64), classes=10):
    """resnet_small's geometry in Flax linen: conv3x3 16 - BN - ReLU, one basic block per stage (stride 2 and
    a 1x1 conv-BN projection from stage 2), global average pool, dense.  ``conv_general_dilated``: the drop-in."""
    import flax.linen as fnn

    extra = {} if conv_general_dilated is None else dict(conv_general_dilated=conv_general_dilated)

    class ConvBN(fnn.Module):
        features: int
        kernel: int
        stride: int

        @fnn.compact
        def __call__(self, x):
            x = fnn.Conv(
                self.features,
                (self.kernel, self.kernel),
                (self.stride, self.stride),
                padding="SAME",
                use_bias=False,
                **extra,
            )(x)
            return fnn.BatchNorm(use_running_average=False, momentum=0.9)(x)

    class ResNet(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(ConvBN(widths[0], 3, 1)(x))
            for i, width in enumerate(widths):
                stride = 1 if i == 0 else 2
                y = ConvBN(width, 3, 1)(fnn.relu(ConvBN(width, 3, stride)(x)))
                x = fnn.relu(y + (x if stride == 1 else ConvBN(width, 1, stride)(x)))
            return fnn.Dense(classes)(x.mean(axis=(1, 2)))

    return ResNet()


def bench_flax(runs, quick):
    """One jitted SGD step of :func:`flax_resnet`, stock and with jaxconv's drop-in, interleaved."""
    try:
        import flax  # noqa: F401
        import optax
    except ImportError as error:
        print(f"  skipped: {error}", flush=True)
        return [dict(net="Flax linen resnet_small", skipped=str(error))]
    x_shape = (128, 32, 32, 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, x_shape[0]))
    variables = flax_resnet().init(jax.random.key(0), x)
    tx = optax.sgd(0.01)
    state = tx.init(variables["params"])
    calls, losses = {}, {}
    for column, conv in (("flax", None), ("flax_jaxconv", jaxconv.lax.conv_general_dilated)):
        model = flax_resnet(conv)

        def step(variables, state, x, y, model=model):
            def loss(params):
                logits, updated = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated

            (value, updated), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
            updates, state = tx.update(grads, state)
            return {"params": optax.apply_updates(variables["params"], updates), **updated}, state, value

        program = jax.jit(step).lower(variables, state, x, labels).compile()
        losses[column] = float(program(variables, state, x, labels)[2])
        calls[column] = lambda program=program: jax.block_until_ready(program(variables, state, x, labels))
    times = interleaved(calls, runs)
    row = dict(
        net="Flax linen resnet_small",
        batch=x_shape,
        flax=times["flax"],
        flax_jaxconv=times["flax_jaxconv"],
        loss=losses,
        speedup=times["flax"]["median_s"] / times["flax_jaxconv"]["median_s"],
    )
    print(
        f"  Flax linen resnet_small: stock {ms(times['flax'])} ms, with jaxconv.lax {ms(times['flax_jaxconv'])} ms "
        f"({row['speedup']:.2f}x)",
        flush=True,
    )
    return [row]


# --- report --------------------------------------------------------------------


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return f"{dev.platform}-" + "".join(ch if ch.isalnum() else "-" for ch in dev.device_kind.lower()).strip("-")


def ms(t):
    return f"{t['median_s'] * 1e3:.1f}"


def markdown(result) -> str:
    out = [f"### {result['device']} ({result['device_kind']}), jax {result['jax_version']}, {result['date']}", ""]
    if result.get("load_average") or result.get("host_memory"):
        load = result.get("load_average")
        out += [
            (f"Load average before the run: {load[0]:.2f}. " if load else "")
            + (f"Host memory: {result['host_memory']}." if result.get("host_memory") else ""),
            "",
        ]
    peak = result.get("peak")
    if peak:
        out += [
            f"Matrix-product peak (float32 2048³): **{peak['gflops']:.0f} GFLOP/s**. "
            f"Times are medians of {peak['time']['runs']} runs, float32.",
            "",
        ]
    ops = result.get("conv", []) + result.get("pool", []) + result.get("lrn", []) + result.get("loss", [])
    if ops:
        out += [
            "VJP: the program (inputs, dL/dy) -> all input cotangents, with what of the forward the "
            "backward needs; backward: the pullback alone on residuals already saved; forward: y alone. "
            "Residuals: bytes the pullback keeps.",
            "",
            "| op | VJP ms jaxconv / autodiff | VJP speedup | backward ms jaxconv / autodiff | backward speedup "
            "| forward ms jaxconv / XLA | training forward ms (y + residuals) jaxconv / XLA "
            "| VJP GFLOP/s jaxconv / autodiff (of peak) | residual MiB jaxconv / autodiff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ops:
            if "skipped" in r:
                out.append(f"| {r['op']} | — | — | — | — | — | — | {r['skipped']} | |")
                continue
            gf = f"{r['gflops_jaxconv']:.0f} / {r['gflops_autodiff']:.0f}" if "gflops_jaxconv" in r else ""
            if gf and peak:
                gf += f" ({r['gflops_jaxconv'] / peak['gflops']:.0%})"
            res = r.get("residual_bytes")
            res = f"{res['jaxconv'] / 2**20:.1f} / {res['autodiff'] / 2**20:.1f}" if res else ""
            strategy = f" [{r['strategy']}]" if "strategy" in r else ""
            out.append(
                f"| {r['op']}{strategy} | {ms(r['jaxconv'])} / {ms(r['autodiff'])} | {r['speedup']:.2f}× | "
                f"{ms(r['backward_jaxconv'])} / {ms(r['backward_autodiff'])} | {r['speedup_backward']:.2f}× | "
                f"{ms(r['forward'])} / {ms(r['forward_reference'])} | "
                f"{ms(r['forward_train'])} / {ms(r['forward_train_reference'])} | {gf} | {res} |"
            )
        out.append("")
    forms = result.get("forms", [])
    if forms:
        names = [f"{f}/{b}" for f, b in _form_pairs()]
        out += [
            "Every conv form forced (`jaxconv.plan.forms`), float32: forward ms + backward ms (the pullback "
            "alone), all of a layer's forms interleaved; **bold**: the planner's pick, GFLOP/s of its "
            "forward + backward (of peak).",
            "",
            "| layer | " + " | ".join(names) + " | planner's GFLOP/s |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for r in forms:
            planned = "/".join(r["planned"])
            cells = []
            for name in names:
                t = r["forms"].get(name)
                cell = f"{ms(t['forward'])} + {ms(t['backward'])}" if t else "—"
                cells.append(f"**{cell}**" if name == planned and t else cell)
            pick = r["forms"].get(planned)
            gf = ""
            if pick:
                total = pick["forward"]["median_s"] + pick["backward"]["median_s"]
                gf = f"{6 * r['macs'] / total / 1e9:.0f}"
                if peak:
                    gf += f" ({6 * r['macs'] / total / 1e9 / peak['gflops']:.0%})"
            out.append(f"| {r['op']} | " + " | ".join(cells) + f" | {gf} |")
        out.append("")
    accuracy = result.get("accuracy", [])
    if accuracy:
        names = [f"{f}/{b}" for f, b in _form_pairs()]
        out += [
            "float32 error of each form against float64 (normwise relative, at the layer's batch): the direct form's "
            "(XLA's convolution) for y, dL/dx, dL/dw, and every form's worst ratio to it over the three.",
            "",
            "| layer | direct: y, dx, dw | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for r in accuracy:
            d = r["errors"]["conv/conv"]
            cells = [f"{max(r['ratio_to_direct'][n]):.2f}×" if n in r["ratio_to_direct"] else "—" for n in names]
            out.append(f"| {r['op']} | {d[0]:.1e}, {d[1]:.1e}, {d[2]:.1e} | " + " | ".join(cells) + " |")
        out.append("")
    steps = result.get("step", [])
    if steps:
        out += [
            "`jaxconv`: the planner's default forms (with the compiled oneDNN handler installed, it picks oneDNN "
            "layer by layer where jaxconv/plan/measured_cpu.json measured it faster); `XLA forms only`: the same "
            "step with `jaxconv.plan.forms(onednn=False)` (a machine without the handler); `oneDNN forced`: every "
            'conv forced onto it (`jaxconv.plan.forms(conv_forward="onednn", conv_backward="onednn")`). '
            "`vs`: the other's time over jaxconv's (above 1: jaxconv is faster).",
            "",
            "| training step (batch 128, SGD) | jaxconv ms | XLA forms only ms | oneDNN forced ms "
            "| jax.grad (plain lax) ms | PyTorch CPU ms | vs autodiff | vs PyTorch (XLA forms only) "
            "| GFLOP/s (of peak) jaxconv / PyTorch | XLA temp MiB (jaxconv / XLA forms only / autodiff) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in steps:
            if "skipped" in r:
                out.append(f"| {r['net']} | {r['skipped']} | | | | | | | | |")
                continue
            pt, xla, dn = r.get("pytorch"), r.get("jaxconv_xla"), r.get("jaxconv_onednn")
            mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "?"
            gflops = lambda c: f"{c['gflops']:.0f} ({c['peak_fraction']:.0%})" if c else "n/a"
            versus = f"{r['speedup_vs_pytorch']:.2f}×" if pt else "n/a"
            if pt and xla:
                versus += f" ({r['speedup_xla_vs_pytorch']:.2f}×)"
            out.append(
                f"| {r['net']} | {ms(r['jaxconv']['time'])} | {ms(xla['time']) if xla else 'n/a'} | "
                f"{ms(dn['time']) if dn else 'n/a'} | "
                f"{ms(r['autodiff']['time'])} | {ms(pt['time']) if pt else 'n/a'} | {r['speedup_vs_autodiff']:.2f}× | "
                f"{versus} | {gflops(r['jaxconv'])} / {gflops(pt)} | "
                f"{mib(r['jaxconv']['temp_bytes'])} / {mib(xla['temp_bytes']) if xla else 'n/a'} / "
                f"{mib(r['autodiff']['temp_bytes'])} |"
            )
        out.append("")
    flax_rows = result.get("flax", [])
    if flax_rows:
        out += [
            "Flax linen, one jitted SGD step (batch norm in training mode), stock against the one-line drop-in "
            "`nn.Conv(..., conv_general_dilated=jaxconv.lax.conv_general_dilated)`:",
            "",
            "| training step, batch 128 (ms) | Flax (lax) | Flax + jaxconv.lax | speedup |",
            "|---|---:|---:|---:|",
        ]
        for r in flax_rows:
            if "skipped" in r:
                out.append(f"| {r['net']} | {r['skipped']} | | |")
            else:
                out.append(f"| {r['net']} | {ms(r['flax'])} | {ms(r['flax_jaxconv'])} | {r['speedup']:.2f}× |")
        out.append("")
    return "\n".join(out)


def update_readme(device: str, table: str) -> None:
    """Put ``table`` between this device's markers in benchmarks/README.md (append if absent)."""
    readme = HERE / "README.md"
    begin, end = f"<!-- results:{device}:begin -->", f"<!-- results:{device}:end -->"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="two conv shapes, two pools, LeNet-CIFAR only")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per measurement (>= 10 for reported figures)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for <device>.json and <device>.md")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument(
        "--write-table",
        metavar="PATH",
        help="write the planner's measured table from the forms and accuracy sections (jaxconv/plan/measured_cpu.json "
        "is the installed one; point $JAXCONV_FORMS_TABLE at another)",
    )
    args = parser.parse_args(argv)
    if argv is None:  # run as a script: start again with huge pages where that helps (before any computation)
        hostmem.restart_with_huge_pages()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {SECTIONS}")

    device = device_name()
    host_memory = hostmem.status()
    result = dict(
        device=device,
        device_kind=jax.devices()[0].device_kind,
        platform=jax.default_backend(),
        jax_version=jax.__version__,
        jaxconv_version=jaxconv.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        runs=args.runs,
        quick=args.quick,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        host_memory=host_memory.reason,
        huge_pages=host_memory.huge_pages,
    )
    print(f"device {device}, jax {jax.__version__}, {args.runs} runs per figure", flush=True)
    started = time.perf_counter()
    # The peak is the yardstick of every GFLOP/s fraction, so it is always measured.
    print("peak:", flush=True)
    result["peak"] = bench_peak(args.runs)
    sections = dict(
        conv=bench_conv,
        forms=bench_forms,
        pool=bench_pool,
        lrn=bench_lrn,
        loss=bench_loss,
        step=bench_steps,
        flax=bench_flax,
    )
    for name in only:
        if name in sections:
            print(f"{name}:", flush=True)
            result[name] = sections[name](args.runs, args.quick)
    # The peak again at the end: the run's best matrix product is the yardstick.
    print("peak (again):", flush=True)
    again = bench_peak(args.runs)
    if again["gflops"] > result["peak"]["gflops"]:
        result["peak"] = again
    peak = result["peak"]["gflops"]
    for row in result.get("conv", []):
        row["peak_fraction"] = row["gflops_jaxconv"] / peak
    for row in result.get("step", []):
        for column in ("jaxconv", "jaxconv_xla", "jaxconv_onednn", "autodiff", "pytorch"):
            if column in row:
                row[column]["peak_fraction"] = row[column]["gflops"] / peak
    if "accuracy" in only:  # last: it turns float64 on
        print("accuracy:", flush=True)
        result["accuracy"] = bench_accuracy(args.runs, args.quick)
    if args.write_table:
        write_table(Path(args.write_table), result)
    result["total_seconds"] = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{device}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / f"{device}.md").write_text(table + "\n")
    if not args.no_readme and Path(args.out).resolve() == (HERE / "results").resolve():
        update_readme(device, table)
    print(table)
    print(f"wrote {out / (device + '.json')} in {result['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
