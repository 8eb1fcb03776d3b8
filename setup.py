"""Builds jaxconv's optional oneDNN XLA FFI handler (csrc/onednn_ffi.cc -> jaxconv/plan/_onednn_ffi*.so).

Everything else is declared in pyproject.toml.  The handler needs a C++17 compiler and XLA's FFI
headers (``jax.ffi.include_dir()``: jaxlib, a build requirement); it does not link oneDNN (it opens
the library at run time).  Where it cannot be built, the install goes on without it and jaxconv runs
on its XLA forms (``jaxconv.plan.onednn.status()`` says why).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str | None:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = os.path.join(next(iter(spec.submodule_search_locations)), "include")
    return include if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else None


class BuildHandler(build_ext):
    """build_ext that finds XLA's FFI headers and never fails the install over the optional handler."""

    def build_extensions(self) -> None:
        include = _ffi_include_dir()
        if include is None:
            print("jaxconv: XLA's FFI headers not found (jaxlib): the oneDNN handler is not built", file=sys.stderr)
            return
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()

    def get_ext_filename(self, fullname: str) -> str:
        # A plain shared library loaded with ctypes, not a Python module: no ABI tag in its name.
        return os.path.join(*fullname.split(".")) + ".so"


setup(
    ext_modules=[
        Extension(
            "jaxconv.plan._onednn_ffi",
            sources=["csrc/onednn_ffi.cc"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-Wno-return-type"],
            libraries=["dl"],
            optional=True,  # no compiler: install without it (the XLA forms run)
        )
    ],
    cmdclass={"build_ext": BuildHandler},
)
