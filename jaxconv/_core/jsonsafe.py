"""Strict JSON for what jaxconv writes (metrics, reports): no bare ``NaN``/``Infinity``, which
Python's ``json`` emits by default and every other JSON parser rejects."""

from __future__ import annotations

import json
import math


def json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def strict_json_bytes(record) -> bytes:
    """``record`` as indented strict JSON, UTF-8, with a final newline."""
    return (json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n").encode()
