"""How a rule runs: the planner, the computational forms (im2row products, Winograd, oneDNN) and a way to force one.

``jaxconv.plan.forms(...)`` forces a form; ``jaxconv.plan.conv_plan(...)`` says which form
the planner picks for a layer and why.
"""

import importlib

from . import im2row, winograd
from .planner import (
    CONV_BACKWARD_FORMS,
    CONV_FORWARD_FORMS,
    MEASURED_TABLE,
    ONEDNN_DW_BLOCK,
    ONEDNN_FORMS,
    POOL_FORMS,
    SIZED_FORMS,
    WINOGRAD_TILES,
    ConvPlan,
    conv_plan,
    forced,
    forms,
    is_static,
    measured_layers,
    onednn_fits,
    platform_of,
    pool_form,
    winograd_fits,
)

__all__ = [
    "CONV_BACKWARD_FORMS",
    "CONV_FORWARD_FORMS",
    "MEASURED_TABLE",
    "ONEDNN_DW_BLOCK",
    "ONEDNN_FORMS",
    "POOL_FORMS",
    "SIZED_FORMS",
    "WINOGRAD_TILES",
    "ConvPlan",
    "conv_plan",
    "forced",
    "forms",
    "im2row",
    "is_static",
    "measured_layers",
    "onednn",
    "onednn_fits",
    "platform_of",
    "pool_form",
    "winograd",
    "winograd_fits",
]


def __getattr__(name: str):
    """``jaxconv.plan.onednn``, imported on first use: the optional oneDNN forms load a shared library through
    ctypes, which importing an op must not do."""
    if name == "onednn":
        return importlib.import_module(f"{__name__}.onednn")  # the optional extra, loaded only when asked for
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
