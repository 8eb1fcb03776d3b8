"""Optional oneDNN convolution kernels for float32 on CPU: the ``"onednn"`` conv forms.

XLA's CPU convolutions and the matrix-product forms run layers with few
channels (16-64) far from the machine's peak: their GEMMs are narrow, and
building ``phi`` costs as much as the product (benchmarks/README.md).
oneDNN's direct convolution kernels (the ones PyTorch runs on CPU) reach
2-3x their speed there.  With the ``onednn`` extra installed
(``pip install 'jaxconv[onednn]'``, the ``onednn-cpu-gomp`` wheel: a
prebuilt ``libdnnl.so`` for Linux x86-64, no compiler needed), the forms

    with jaxconv.plan.forms(conv_forward="onednn", conv_backward="onednn"):
        ...

compute, for float32 convolutions on CPU with one group, the same three
formulas as every other form through oneDNN: the forward (docs/convolution.md
§1), ``dL/dx`` (backward data, §5.3) and ``dL/dw`` (backward weights, §5.4).
They run as host callbacks (``jax.pure_callback``) inside the same
``custom_vjp`` rule, which keeps ``x`` and ``w`` as its residuals like every
form; the callbacks' own derivatives (grad-of-grad) are the hand-derived
``lax`` formulas.  Anything else (float64, groups, a GPU) runs the planner's
own forms.  A callback runs on the host: under ``jax.export`` or a sharded
multi-device program use the ``lax`` forms, which is why these forms are
never chosen unless asked for.

The library is found at ``$JAXCONV_ONEDNN_LIB`` if set, else in the
installed ``onednn-cpu-gomp`` distribution.  Memory layouts are given to
oneDNN by strides (NHWC activations, HWIO kernels: jaxconv's own, so no
copy); the kernel is reordered into the layout oneDNN prefers on each call.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._core import window as _window

__all__ = ["LIBRARY_ENV", "available", "forward", "input_grad", "kernel_grad", "library_path"]

#: Environment variable naming a ``libdnnl.so`` (oneDNN 3.x) to use instead of the installed wheel's.
LIBRARY_ENV = "JAXCONV_ONEDNN_LIB"
INSTALL_HINT = "pip install 'jaxconv[onednn]' (the onednn-cpu-gomp wheel, Linux x86-64)"

# oneDNN 3.x C API constants (dnnl_types.h): they are part of its stable ABI.
_CPU_ENGINE = 1
_IN_ORDER = 1
_F32 = 3
_FORMAT_ANY = 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_QUERY = dict(src=129, diff_src=130, weights=131, diff_weights=132, dst=133, diff_dst=134)
_ARG = dict(src=1, dst=17, weights=33, diff_src=129, diff_dst=145, diff_weights=161, from_=1, to=17)
_MAX_NDIMS = 12


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


@functools.cache
def _library():
    path = library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    return lib


def available() -> bool:
    """The oneDNN library loads (and an engine and stream can be made)."""
    try:
        return _library() is not None and _runtime() is not None
    except RuntimeError:
        return False


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"oneDNN: {what} failed with status {status}.")


def _dims(values: Sequence[int]):
    out = (ctypes.c_int64 * _MAX_NDIMS)()
    for i, v in enumerate(values):
        out[i] = int(v)
    return out


@functools.cache
def _runtime():
    lib = _library()
    if lib is None:
        return None
    engine, stream = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), _CPU_ENGINE, ctypes.c_size_t(0)), "engine")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, ctypes.c_uint(_IN_ORDER)), "stream")
    return lib, engine, stream


# One lock for every execution: a primitive's scratchpad and the memory
# handles are shared, and oneDNN runs each call on every core anyway.
_LOCK = threading.Lock()


def _strided(shape: Sequence[int], strides: Sequence[int]):
    lib = _library()
    md = ctypes.c_void_p()
    _check(
        lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(shape), _dims(shape), _F32, _dims(strides)),
        "memory descriptor",
    )
    return md


def _outer_strides(sizes: Sequence[int], inner: int) -> list[int]:
    """Row-major strides of ``sizes`` laid out in front of a contiguous block of ``inner`` elements."""
    return [inner * math.prod(sizes[i + 1 :]) for i in range(len(sizes))]


def _channels_last(n: int, c: int, spatial: Sequence[int]):
    """(N, C, *spatial) logical dims stored as (N, *spatial, C)."""
    return _strided((n, c, *spatial), (c * math.prod(spatial), 1, *_outer_strides(spatial, c)))


def _kernel_layout(o: int, i: int, kernel: Sequence[int]):
    """(O, I, *K) logical dims stored as (*K, I, O) (jaxconv's HWIO)."""
    return _strided((o, i, *kernel), (1, o, *_outer_strides(kernel, i * o)))


class _Geometry:
    """oneDNN primitives for one convolution geometry: forward, backward data, backward weights."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation):
        lib, engine, _ = _runtime()
        n, *spatial, c = x_shape
        *kernel, _, o = w_shape
        out = [
            _window.output_size(s, lo, hi, k, st, d)
            for s, (lo, hi), k, st, d in zip(spatial, padding, kernel, stride, dilation)
        ]
        self.x_shape, self.w_shape, self.y_shape = tuple(x_shape), tuple(w_shape), (n, *out, o)
        self.src, self.dst = _channels_last(n, c, spatial), _channels_last(n, o, out)
        self.user_w = _kernel_layout(o, c, kernel)
        any_w = ctypes.c_void_p()
        _check(
            lib.dnnl_memory_desc_create_with_tag(
                ctypes.byref(any_w), 2 + len(kernel), _dims((o, c, *kernel)), _F32, _FORMAT_ANY
            ),
            "kernel descriptor",
        )
        geometry = (
            _dims(stride),
            _dims([d - 1 for d in dilation]),
            _dims([lo for lo, _ in padding]),
            _dims([hi for _, hi in padding]),
        )
        self.forward_pd, self.data_pd, self.weights_pd = (ctypes.c_void_p() for _ in range(3))
        _check(
            lib.dnnl_convolution_forward_primitive_desc_create(
                ctypes.byref(self.forward_pd),
                engine,
                _FORWARD_TRAINING,
                _CONVOLUTION_DIRECT,
                self.src,
                any_w,
                None,
                self.dst,
                *geometry,
                None,
            ),
            "forward primitive descriptor",
        )
        _check(
            lib.dnnl_convolution_backward_data_primitive_desc_create(
                ctypes.byref(self.data_pd),
                engine,
                _CONVOLUTION_DIRECT,
                self.src,
                any_w,
                self.dst,
                *geometry,
                self.forward_pd,
                None,
            ),
            "backward-data primitive descriptor",
        )
        _check(
            lib.dnnl_convolution_backward_weights_primitive_desc_create(
                ctypes.byref(self.weights_pd),
                engine,
                _CONVOLUTION_DIRECT,
                self.src,
                any_w,
                None,
                self.dst,
                *geometry,
                self.forward_pd,
                None,
            ),
            "backward-weights primitive descriptor",
        )
        query = lambda pd, what: ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(pd, _QUERY[what], 0))
        # The activations must be taken in our layout, as given (oneDNN may not pick another for them).
        for pd, what, mine in (
            (self.forward_pd, "src", self.src),
            (self.forward_pd, "dst", self.dst),
            (self.data_pd, "diff_src", self.src),
            (self.data_pd, "diff_dst", self.dst),
            (self.weights_pd, "src", self.src),
            (self.weights_pd, "diff_dst", self.dst),
        ):
            if lib.dnnl_memory_desc_get_size(query(pd, what)) != lib.dnnl_memory_desc_get_size(mine):
                raise RuntimeError(f"oneDNN chose another layout for {what}.")
        self.forward_w, self.data_w, self.weights_dw = (
            query(self.forward_pd, "weights"),
            query(self.data_pd, "weights"),
            query(self.weights_pd, "diff_weights"),
        )
        self.forward, self.data, self.weights = (
            self._primitive(pd) for pd in (self.forward_pd, self.data_pd, self.weights_pd)
        )
        self.to_forward_w = self._reorder(self.user_w, self.forward_w)
        self.to_data_w = self._reorder(self.user_w, self.data_w)
        self.from_weights_dw = self._reorder(self.weights_dw, self.user_w)
        # Buffers for the kernel in oneDNN's layouts, reused across calls (under _LOCK).
        self.buffers = {
            name: np.empty(lib.dnnl_memory_desc_get_size(md) // 4 + 16, np.float32)
            for name, md in (("forward_w", self.forward_w), ("data_w", self.data_w), ("weights_dw", self.weights_dw))
        }

    @staticmethod
    def _primitive(pd):
        lib = _library()
        primitive = ctypes.c_void_p()
        _check(lib.dnnl_primitive_create(ctypes.byref(primitive), pd), "primitive")
        return primitive

    def _reorder(self, src, dst):
        lib, engine, _ = _runtime()
        pd = ctypes.c_void_p()
        _check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src, engine, dst, engine, None), "reorder")
        return self._primitive(pd)


def _memory(md, array: np.ndarray):
    lib, engine, _ = _runtime()
    memory = ctypes.c_void_p()
    _check(lib.dnnl_memory_create(ctypes.byref(memory), md, engine, ctypes.c_void_p(array.ctypes.data)), "memory")
    return memory


def _execute(primitive, args: dict) -> None:
    lib, _, stream = _runtime()
    memories = [(_ARG[name], _memory(md, array)) for name, (md, array) in args.items()]
    packed = (_Arg * len(memories))(*[_Arg(a, m) for a, m in memories])
    try:
        _check(lib.dnnl_primitive_execute(primitive, stream, len(memories), packed), "execute")
        _check(lib.dnnl_stream_wait(stream), "stream wait")
    finally:
        for _, memory in memories:
            lib.dnnl_memory_destroy(memory)


_GEOMETRIES: dict = {}


def _geometry(x_shape, w_shape, stride, padding, dilation) -> _Geometry:
    key = (tuple(x_shape), tuple(w_shape), tuple(stride), tuple(map(tuple, padding)), tuple(dilation))
    if key not in _GEOMETRIES:
        _GEOMETRIES[key] = _Geometry(*key)
    return _GEOMETRIES[key]


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def forward(x, w, *, stride, padding, dilation) -> np.ndarray:
    """``y`` of the convolution (no bias): ``x`` ``(N, *S, C)``, ``w`` ``(*K, C, O)``, float32."""
    x, w = _f32(x), _f32(w)
    with _LOCK:
        geo = _geometry(x.shape, w.shape, stride, padding, dilation)
        y = np.empty(geo.y_shape, np.float32)
        buf = geo.buffers["forward_w"]
        _execute(geo.to_forward_w, dict(from_=(geo.user_w, w), to=(geo.forward_w, buf)))
        _execute(geo.forward, dict(src=(geo.src, x), weights=(geo.forward_w, buf), dst=(geo.dst, y)))
    return y


def input_grad(w, g, *, x_shape, stride, padding, dilation) -> np.ndarray:
    """``dL/dx`` for the output gradient ``g`` (oneDNN's backward data)."""
    w, g = _f32(w), _f32(g)
    with _LOCK:
        geo = _geometry(x_shape, w.shape, stride, padding, dilation)
        dx = np.empty(geo.x_shape, np.float32)
        buf = geo.buffers["data_w"]
        _execute(geo.to_data_w, dict(from_=(geo.user_w, w), to=(geo.data_w, buf)))
        _execute(geo.data, dict(diff_src=(geo.src, dx), weights=(geo.data_w, buf), diff_dst=(geo.dst, g)))
    return dx


def kernel_grad(x, g, *, w_shape, stride, padding, dilation) -> np.ndarray:
    """``dL/dw`` for the output gradient ``g`` (oneDNN's backward weights)."""
    x, g = _f32(x), _f32(g)
    with _LOCK:
        geo = _geometry(x.shape, w_shape, stride, padding, dilation)
        dw = np.empty(geo.w_shape, np.float32)
        buf = geo.buffers["weights_dw"]
        _execute(geo.weights, dict(src=(geo.src, x), diff_weights=(geo.weights_dw, buf), diff_dst=(geo.dst, g)))
        _execute(geo.from_weights_dw, dict(from_=(geo.weights_dw, buf), to=(geo.user_w, dw)))
    return dw


def fits(ndim: int, groups: int) -> bool:
    """oneDNN's forms cover 1-3 spatial dimensions and one group (float32 on CPU is the planner's check)."""
    return 1 <= ndim <= 3 and groups == 1
