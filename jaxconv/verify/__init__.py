"""Checkers for hand-written derivative rules, ours and yours.

:func:`check_vjp` compares a rule with a reference differentiated by autodiff;
:func:`check_rule` checks a ``custom_vjp``/``custom_jvp`` against autodiff of its own primal;
:func:`assert_rule_ok` / :func:`assert_vjp_ok` are the pytest one-liners and :func:`sweep`
draws shapes with hypothesis.  The conformance registry of jaxconv's own ops is
:mod:`jaxconv.verify.registry`.
"""

from .rules import (
    Check,
    Report,
    Residual,
    ResidualAudit,
    check_rule,
    check_vjp,
    low_precision_tolerance,
    reduction_size,
    relative_error,
)
from .sweeps import (
    Array,
    Config,
    SweepResult,
    arguments,
    array,
    assert_report_ok,
    assert_rule_ok,
    assert_vjp_ok,
    sample,
    shapes,
    sweep,
)

__all__ = [
    "Array",
    "Check",
    "Config",
    "Report",
    "Residual",
    "ResidualAudit",
    "SweepResult",
    "arguments",
    "array",
    "assert_report_ok",
    "assert_rule_ok",
    "assert_vjp_ok",
    "check_rule",
    "check_vjp",
    "low_precision_tolerance",
    "reduction_size",
    "relative_error",
    "sample",
    "shapes",
    "sweep",
]
