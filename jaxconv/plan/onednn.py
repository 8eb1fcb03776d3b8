"""oneDNN convolution kernels inside XLA programs: the ``"onednn"`` conv forms.

XLA's CPU convolutions and the matrix-product forms run layers with few
channels (16-64) far from the machine's peak (benchmarks/README.md);
oneDNN's direct convolution kernels (the ones PyTorch runs on CPU) are
faster there.  jaxconv calls them through a small compiled XLA FFI handler
(``csrc/onednn_ffi.cc``, built by ``pip install`` into
``jaxconv/plan/_onednn_ffi*.so`` when a C++ compiler is present) as custom
calls inside the compiled program: no host callback, no Python on the way.
The three formulas of the convolution rule each have a handler: the forward
(docs/convolution.md §1), ``dL/dx`` (backward data, §5.3) and ``dL/dw``
(backward weights, §5.4), for 1-3 spatial dimensions, any stride, padding,
dilation and group count, float32 and (where the CPU has the kernels, see
:func:`dtype_supported`) bfloat16::

    with jaxconv.plan.forms(conv_forward="onednn", conv_backward="onednn"):
        ...

The library itself is not linked: the handler opens ``libdnnl.so`` at run
time, ``$JAXCONV_ONEDNN_LIB`` if set, else the ``onednn-cpu-gomp`` wheel's
(``pip install 'jaxconv[onednn]'``, Linux x86-64), and refuses a library
whose version is outside :data:`SUPPORTED_VERSIONS`.  Where the handler was
not built or the library is missing, :func:`available` is False,
:func:`status` says why in one line (``repr(jaxconv.plan.conv_plan(...))``
shows it), and everything runs on the XLA forms.

Behaviour worth knowing:

* primitives are cached by geometry, at most :func:`cache_info`\\ ``["capacity"]``
  of them (least recently used freed first; :func:`set_cache_size`);
* calls run concurrently from several threads (no global lock: each call
  has its own scratchpad and stream);
* the workspace a call needs (oneDNN's scratchpad, the kernel reordered
  into oneDNN's layout) is allocated by XLA as a second result of the custom
  call, sized at trace time: ``compiled.memory_analysis()`` counts it;
* ``jax.vmap`` batches: vmapped images with one kernel run as one call on
  ``N * B`` images; vmapped kernels run instance by instance inside one call;
* errors (an unsupported data type on this CPU, a geometry oneDNN refuses)
  are XLA errors raised where the program runs, naming the cause;
* ``jax.export`` works with the custom calls allowed explicitly:
  ``jax.export.export(f, disabled_checks=jaxconv.plan.onednn.disabled_checks())``;
  the program then runs where jaxconv's handler is registered (import
  ``jaxconv.plan.onednn`` and check :func:`available` before calling it);
* the custom calls have no sharding rule: inside a program sharded over
  several devices, XLA gathers their operands onto each device.  The
  planner's default choice never picks these forms (they run when forced).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._core import window as _window

__all__ = [
    "HANDLER_ENV",
    "LIBRARY_ENV",
    "SUPPORTED_VERSIONS",
    "TARGETS",
    "available",
    "cache_info",
    "clear_cache",
    "disabled_checks",
    "dtype_supported",
    "fits",
    "forward",
    "handler_path",
    "input_grad",
    "kernel_grad",
    "library_path",
    "set_cache_size",
    "status",
    "version",
]

#: Environment variable naming a ``libdnnl.so`` (oneDNN 3.x) to use instead of the installed wheel's.
LIBRARY_ENV = "JAXCONV_ONEDNN_LIB"
#: Environment variable naming a compiled handler (``_onednn_ffi*.so``) to use instead of the installed one.
HANDLER_ENV = "JAXCONV_ONEDNN_HANDLER"
INSTALL_HINT = "pip install 'jaxconv[onednn]' (the onednn-cpu-gomp wheel, Linux x86-64)"
#: The oneDNN versions the handler is written for: ``low <= (major, minor) < high`` (its 3.x C API).
SUPPORTED_VERSIONS = ((3, 0), (4, 0))
#: The custom-call targets, one per formula.
TARGETS = {
    "forward": "jaxconv_onednn_forward",
    "input_grad": "jaxconv_onednn_input_grad",
    "kernel_grad": "jaxconv_onednn_kernel_grad",
}


def library_path() -> str | None:
    """Where ``libdnnl.so`` is: ``$JAXCONV_ONEDNN_LIB``, else the ``onednn-cpu-gomp`` wheel's file; None if neither."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return explicit
    try:
        from importlib import metadata

        dist = metadata.distribution("onednn-cpu-gomp")
    except Exception:
        return None
    for file in dist.files or ():
        # Wheel data files are installed under the environment's prefix (lib/libdnnl.so.3).
        if file.name.startswith("libdnnl.so") and Path(str(dist.locate_file(file))).exists():
            return str(Path(str(dist.locate_file(file))).resolve())
    return None


def handler_path() -> str | None:
    """The compiled FFI handler: ``$JAXCONV_ONEDNN_HANDLER``, else the one ``pip install`` built; None if neither."""
    explicit = os.environ.get(HANDLER_ENV)
    if explicit:
        return explicit
    built = sorted(Path(__file__).parent.glob("_onednn_ffi*.so"))
    return str(built[0]) if built else None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The handler library, opened on oneDNN and registered with XLA; else ``(None, why not)``."""
    path = handler_path()
    if path is None:
        return None, "jaxconv's oneDNN handler was not built (pip install needs a C++ compiler for it)"
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        return None, f"cannot load jaxconv's oneDNN handler {path}: {err}"
    lib.jaxconv_onednn_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.jaxconv_onednn_open.restype = ctypes.c_int
    lib.jaxconv_onednn_version.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.jaxconv_onednn_version.restype = None
    lib.jaxconv_onednn_probe.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    lib.jaxconv_onednn_probe.restype = ctypes.c_int
    lib.jaxconv_onednn_set_cache_size.argtypes = [ctypes.c_int64]
    lib.jaxconv_onednn_set_cache_size.restype = None
    lib.jaxconv_onednn_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.jaxconv_onednn_cache_stats.restype = None
    lib.jaxconv_onednn_cache_clear.argtypes = []
    lib.jaxconv_onednn_cache_clear.restype = None
    lib.jaxconv_onednn_workspace_bytes.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_size_t]
    lib.jaxconv_onednn_workspace_bytes.restype = ctypes.c_int64
    dnnl = library_path()
    if dnnl is None:
        return None, f"the oneDNN library is not installed ({INSTALL_HINT}, or set ${LIBRARY_ENV})"
    error = ctypes.create_string_buffer(512)
    if lib.jaxconv_onednn_open(os.fsencode(dnnl), error, len(error)) != 0:
        return None, f"oneDNN could not be opened: {error.value.decode(errors='replace')}"
    found = _version_of(lib)
    low, high = SUPPORTED_VERSIONS
    if not low <= found[:2] < high:
        return None, f"oneDNN {'.'.join(map(str, found))} is outside the supported range [{low}, {high})"
    for name in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib, ""


def _version_of(lib: ctypes.CDLL) -> tuple[int, int, int]:
    out = (ctypes.c_int * 3)()
    lib.jaxconv_onednn_version(out)
    return (out[0], out[1], out[2])


def available() -> bool:
    """The compiled handler loads and opened a supported oneDNN library (its targets are registered with XLA)."""
    return _load()[0] is not None


def status() -> str:
    """One line: which oneDNN runs the ``"onednn"`` forms, or why they are unavailable."""
    lib, why = _load()
    if lib is None:
        return f"oneDNN forms unavailable: {why}; the XLA forms run"
    return f"oneDNN {'.'.join(map(str, _version_of(lib)))} through jaxconv's XLA FFI handler"


def version() -> tuple[int, int, int] | None:
    """The opened oneDNN's ``(major, minor, patch)``; None where unavailable."""
    lib = _load()[0]
    return None if lib is None else _version_of(lib)


@functools.cache
def dtype_supported(dtype) -> bool:
    """oneDNN has kernels for all three formulas in ``dtype`` (float32; bfloat16 where the CPU has them)."""
    lib = _load()[0]
    name = np.dtype(dtype).name
    if lib is None or name not in ("float32", "bfloat16"):
        return False
    error = ctypes.create_string_buffer(512)
    return lib.jaxconv_onednn_probe(int(name == "bfloat16"), error, len(error)) == 0


def _handler() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"jaxconv's oneDNN forms are unavailable: {why}.")
    return lib


def set_cache_size(capacity: int) -> None:
    """Keep at most ``capacity`` geometries' primitives (default 256); the least recently used are freed first."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"`capacity` (={capacity!r}) must be a non-negative integer.")
    _handler().jaxconv_onednn_set_cache_size(capacity)


def cache_info() -> dict[str, int]:
    """The primitive cache: ``entries``, ``capacity``, ``hits`` and ``misses`` since the process started."""
    out = (ctypes.c_int64 * 4)()
    _handler().jaxconv_onednn_cache_stats(out)
    return dict(entries=out[0], capacity=out[1], hits=out[2], misses=out[3])


def clear_cache() -> None:
    """Free every cached primitive (calls running now keep theirs until they return)."""
    _handler().jaxconv_onednn_cache_clear()


def disabled_checks() -> list:
    """What ``jax.export.export(..., disabled_checks=...)`` needs to export a program using these forms."""
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in TARGETS.values()]


def fits(ndim: int, groups: int) -> bool:
    """oneDNN's forms cover 1-3 spatial dimensions, any group count (the data type is :func:`dtype_supported`)."""
    return 1 <= ndim <= 3 and groups >= 1


_KINDS = {"forward": 0, "input_grad": 1, "kernel_grad": 2}


def _workspace_bytes(formula, dtype, x_shape, y_shape, w_shape, stride, padding, dilation, groups) -> int:
    """The bytes of workspace (oneDNN's scratchpad, the kernel in its layout) the handler uses for this geometry:
    allocated by XLA as the custom call's second result, so the program's memory accounts for it.  0 where
    oneDNN refuses the geometry (the call then raises the handler's error)."""
    nd = len(stride)
    three = lambda values: [*map(int, values), *([0] * (3 - nd))]
    packed = [
        _KINDS[formula], int(np.dtype(dtype) == jnp.bfloat16), nd, x_shape[0], x_shape[-1], w_shape[-1], groups,
        *three(x_shape[1:-1]), *three(y_shape[1:-1]), *three(w_shape[:-2]), *three(stride), *three(dilation),
        *three(lo for lo, _ in padding), *three(hi for _, hi in padding),
    ]  # fmt: skip
    error = ctypes.create_string_buffer(512)
    size = _handler().jaxconv_onednn_workspace_bytes((ctypes.c_int64 * len(packed))(*packed), error, len(error))
    return max(int(size), 0)


def _call(formula: str, out_shape, dtype, a, b, *, x_shape, y_shape, w_shape, stride, padding, dilation, groups):
    attrs = dict(
        stride=np.asarray(stride, np.int64),
        dilation=np.asarray(dilation, np.int64),
        pad_lo=np.asarray([lo for lo, _ in padding], np.int64),
        pad_hi=np.asarray([hi for _, hi in padding], np.int64),
        groups=np.int64(groups),
    )
    workspace = _workspace_bytes(formula, dtype, x_shape, y_shape, w_shape, stride, padding, dilation, groups)
    results = (jax.ShapeDtypeStruct(tuple(out_shape), dtype), jax.ShapeDtypeStruct((workspace,), jnp.uint8))
    call = jax.ffi.ffi_call(TARGETS[formula], results, vmap_method="expand_dims")
    return call(a, b, **attrs)[0]


def _out_size(spatial, kernel, stride, padding, dilation) -> list[int]:
    return [
        _window.output_size(s, lo, hi, k, st, d)
        for s, (lo, hi), k, st, d in zip(spatial, padding, kernel, stride, dilation)
    ]


def forward(x, w, *, stride: Sequence[int], padding, dilation: Sequence[int], groups: int = 1) -> jax.Array:
    """``y`` of the convolution (no bias): ``x`` ``(N, *S, C)``, ``w`` ``(*K, C/groups, O)``; ``padding`` pairs."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    y_shape = (x.shape[0], *_out_size(x.shape[1:-1], w.shape[:-2], stride, padding, dilation), w.shape[-1])
    return _call(
        "forward", y_shape, x.dtype, x, w, x_shape=x.shape, y_shape=y_shape, w_shape=w.shape,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip


def input_grad(
    w, g, *, x_shape: Sequence[int], stride: Sequence[int], padding, dilation: Sequence[int], groups: int = 1
) -> jax.Array:
    """``dL/dx`` of shape ``x_shape`` for the output gradient ``g`` (oneDNN's backward data)."""
    w, g = jnp.asarray(w), jnp.asarray(g)
    return _call(
        "input_grad", tuple(x_shape), g.dtype, w, g, x_shape=tuple(x_shape), y_shape=g.shape, w_shape=w.shape,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip


def kernel_grad(
    x, g, *, w_shape: Sequence[int], stride: Sequence[int], padding, dilation: Sequence[int], groups: int = 1
) -> jax.Array:
    """``dL/dw`` of shape ``w_shape`` for the output gradient ``g`` (oneDNN's backward weights)."""
    x, g = jnp.asarray(x), jnp.asarray(g)
    return _call(
        "kernel_grad", tuple(w_shape), x.dtype, x, g, x_shape=x.shape, y_shape=g.shape, w_shape=tuple(w_shape),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip
