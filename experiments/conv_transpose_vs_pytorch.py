"""Claim: jaxconv.conv_transpose{1,2,3}d(y, w, ...) equals PyTorch's conv_transpose{1,2,3}d with the
weight w moved to (O, C/G, K...), and its gradients equal PyTorch autograd's, in float64.

PyTorch is not a dependency of jaxconv; this experiment needs it installed
(`pip install torch`, CPU build).  It draws a grid of configurations (stride,
symmetric padding, output_padding < stride, dilation, groups, bias) in 1, 2
and 3 spatial dims, computes the output and the gradients of
``sum(output * G)`` for a random ``G`` with respect to ``y``, ``w`` and ``b``
both ways, and reports the largest relative error per dimension.

Run:  .venv/bin/python experiments/conv_transpose_vs_pytorch.py
Writes experiments/results/conv_transpose_vs_pytorch.json.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import platform

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jaxconv  # noqa: E402

try:
    import torch
except ImportError as error:  # pragma: no cover - the experiment's one requirement
    raise SystemExit(f"this experiment needs PyTorch (pip install torch, CPU build): {error}") from error

RESULTS = pathlib.Path(__file__).parent / "results" / "conv_transpose_vs_pytorch.json"


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def compare(ndim, spatial, kernel, stride, padding, output_padding, dilation, groups, cg, o, bias, rng):
    y = rng.standard_normal((2, *spatial, o))
    w = rng.standard_normal((*kernel, cg, o))
    b = rng.standard_normal(groups * cg) if bias else None
    options = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)
    op = getattr(jaxconv, f"conv_transpose{ndim}d")
    out, pullback = jax.vjp(lambda y, w, b: op(y, w, b, **options), y, w, b)
    g = rng.standard_normal(out.shape)
    dy, dw, db = pullback(g)

    # PyTorch: channels first; its weight (in = O, out/groups = C/G, K...) is w moved.
    last = ndim + 1
    ty = torch.tensor(np.moveaxis(y, last, 1), requires_grad=True)
    tw = torch.tensor(np.moveaxis(np.moveaxis(w, -1, 0), -1, 1), requires_grad=True)  # (O, C/G, K...)
    tb = torch.tensor(b, requires_grad=True) if bias else None
    fn = getattr(torch.nn.functional, f"conv_transpose{ndim}d")
    tout = fn(
        ty, tw, tb, stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation
    )
    (tout * torch.tensor(np.moveaxis(g, last, 1))).sum().backward()
    errors = {
        "output": _rel(out, np.moveaxis(tout.detach().numpy(), 1, last)),
        "dy": _rel(dy, np.moveaxis(ty.grad.numpy(), 1, last)),
        "dw": _rel(dw, np.moveaxis(np.moveaxis(tw.grad.numpy(), 1, -1), 0, -1)),
    }
    if bias:
        errors["db"] = _rel(db, tb.grad.numpy())
    return errors


def main():
    rng = np.random.default_rng(0)
    report = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jaxconv": jaxconv.__version__,
        "python": platform.python_version(),
        "device": jax.devices()[0].device_kind,
        "dims": {},
    }
    for ndim in (1, 2, 3):
        size = 5 if ndim < 3 else 3
        worst, count = {}, 0
        for k, s, p, d, g, bias in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2), (1, 2), (True, False)):
            for op in range(s):
                # Crop at most what the output has: the output size must be at least 1.
                if (size - 1) * s + d * (k - 1) + 1 + op - 2 * p < 1:
                    continue
                errors = compare(ndim, (size,) * ndim, (k,) * ndim, s, p, op, d, g, 2, 2 * g, bias, rng)
                for key, value in errors.items():
                    worst[key] = max(worst.get(key, 0.0), value)
                count += 1
        report["dims"][f"{ndim}d"] = {"configurations": count, "max relative error": worst}
        print(
            f"conv_transpose{ndim}d: {count} configurations, max relative error vs PyTorch "
            + ", ".join(f"{key} {value:.1e}" for key, value in worst.items())
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    bad = [v for dim in report["dims"].values() for v in dim["max relative error"].values() if v > 1e-12]
    print("all agree to 1e-12" if not bad else f"DISAGREE: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
