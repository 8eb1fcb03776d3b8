"""Float32 error of each convolution form, as a ratio to the direct form's, over a wide grid of layers.

For each layer (batch, size, input and output channels, a 3x3 or 5x5 kernel,
stride 1, SAME padding) and each seed, ``y = conv2d(x, w)``, ``dL/dx`` and
``dL/dw`` (for a random output gradient) are computed in float64 by XLA's
convolution (the truth) and in float32 by each form; a form's error is the
max-abs difference from the truth, and its ratio is that error over the
direct form's (``"conv"``, XLA's convolution) on the same inputs.  The JSON
records every ratio, the worst ratio per form and kernel, and the layers on
which the planner would pick ``"winograd2"`` with their ratios.

    PYTHONPATH=. python benchmarks/form_errors.py [--quick] [--out benchmarks/results/form_errors.json]

The grid is sampled (a fixed, seeded sample of the full product, capped in
multiply-adds) so a run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxconv  # noqa: E402

FORMS = ("conv", "im2row_blocked", "winograd2", "winograd4")
CHANNELS = (32, 64, 128, 256)
SIZES = (8, 14, 28, 56)
BATCHES = (1, 4, 16)
KERNELS = (3, 5)
SEEDS = (0, 1, 2)
# The most multiply-adds (one forward) of a sampled layer, and layers sampled per kernel size.
MAX_MACS = 400 * 10**6
PER_KERNEL = 20
# Beyond the sampled grid, 3x3: narrow layers (fewer than 32 channels, where the planner keeps XLA's
# convolution) and many-channel layers on small images with larger batches (where the planner's
# Winograd layers came out worst).
EXTRA = [
    dict(batch=n, size=s, cin=c, cout=o, k=3)
    for n, s, c, o in (
        (16, 8, 3, 16),
        (16, 8, 16, 16),
        (16, 28, 16, 16),
        (4, 14, 16, 32),
        (16, 8, 256, 256),
        (16, 4, 256, 256),
        (128, 8, 64, 64),
        (32, 8, 128, 256),
    )
]


def grid(per_kernel: int = PER_KERNEL, max_macs: int = MAX_MACS, seed: int = 0, extra: bool = True) -> list[dict]:
    """A seeded sample of (batch, size, in channels, out channels, kernel), the corners of each axis kept;
    then the :data:`EXTRA` layers (``extra=True``)."""
    rng = np.random.default_rng(seed)
    layers = []
    for k in KERNELS:
        full = [
            dict(batch=n, size=s, cin=c, cout=o, k=k)
            for n, s, c, o in itertools.product(BATCHES, SIZES, CHANNELS, CHANNELS)
            if n * s * s * c * o * k * k <= max_macs
        ]
        # Always the corners the cap allows (smallest and widest channels, smallest and largest images).
        corners = [
            layer
            for layer in full
            if layer["cin"] in (CHANNELS[0], CHANNELS[-1])
            and layer["cout"] == layer["cin"]
            and layer["size"] in (SIZES[0], SIZES[-1])
        ]
        rest = [layer for layer in full if layer not in corners]
        picked = list(rng.choice(len(rest), size=max(0, min(len(rest), per_kernel - len(corners))), replace=False))
        layers += corners + [rest[i] for i in sorted(picked)]
    return layers + [dict(layer) for layer in EXTRA if extra and layer not in layers]


def _inputs(layer, seed):
    rng = np.random.default_rng(seed)
    n, s, c, o, k = layer["batch"], layer["size"], layer["cin"], layer["cout"], layer["k"]
    x = rng.standard_normal((n, s, s, c))
    w = rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c)
    g = rng.standard_normal((n, s, s, o))
    return x, w, g


def _run(x, w, g):
    y, pullback = jax.vjp(lambda x, w: jaxconv.conv2d(x, w, padding="SAME"), x, w)
    return (y, *pullback(g))


def measure(layer: dict, seeds=SEEDS) -> dict:
    """Max-abs float32 error of each form (y, dx, dw) and its ratio to the direct form's, worst over ``seeds``."""
    with jaxconv.plan.forms(conv_forward="conv", conv_backward="conv"):
        exact_fn = jax.jit(_run)
    compiled = {}
    for form in FORMS:
        with jaxconv.plan.forms(conv_forward=form, conv_backward=form):
            compiled[form] = jax.jit(_run)
            # Trace inside the block (the forms are part of the trace).
            compiled[form].lower(*(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in _inputs(layer, 0))).compile()
    worst = {form: [0.0, 0.0, 0.0] for form in FORMS}
    errors = {form: [] for form in FORMS}
    for seed in seeds:
        x, w, g = _inputs(layer, seed)
        with jaxconv.plan.forms(conv_forward="conv", conv_backward="conv"):
            exact = [np.asarray(a) for a in exact_fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g))]
        per_form = {}
        for form in FORMS:
            with jaxconv.plan.forms(conv_forward=form, conv_backward=form):
                low = compiled[form](*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
            per_form[form] = [float(np.max(np.abs(np.asarray(b, np.float64) - a))) for a, b in zip(exact, low)]
            errors[form].append(per_form[form])
        for form in FORMS:
            ratios = [e / d for e, d in zip(per_form[form], per_form["conv"])]
            worst[form] = [max(a, b) for a, b in zip(worst[form], ratios)]
    plan = jaxconv.plan.conv_plan(
        batch=layer["batch"],
        out_spatial=(layer["size"],) * 2,
        kernel_spatial=(layer["k"],) * 2,
        in_channels=layer["cin"],
        out_channels=layer["cout"],
        groups=1,
        stride=(1, 1),
        platform="cpu",
        dtype=jnp.float32,
    )
    return dict(
        layer=layer,
        planned=[plan.forward, plan.backward],
        max_abs_errors=errors,
        ratio_to_direct={f: dict(zip(("y", "dx", "dw"), r)) for f, r in worst.items()},
    )


def summarize(rows: list[dict]) -> dict:
    """The worst (and median) ratio per form and kernel, and the planner's winograd2 layers above 2x."""
    summary = {}
    for k in KERNELS:
        for form in FORMS[1:]:
            ratios = [max(r["ratio_to_direct"][form].values()) for r in rows if r["layer"]["k"] == k]
            if ratios:
                summary[f"{form} {k}x{k}"] = dict(
                    max=max(ratios), median=float(np.median(ratios)), min=min(ratios), layers=len(ratios)
                )
    planned = [r for r in rows if r["planned"][0] == "winograd2" or r["planned"][1] == "winograd2"]
    others = [r for r in rows if r["layer"]["k"] == 3 and r not in planned]
    summary["winograd2 3x3 where the planner does not pick it"] = [
        dict(r["layer"], ratio=max(r["ratio_to_direct"]["winograd2"].values())) for r in others
    ]
    summary["planner_winograd2_layers"] = len(planned)
    summary["planner_winograd2_max_ratio"] = max(
        (max(r["ratio_to_direct"]["winograd2"].values()) for r in planned), default=None
    )
    summary["planner_winograd2_over_2x"] = [
        dict(r["layer"], ratio=max(r["ratio_to_direct"]["winograd2"].values()))
        for r in planned
        if max(r["ratio_to_direct"]["winograd2"].values()) > 2
    ]
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of layers, one seed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "form_errors.json"))
    args = parser.parse_args(argv)
    layers = grid(per_kernel=4, max_macs=20 * 10**6, extra=False) if args.quick else grid()
    seeds = SEEDS[:1] if args.quick else SEEDS
    start = time.perf_counter()
    rows = []
    for i, layer in enumerate(layers):
        row = measure(layer, seeds)
        rows.append(row)
        r = row["ratio_to_direct"]
        print(
            f"[{i + 1}/{len(layers)} {time.perf_counter() - start:5.0f}s] {layer}  planner {row['planned']}  "
            + "  ".join(f"{f}: {max(r[f].values()):.2f}x" for f in FORMS[1:]),
            flush=True,
        )
    result = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or jax.__version__,
        device=str(jax.devices()[0].device_kind),
        platform=jax.default_backend(),
        machine=platform.machine(),
        python=sys.version.split()[0],
        metric="max-abs float32 error vs a float64 XLA convolution; ratio to the "
        "direct form's ('conv') on the same inputs, worst over seeds and over y, dL/dx, dL/dw",
        seeds=list(seeds),
        forms=list(FORMS),
        seconds=time.perf_counter() - start,
        summary=summarize(rows),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
