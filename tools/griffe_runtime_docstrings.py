"""A Griffe extension for the API reference: docstrings set at import time.

Griffe reads the source without running it, so a docstring assigned after the
definition (``conv_transpose2d.__doc__ = _TRANSPOSE_DOC.format(...)``, one
template for the 1-, 2- and 3-D ops) is invisible to it.  For every public
jaxconv function that has no docstring in the source, this imports its module
and takes ``__doc__`` from the live object.  Used by mkdocs.yml.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    def on_function(self, *, func: griffe.Function, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if func.docstring is not None or func.name.startswith("_") or not func.path.startswith("jaxconv."):
            return
        module = importlib.import_module(func.module.path)
        doc = getattr(getattr(module, func.name, None), "__doc__", None)
        if doc:
            func.docstring = griffe.Docstring(inspect.cleandoc(doc), parent=func)
