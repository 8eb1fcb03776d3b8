"""Which form of a rule runs: the planner, and a public way to force a form.

Several ops have more than one implementation of the same formula (every one
tested against ``jax.grad``): a convolution's forward is either XLA's
convolution (``"conv"``) or the matrix product ``Y = phi(X) F`` over
cache-sized batch blocks (``"im2row_blocked"``); its backward is the Rot180 /
zero-insertion convolutions (``"conv"``), the matrix products ``dF = phi(X)^T
dY``, ``dX = phi*(dY F^T)`` (``"im2row"``, or ``"im2row_blocked"`` over batch
blocks), or dX by the convolution and dF by the blocked products
(``"mixed"``); at stride 1 both also run as Winograd minimal filtering
(``"winograd2"``, ``"winograd4"``: ``F(2, r)`` or ``F(4, r)`` per spatial
axis, ``jaxconv.plan.winograd``), forward and backward; with the optional
oneDNN library, all three formulas run as oneDNN's kernels (``"onednn"``,
``jaxconv.plan.onednn``: custom calls through a compiled XLA FFI handler;
float32 and bfloat16 on CPU, only when forced).  Pooling runs either on a reshape of non-overlapping windows
(``"reshape"``) or on strided slices (``"slices"``).

The choice is made once per trace, from static facts only:

* the platform of the arrays' devices (:func:`platform_of`): a concrete array
  says where it lives; a traced one (under ``jit``) follows
  ``jax.default_device`` when it is set, else the default backend;
* the static shapes and arguments; a *symbolic* dimension (``jax.export``
  with ``jax.export.symbolic_shape("b, 8, 8, 1")``) makes every size unknown,
  and then the forms that need no size are chosen (``"conv"``), even in place
  of a forced form that needs them (:data:`SIZED_FORMS`), so
  shape-polymorphic export works for every op under every form;
* :func:`forms`, a context manager that forces a form, for tests,
  benchmarks and users who know better::

      with jaxconv.plan.forms(conv_forward="conv", conv_backward="im2row"):
          grads = jax.grad(loss)(params)   # traced here: these forms

  The choice is baked into what is traced inside the block.  The forced
  forms are part of ``jax.jit``'s cache key (a ``jax.make_user_context``), so
  a function jitted and called before the block is traced again inside it,
  with the forced forms, and its earlier compilation is used again after it.
  (What was traced once and is called as a value, such as the exported
  program of ``jax.export`` or an ahead-of-time ``.lower(...).compile()``,
  keeps the forms it was traced with.)

:func:`conv_plan` returns a :class:`ConvPlan` that names the two forms and
why they were chosen; ``repr`` it to see the planner's reasoning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from .winograd import POINTS

__all__ = [
    "CONV_BACKWARD_FORMS",
    "CONV_FORWARD_FORMS",
    "POOL_FORMS",
    "SIZED_FORMS",
    "MEASURED_TABLE",
    "ONEDNN_DW_BLOCK",
    "ONEDNN_FORMS",
    "WINOGRAD_TILES",
    "ConvPlan",
    "conv_plan",
    "forms",
    "is_static",
    "measured_layers",
    "onednn_fits",
    "platform_of",
    "pool_form",
    "winograd_fits",
]

#: The conv forward forms (``jaxconv.ops.conv`` implements each).
CONV_FORWARD_FORMS = ("conv", "im2row_blocked", "winograd2", "winograd4", "onednn")
#: The conv backward forms.
CONV_BACKWARD_FORMS = (
    "conv",
    "im2row",
    "im2row_blocked",
    "mixed",
    "winograd2",
    "winograd4",
    "onednn",
    "onednn_blocked",
)
#: The oneDNN forms (:mod:`jaxconv.plan.onednn`).  ``"onednn_blocked"`` (backward only) runs dX as ``"onednn"``
#: does and dW over batch blocks of at most :data:`ONEDNN_DW_BLOCK` images, summed in XLA: a shorter
#: accumulation, for layers where oneDNN's one long dW sum has float32 error over twice the direct form's.
ONEDNN_FORMS = frozenset({"onednn", "onednn_blocked"})
ONEDNN_DW_BLOCK = 8
#: The Winograd forms and their output tile (per spatial axis).  They need
#: stride 1, dilation 1 and one group (:func:`winograd_fits`); forced on any
#: other convolution, the planner's own choice runs instead.
WINOGRAD_TILES = {"winograd2": 2, "winograd4": 4}
#: The pooling forms.
POOL_FORMS = ("reshape", "slices")
#: The conv forms that need every size known at trace time (they cut the batch
#: into blocks, or the image into tiles): with a symbolic dimension
#: (``jax.export``), forced or not, ``"conv"`` runs in their place.
SIZED_FORMS = frozenset({"im2row_blocked", "mixed", "onednn_blocked", *WINOGRAD_TILES})

# The forced forms, as a sorted tuple of (name, form) pairs: a jax user context,
# so that the value is part of jit's cache key (and of its trace context): a
# function jitted outside a ``forms`` block is traced again inside it.  (jax
# versions without ``jax.make_user_context`` keep it in a context variable,
# which jit's cache does not see.)
if hasattr(jax, "make_user_context"):
    _FORCED_CONTEXT = jax.make_user_context(default_value=())

    def _current() -> dict:
        return dict(_FORCED_CONTEXT.value or ())

    @contextlib.contextmanager
    def _set(forced: dict) -> Iterator[None]:
        with _FORCED_CONTEXT(tuple(sorted(forced.items()))):
            yield
else:  # pragma: no cover - older jax
    _FORCED_VAR: contextvars.ContextVar[tuple] = contextvars.ContextVar("jaxconv_forced_forms", default=())

    def _current() -> dict:
        return dict(_FORCED_VAR.get())

    @contextlib.contextmanager
    def _set(forced: dict) -> Iterator[None]:
        token = _FORCED_VAR.set(tuple(sorted(forced.items())))
        try:
            yield
        finally:
            _FORCED_VAR.reset(token)


@contextlib.contextmanager
def forms(
    *,
    conv_forward: str | None = None,
    conv_backward: str | None = None,
    pool: str | None = None,
    onednn: bool | None = None,
) -> Iterator[None]:
    """Force the named forms for everything traced inside the ``with`` block (``None``: the planner's).

    ``onednn=False`` keeps the planner's own choice off the ``"onednn"`` forms (which it picks on CPU where
    :data:`MEASURED_TABLE` says they are faster): for programs sharded over several devices (the custom
    calls have no sharding rule) or exported without naming them (``jax.export``'s custom-call check).
    Nested blocks override the forms they name and keep the outer ones.
    ``ValueError`` for a form name that does not exist.  The forced forms are
    part of ``jax.jit``'s cache key: a function jitted and called before the
    block is traced again inside it (with these forms), and again after it
    (with the planner's; each trace is cached as usual).
    """
    requested = {
        "conv_forward": (conv_forward, CONV_FORWARD_FORMS),
        "conv_backward": (conv_backward, CONV_BACKWARD_FORMS),
        "pool": (pool, POOL_FORMS),
    }
    forced = _current()
    for name, (value, known) in requested.items():
        if value is None:
            continue
        if value not in known:
            raise ValueError(f"`{name}` (={value!r}) must be one of {list(known)}.")
        if value in ONEDNN_FORMS and not _onednn().available():
            raise ValueError(f"`{name}` (={value!r}) cannot run here: {_onednn().status()}.")
        forced[name] = value
    if onednn is not None:
        if not isinstance(onednn, bool):
            raise ValueError(f"`onednn` (={onednn!r}) must be True, False or None.")
        forced["onednn"] = onednn
    with _set(forced):
        yield


def forced(name: str) -> str | None:
    """The form forced for ``name`` (``"conv_forward"``, ``"conv_backward"``, ``"pool"``) in this context."""
    return _current().get(name)


def is_static(*shapes: Sequence) -> bool:
    """Every dimension of every shape is a plain int (no ``jax.export`` symbolic dimension)."""
    return all(isinstance(d, int) for shape in shapes for d in shape)


def platform_of(*arrays) -> str:
    """``"cpu"``, ``"gpu"``, ``"tpu"``...: where the arrays' devices are.

    Concrete ``jax.Array``\\ s report their devices (the first array that has
    any decides); numpy arrays, Python scalars and tracers do not, and then
    the platform is ``jax.default_device``'s when one is set, else
    ``jax.default_backend()``.  GPU platforms (``"cuda"``, ``"rocm"``) are
    reported as ``"gpu"``.
    """
    for a in arrays:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            try:
                devices = a.devices()
            except Exception:  # deleted or otherwise unavailable buffers: fall through
                continue
            if devices:
                return _normalise(next(iter(devices)).platform)
    default = jax.config.jax_default_device  # type: ignore[attr-defined]  # a flag set up at run time
    if default is not None:
        return _normalise(default.platform if hasattr(default, "platform") else str(default))
    return _normalise(jax.default_backend())


def _normalise(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


# --- convolution ----------------------------------------------------------------------

# Below this many multiply-adds (about the forward's), the blocked im2row
# form's extra ops cost more than XLA's own convolution saves.
SMALL_CONV_MACS = 5 * 10**6
# A block holds at least one image; past this many phi entries per image
# (256 MiB of float32) that one image's phi costs more memory than the speed
# is worth, so the convolution form, which needs no phi, is kept.
MAX_PHI_ENTRIES_PER_IMAGE = 64 * 2**20
# A GEMM with fewer columns (output channels per group) or a shorter
# contraction (kernel volume * C/G; O/G for dY F^T) than this runs far from
# the matrix-product peak on CPU, and XLA's own convolution is then as fast.
MIN_GEMM_SIDE = 32
# Winograd's float32 error against float64, as a ratio to the direct form's:
# normwise on the benchmark shapes (benchmarks/run.py), F(2x2, 3x3) 0.7-1.8x;
# max-abs over a wider grid (benchmarks/form_errors.py: 32-256 channels,
# 4-56 pixels, batch 1-128), F(2x2, 3x3) 0.56-1.65x on the layers this planner
# picks it for (at least MIN_GEMM_SIDE channels on both sides), but up to 3.4x
# on 16-channel layers (not picked: narrow, see below); F(4x4, 3x3) 3.0-10.4x,
# F(2x2, 5x5) 1.9-12.3x, F(4x4, 5x5) 6.9-35x.  The planner therefore uses
# F(2, r) only, for kernels of at most this size per axis.
WINOGRAD_MAX_KERNEL = 3
# From this many input channels per group on, XLA's own CPU convolution
# forward runs near the GEMM peak (128->128 3x3 on 16x16: 150 GFLOP/s, 0.8-1x
# the blocked product's time), so the forward stays XLA's.
XLA_FORWARD_CHANNELS = 128


class ConvPlan(NamedTuple):
    """The forms one convolution runs: ``forward`` in :data:`CONV_FORWARD_FORMS`,
    ``backward`` in :data:`CONV_BACKWARD_FORMS`, ``reason``, the planner's why, and the ``platform``
    planned for.  On CPU, ``repr`` adds a line saying whether the ``"onednn"`` forms could run
    (:func:`jaxconv.plan.onednn.status`: which oneDNN, or why not and that the XLA forms run)."""

    forward: str
    backward: str
    reason: str
    platform: str = ""

    def __repr__(self) -> str:
        text = f"ConvPlan(forward={self.forward!r}, backward={self.backward!r}, reason={self.reason!r})"
        if self.platform == "cpu":
            text += f"\n  note: {_onednn().status()}"
        return text


def phi_entries_per_image(out_spatial: Sequence[int], kernel_spatial: Sequence[int], channels: int) -> int:
    """Entries of one image's phi: an output position per row, a kernel entry (all input channels) per column."""
    return math.prod(out_spatial) * math.prod(kernel_spatial) * channels


def winograd_fits(kernel_spatial, stride, dilation, groups, tile: int = 2) -> bool:
    """Winograd ``F(tile, k)`` applies: stride 1, dilation 1, one group, interpolation points for every axis."""
    return (
        all(s == 1 for s in stride)
        and all(d == 1 for d in dilation)
        and groups == 1
        and all(tile + k - 2 <= len(POINTS) for k in kernel_spatial)
    )


def onednn_fits(kernel_spatial, groups, platform: str, dtype) -> bool:
    """The ``"onednn"`` forms apply: on CPU, 1-3 spatial dimensions, the compiled handler and oneDNN loaded,
    and kernels for ``dtype`` on this CPU (float32; bfloat16 where the CPU has them)."""
    return (
        platform == "cpu"
        and dtype is not None
        and _onednn().fits(len(kernel_spatial), groups)
        and _onednn().available()
        and _onednn().dtype_supported(np.dtype(dtype))
    )


def _onednn():
    """The optional oneDNN module (ctypes, a shared library), imported only where an ``"onednn"`` form is
    forced or asked about: importing an op never loads it."""
    from . import onednn  # the optional extra

    return onednn


def conv_plan(
    *,
    batch,
    out_spatial,
    kernel_spatial,
    in_channels,
    out_channels,
    groups,
    stride,
    platform: str,
    dilation=None,
    dtype=None,
) -> ConvPlan:
    """The forms for one convolution (any number of spatial dimensions).

    ``batch`` and ``out_spatial`` may hold symbolic dimensions: then every size
    is unknown and the plan is ``("conv", "conv")``; a forced form that needs
    the sizes (:data:`SIZED_FORMS`: the blocked products, ``"mixed"``,
    Winograd) gives way to ``"conv"`` too, and the plan's ``reason`` says so.

    On CPU, XLA's convolution backward runs at 3-60 GFLOP/s, while the same
    formulas as cache-sized GEMMs (``"im2row_blocked"``) run near the matrix
    product's speed (benchmarks/README.md), for every stride, padding,
    dilation and group count; tiny convolutions, and images so large that one
    image's phi would be a large temporary, keep ``"conv"``.  With fewer than
    :data:`MIN_GEMM_SIDE` output channels per group at stride 1, dX's product
    ``dY F^T`` would contract over those few channels and dF's GEMM is as
    narrow: both stay in the convolution form (``"conv"``; with jax 0.10's
    XNNPACK-backed CPU convolutions 1.3x faster on resnet_small's 16-channel
    layers than ``"mixed"``, dX by the convolution and dF by the blocked
    products, which was the faster pair before).  The forward is the blocked product where the backward
    is blocked, both GEMM sides are at least :data:`MIN_GEMM_SIDE` wide and
    the input has fewer than :data:`XLA_FORWARD_CHANNELS` channels per group.
    Both are Winograd ``F(2x2, 3x3)`` (``"winograd2"``) for a 2-D, stride-1,
    undilated, ungrouped convolution with kernels of at most
    :data:`WINOGRAD_MAX_KERNEL` per axis and at least :data:`MIN_GEMM_SIDE`
    input and output channels: 2.25x fewer multiplications for a 3x3 kernel,
    1.4-2.6x faster than the blocked products on the benchmarks' layers,
    with float32 error within 2x the direct form's on those layers (measured
    max-abs ratio 0.56-1.65x, ``benchmarks/form_errors.py``; narrower layers,
    not picked, reach 3.4x).
    On GPU both are XLA's convolutions (cuDNN).

    ``dilation`` (default 1 everywhere) only matters for the Winograd forms,
    ``dtype`` (default unknown) for the ``"onednn"`` forms, which run only
    when forced (:mod:`jaxconv.plan.onednn`).
    """
    dilation = tuple(dilation) if dilation is not None else (1,) * len(kernel_spatial)
    forced_forward, forced_backward = forced("conv_forward"), forced("conv_backward")
    forward, backward, reason = _conv_choice(
        batch, out_spatial, kernel_spatial, in_channels, out_channels, groups, stride, dilation, platform
    )
    if (
        platform == "cpu"
        and not (forced_forward and forced_backward)
        and _current().get("onednn", True)
        and dtype is not None
        and np.dtype(dtype) == np.float32
        and is_static((batch,), out_spatial)
        and all(d == 1 for d in dilation)
    ):
        forward, backward, reason = _measured_choice(
            forward, backward, reason, batch, out_spatial, kernel_spatial, in_channels, out_channels, groups, stride
        )
    if forced_forward or forced_backward:
        reason = "forced by jaxconv.plan.forms" + (
            f"; the planner would pick ({forward}, {backward}): {reason}" if reason else ""
        )
    chosen = []
    static = is_static((batch,), out_spatial)
    for wanted, own in ((forced_forward, forward), (forced_backward, backward)):
        if wanted in SIZED_FORMS and not static:
            reason += f"; {wanted} needs every size, and a dimension is symbolic: conv runs"
            wanted = "conv"
        if wanted in WINOGRAD_TILES and not winograd_fits(
            kernel_spatial, stride, dilation, groups, WINOGRAD_TILES[wanted]
        ):
            reason += f"; {wanted} needs stride 1, dilation 1, one group: {own} runs"
            wanted = own
        if wanted in ONEDNN_FORMS and not (static and onednn_fits(kernel_spatial, groups, platform, dtype)):
            reason += f"; onednn needs the CPU, static shapes and a data type it has kernels for: {own} runs"
            wanted = own
        chosen.append(wanted or own)
    return ConvPlan(chosen[0], chosen[1], reason, platform)


#: The measured table the planner reads on CPU: per layer geometry, each form's forward and backward time
#: (``python benchmarks/run.py --only forms --write-table PATH`` writes one; ``$JAXCONV_FORMS_TABLE`` names
#: another to read instead).  Measured on one machine (its ``machine`` entry says which): another CPU may rank
#: the forms otherwise, so measure there and point ``$JAXCONV_FORMS_TABLE`` at the result.
MEASURED_TABLE = Path(__file__).with_name("measured_cpu.json")
TABLE_ENV = "JAXCONV_FORMS_TABLE"
# A measured layer stands for this one when they share kernel size and stride and their input channels,
# output channels and output positions (batch x pixels) differ by at most this factor each.
MEASURED_NEIGHBOURHOOD = 2.0
# oneDNN replaces the planner's own form unless that form measured at least this much faster on the nearest
# layer.  Near-ties go to oneDNN: in whole training steps (benchmarks/run.py's step section) every conv
# forced onto oneDNN ran 8-22 % faster than the planner's per-layer mix on every row, since a custom call on
# jaxconv's own layouts spares the copies XLA makes around the Winograd and blocked forms, which timing one
# layer alone does not show.
MEASURED_MARGIN = 1.1
# ... and only where its float32 error on that layer was within this factor of the direct form's (the bound
# every form the planner picks keeps; y for the forward, dx and dw for the backward).
MAX_ERROR_RATIO = 2.0


@functools.cache
def _read_table(path: str) -> tuple[dict, ...]:
    try:
        data = json.loads(Path(path).read_text())
        return tuple(row for row in data["layers"] if isinstance(row, dict))
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def measured_layers() -> tuple[dict, ...]:
    """The rows of the measured table (:data:`MEASURED_TABLE`, or ``$JAXCONV_FORMS_TABLE``); empty if unreadable."""
    return _read_table(os.environ.get(TABLE_ENV) or str(MEASURED_TABLE))


def _nearest(batch, out_spatial, kernel_spatial, in_channels, out_channels, stride) -> dict | None:
    positions = batch * math.prod(out_spatial)
    best, best_distance = None, math.inf
    for row in measured_layers():
        try:
            if tuple(row["kernel"]) != tuple(kernel_spatial) or tuple(row["stride"]) != tuple(stride):
                continue
            ratios = (
                in_channels / row["in_channels"],
                out_channels / row["out_channels"],
                positions / (row["batch"] * math.prod(row["out_spatial"])),
            )
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if all(1 / MEASURED_NEIGHBOURHOOD <= r <= MEASURED_NEIGHBOURHOOD for r in ratios):
            distance = sum(abs(math.log(r)) for r in ratios)
            if distance < best_distance:
                best, best_distance = row, distance
    return best


def _measured_choice(forward, backward, reason, batch, out_spatial, kernel_spatial, in_channels, out_channels, groups,
                     stride):  # fmt: skip
    """``"onednn"`` for the forward, and ``"onednn"`` or ``"onednn_blocked"`` (the faster of those within
    :data:`MAX_ERROR_RATIO`) for the backward, unless, on the nearest measured layer, the planner's own form ran
    :data:`MEASURED_MARGIN` times faster (and where the forms can run here)."""
    if groups != 1:
        return forward, backward, reason
    row = _nearest(batch, out_spatial, kernel_spatial, in_channels, out_channels, stride)
    if row is None:
        return forward, backward, reason
    picked, notes = [forward, backward], []
    errors = row.get("error_ratio", {})
    for i, (part, own) in enumerate((("forward", forward), ("backward", backward))):
        times = row.get(part, {})
        best = None
        for form in ("onednn",) if i == 0 else ("onednn", "onednn_blocked"):
            # Its float32 error on that layer as a ratio to the direct form's (y for the forward, dx and dw for
            # the backward): within MAX_ERROR_RATIO, like every form the planner picks; unmeasured: not picked.
            ratios = errors.get("onednn/onednn" if i == 0 else f"onednn/{form}")
            if not (isinstance(ratios, list) and len(ratios) == 3) or form not in times:
                continue
            worst = ratios[0] if i == 0 else max(ratios[1:])
            if worst > MAX_ERROR_RATIO:
                notes.append(f"{part} {form}'s float32 error {worst:.2f}x the direct form's")
            elif best is None or times[form] < times[best]:
                best = form
        if best is not None and own in times and times[own] * MEASURED_MARGIN > times[best]:
            picked[i] = best
            notes.append(f"{part} {best} {times[best] * 1e3:.2f} ms vs {own} {times[own] * 1e3:.2f} ms")
    if not ONEDNN_FORMS & set(picked) or not onednn_fits(kernel_spatial, groups, "cpu", np.float32):
        return forward, backward, reason
    where = f"{row.get('name', 'a measured layer')}"
    return picked[0], picked[1], reason + f"; measured on {where}: " + ", ".join(notes)


def _conv_choice(batch, out_spatial, kernel_spatial, in_channels, out_channels, groups, stride, dilation, platform):
    if not is_static((batch,), out_spatial):
        return "conv", "conv", "a symbolic dimension: the forms that need no size"
    if platform != "cpu":
        return "conv", "conv", f"on {platform}, XLA's convolutions"
    cg, og = in_channels // groups, out_channels // groups
    phi = phi_entries_per_image(out_spatial, kernel_spatial, in_channels)
    macs = batch * phi * og
    if macs < SMALL_CONV_MACS:
        return "conv", "conv", f"{macs:,} multiply-adds: too small for the blocked products to pay"
    if phi > MAX_PHI_ENTRIES_PER_IMAGE:
        return "conv", "conv", f"one image's phi would hold {phi:,} entries"
    facts = f"on CPU: {og} output and {cg} input channels per group, {macs:,} multiply-adds"
    if (
        len(kernel_spatial) == 2
        and max(kernel_spatial) <= WINOGRAD_MAX_KERNEL
        and math.prod(kernel_spatial) > 1
        and min(cg, og) >= MIN_GEMM_SIDE
        and winograd_fits(kernel_spatial, stride, dilation, groups)
    ):
        return "winograd2", "winograd2", facts + ", stride 1: Winograd F(2x2, 3x3)"
    narrow = og < MIN_GEMM_SIDE
    backward = "conv" if narrow and all(s == 1 for s in stride) else "im2row_blocked"
    contraction = math.prod(kernel_spatial) * cg
    wide = og >= MIN_GEMM_SIDE and contraction >= MIN_GEMM_SIDE
    forward = "im2row_blocked" if wide and cg < XLA_FORWARD_CHANNELS else "conv"
    return forward, backward, f"{facts}, GEMM contraction {contraction}"


# --- pooling -----------------------------------------------------------------------------


def pool_form(window: Sequence[int], stride: Sequence[int], padding_fits_tiles: bool = True) -> str:
    """``"reshape"`` for non-overlapping windows (stride == window) that tile the input, else ``"slices"``.

    A forced ``"reshape"`` falls back to ``"slices"`` where windows overlap: the
    reshape form cannot express them.
    """
    tiles = tuple(window) == tuple(stride) and padding_fits_tiles
    wanted = forced("pool")
    if wanted is not None:
        return wanted if (tiles or wanted == "slices") else "slices"
    return "reshape" if tiles else "slices"
