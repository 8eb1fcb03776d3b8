// jaxconv's oneDNN convolution kernels as XLA FFI handlers (jax.ffi): the "onednn" conv forms.
//
// Three handlers, one per formula of the convolution rule (docs/convolution.md):
//   jaxconv_onednn_forward       y  = x * w           (forward, §1)
//   jaxconv_onednn_input_grad    dx from (w, dy)      (backward data, §5.3)
//   jaxconv_onednn_kernel_grad   dw from (x, dy)      (backward weights, §5.4)
// for 1-3 spatial dimensions, any stride, padding, dilation and group count, float32 and bfloat16,
// on jaxconv's own layouts: activations (N, *S, C), kernels (*K, C/G, O), given to oneDNN by strides.
//
// oneDNN is not linked: the library is opened at run time (dlopen of the path jaxconv passes to
// jaxconv_onednn_open) and the few functions of its C API used here are declared below, from its
// stable 3.x ABI; jaxconv_onednn_open refuses a library whose dnnl_version() is not 3.x.  So this
// file builds with a C++17 compiler and XLA's FFI headers alone (jax.ffi.include_dir()), and the
// extension loads and reports "no oneDNN" cleanly where the library is missing.
//
// Primitives are cached by geometry in a bounded LRU cache (jaxconv_onednn_set_cache_size); an evicted
// entry is freed when the last call using it returns (shared_ptr).  The cache's lock is held only to
// look up or insert; primitives run outside it, concurrently: they are created with a user-managed
// scratchpad, so each call brings its own (thread-local) scratchpad and stream, which oneDNN documents
// as thread-safe.
//
// Batching (jax.vmap; the Python side asks ffi_call for vmap_method="expand_dims"): operands may carry
// extra leading dimensions, size 1 where unbatched.  Unbatched kernels: the vmapped images are folded
// into one batch of N * B images (one primitive call, no copy).  Batched kernels: one call per
// instance, reusing the one cached primitive.

#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// --- the subset of oneDNN's C API (oneapi/dnnl/dnnl.h, dnnl_types.h; oneDNN 3.x) -------------------

using dnnl_status_t = int;
using dnnl_dim_t = int64_t;
constexpr int kMaxDims = 12;  // DNNL_MAX_NDIMS
using dnnl_dims_t = dnnl_dim_t[kMaxDims];
using handle = void*;  // dnnl_engine_t, dnnl_stream_t, dnnl_primitive_t, ... are opaque pointers

constexpr dnnl_status_t kSuccess = 0;
constexpr int kF32 = 3, kBF16 = 2;     // dnnl_data_type_t
constexpr int kFormatAny = 1;          // dnnl_format_tag_any
constexpr int kCpu = 1;                // dnnl_cpu
constexpr unsigned kInOrder = 1;       // dnnl_stream_in_order
constexpr int kForwardTraining = 64;   // dnnl_forward_training
constexpr int kConvolutionDirect = 1;  // dnnl_convolution_direct
constexpr int kScratchpadUser = 1;     // dnnl_scratchpad_mode_user
// dnnl_query_t: memory descriptors of a primitive descriptor.
constexpr int kQuerySrc = 129, kQueryDiffSrc = 130, kQueryWeights = 131, kQueryDiffWeights = 132,
              kQueryDst = 133, kQueryDiffDst = 134, kQueryScratchpad = 136;
// DNNL_ARG_*: execution arguments.
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80, kArgDiffSrc = 129,
              kArgDiffDst = 145, kArgDiffWeights = 161, kArgFrom = 1, kArgTo = 17;

struct ExecArg {  // dnnl_exec_arg_t
  int arg;
  handle memory;
};

struct Version {  // dnnl_version_t
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};

struct Api {
  const Version* (*version)();
  dnnl_status_t (*engine_create)(handle*, int, size_t);
  dnnl_status_t (*stream_create)(handle*, handle, unsigned);
  dnnl_status_t (*stream_destroy)(handle);
  dnnl_status_t (*stream_wait)(handle);
  dnnl_status_t (*memory_desc_create_with_strides)(handle*, int, const dnnl_dims_t, int, const dnnl_dims_t);
  dnnl_status_t (*memory_desc_create_with_tag)(handle*, int, const dnnl_dims_t, int, int);
  dnnl_status_t (*memory_desc_destroy)(handle);
  size_t (*memory_desc_get_size)(handle);
  int (*memory_desc_equal)(handle, handle);
  dnnl_status_t (*memory_create)(handle*, handle, handle, void*);
  dnnl_status_t (*memory_destroy)(handle);
  dnnl_status_t (*primitive_attr_create)(handle*);
  dnnl_status_t (*primitive_attr_destroy)(handle);
  dnnl_status_t (*primitive_attr_set_scratchpad_mode)(handle, int);
  dnnl_status_t (*convolution_forward_primitive_desc_create)(handle*, handle, int, int, handle, handle, handle, handle,
                                                             const dnnl_dims_t, const dnnl_dims_t, const dnnl_dims_t,
                                                             const dnnl_dims_t, handle);
  dnnl_status_t (*convolution_backward_data_primitive_desc_create)(handle*, handle, int, handle, handle, handle,
                                                                   const dnnl_dims_t, const dnnl_dims_t,
                                                                   const dnnl_dims_t, const dnnl_dims_t, handle,
                                                                   handle);
  dnnl_status_t (*convolution_backward_weights_primitive_desc_create)(handle*, handle, int, handle, handle, handle,
                                                                      handle, const dnnl_dims_t, const dnnl_dims_t,
                                                                      const dnnl_dims_t, const dnnl_dims_t, handle,
                                                                      handle);
  dnnl_status_t (*reorder_primitive_desc_create)(handle*, handle, handle, handle, handle, handle);
  handle (*primitive_desc_query_md)(handle, int, int);
  dnnl_status_t (*primitive_desc_destroy)(handle);
  dnnl_status_t (*primitive_create)(handle*, handle);
  dnnl_status_t (*primitive_execute)(handle, handle, int, const ExecArg*);
  dnnl_status_t (*primitive_destroy)(handle);
};

Api api;
handle engine = nullptr;
void* library = nullptr;
std::string open_error = "jaxconv_onednn_open was not called";
Version version{0, 0, 0, nullptr, 0, 0};

template <typename F>
bool Bind(F*& slot, const char* name, std::string* error) {
  slot = reinterpret_cast<F*>(dlsym(library, name));
  if (slot == nullptr) *error = std::string("the library has no ") + name;
  return slot != nullptr;
}

std::string OpenLibrary(const char* path) {
  library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    return std::string("cannot open ") + path + ": " + (why ? why : "unknown error");
  }
  std::string error;
  bool ok = Bind(api.version, "dnnl_version", &error);
  if (!ok) return error;
  version = *api.version();
  if (version.major != 3) {
    return "oneDNN " + std::to_string(version.major) + "." + std::to_string(version.minor) +
           " is not supported (this handler is built for oneDNN 3.x)";
  }
  ok = Bind(api.engine_create, "dnnl_engine_create", &error) &&
       Bind(api.stream_create, "dnnl_stream_create", &error) &&
       Bind(api.stream_destroy, "dnnl_stream_destroy", &error) &&
       Bind(api.stream_wait, "dnnl_stream_wait", &error) &&
       Bind(api.memory_desc_create_with_strides, "dnnl_memory_desc_create_with_strides", &error) &&
       Bind(api.memory_desc_create_with_tag, "dnnl_memory_desc_create_with_tag", &error) &&
       Bind(api.memory_desc_destroy, "dnnl_memory_desc_destroy", &error) &&
       Bind(api.memory_desc_get_size, "dnnl_memory_desc_get_size", &error) &&
       Bind(api.memory_desc_equal, "dnnl_memory_desc_equal", &error) &&
       Bind(api.memory_create, "dnnl_memory_create", &error) &&
       Bind(api.memory_destroy, "dnnl_memory_destroy", &error) &&
       Bind(api.primitive_attr_create, "dnnl_primitive_attr_create", &error) &&
       Bind(api.primitive_attr_destroy, "dnnl_primitive_attr_destroy", &error) &&
       Bind(api.primitive_attr_set_scratchpad_mode, "dnnl_primitive_attr_set_scratchpad_mode", &error) &&
       Bind(api.convolution_forward_primitive_desc_create, "dnnl_convolution_forward_primitive_desc_create",
            &error) &&
       Bind(api.convolution_backward_data_primitive_desc_create,
            "dnnl_convolution_backward_data_primitive_desc_create", &error) &&
       Bind(api.convolution_backward_weights_primitive_desc_create,
            "dnnl_convolution_backward_weights_primitive_desc_create", &error) &&
       Bind(api.reorder_primitive_desc_create, "dnnl_reorder_primitive_desc_create", &error) &&
       Bind(api.primitive_desc_query_md, "dnnl_primitive_desc_query_md", &error) &&
       Bind(api.primitive_desc_destroy, "dnnl_primitive_desc_destroy", &error) &&
       Bind(api.primitive_create, "dnnl_primitive_create", &error) &&
       Bind(api.primitive_execute, "dnnl_primitive_execute", &error) &&
       Bind(api.primitive_destroy, "dnnl_primitive_destroy", &error);
  if (!ok) return error;
  if (api.engine_create(&engine, kCpu, 0) != kSuccess) return "dnnl_engine_create failed";
  return "";
}

// --- small RAII holders ----------------------------------------------------------------------------

struct MemoryDesc {
  handle md = nullptr;
  MemoryDesc() = default;
  MemoryDesc(const MemoryDesc&) = delete;
  MemoryDesc& operator=(const MemoryDesc&) = delete;
  ~MemoryDesc() {
    if (md) api.memory_desc_destroy(md);
  }
};

struct Primitive {
  handle pd = nullptr, primitive = nullptr;
  Primitive() = default;
  Primitive(const Primitive&) = delete;
  Primitive& operator=(const Primitive&) = delete;
  ~Primitive() {
    if (primitive) api.primitive_destroy(primitive);
    if (pd) api.primitive_desc_destroy(pd);
  }
};

struct Attr {
  handle attr = nullptr;
  Attr() {
    if (api.primitive_attr_create(&attr) == kSuccess) api.primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  }
  ~Attr() {
    if (attr) api.primitive_attr_destroy(attr);
  }
};

struct Memory {
  handle memory = nullptr;
  Memory(handle md, void* data) {
    if (api.memory_create(&memory, md, engine, data) != kSuccess) memory = nullptr;
  }
  ~Memory() {
    if (memory) api.memory_destroy(memory);
  }
};

// One stream per thread (oneDNN's streams are not thread-safe; its engine and primitives are).
struct Stream {
  handle stream = nullptr;
  Stream() { api.stream_create(&stream, engine, kInOrder); }
  ~Stream() {
    if (stream) api.stream_destroy(stream);
  }
};

handle ThreadStream() {
  thread_local Stream stream;
  return stream.stream;
}

// Thread-local scratch buffers, grown as needed, 64-byte aligned.
struct Scratch {
  std::unique_ptr<char[]> owned;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes + 64 > size) {
      size = bytes + 64;
      owned.reset(new char[size]);
    }
    auto p = reinterpret_cast<uintptr_t>(owned.get());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }
};

// --- geometry -------------------------------------------------------------------------------------

enum class Kind : int { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

struct Geometry {
  Kind kind;
  int dtype;
  int nd;  // spatial dimensions
  int64_t n, c, o, groups;
  int64_t in[3], out[3], kernel[3], stride[3], dilation[3], pad_lo[3], pad_hi[3];

  std::string Key() const {
    std::string key(reinterpret_cast<const char*>(this), sizeof(*this));
    return key;
  }
};

// Row-major strides of `sizes` in front of a contiguous block of `inner` elements.
void OuterStrides(const int64_t* sizes, int count, int64_t inner, int64_t* out) {
  int64_t s = inner;
  for (int i = count - 1; i >= 0; --i) {
    out[i] = s;
    s *= sizes[i];
  }
}

// (N, C, *S) logical dims stored as (N, *S, C).
std::string ChannelsLast(MemoryDesc& md, int dtype, int64_t n, int64_t c, const int64_t* spatial, int nd) {
  dnnl_dims_t dims{}, strides{};
  dims[0] = n;
  dims[1] = c;
  int64_t volume = 1;
  for (int i = 0; i < nd; ++i) {
    dims[2 + i] = spatial[i];
    volume *= spatial[i];
  }
  strides[0] = volume * c;
  strides[1] = 1;
  OuterStrides(spatial, nd, c, strides + 2);
  if (api.memory_desc_create_with_strides(&md.md, nd + 2, dims, dtype, strides) != kSuccess)
    return "cannot describe an activation layout";
  return "";
}

// The kernel as jaxconv stores it, (*K, C/G, O), described for oneDNN: (O, C, *K) with one group,
// else (G, O/G, C/G, *K).
std::string KernelLayout(MemoryDesc& md, const Geometry& g, bool any) {
  dnnl_dims_t dims{}, strides{};
  int64_t cg = g.c / g.groups, og = g.o / g.groups;
  int lead = g.groups == 1 ? 2 : 3;
  if (g.groups == 1) {
    dims[0] = g.o;
    dims[1] = g.c;
    strides[0] = 1;
    strides[1] = g.o;
  } else {
    dims[0] = g.groups;
    dims[1] = og;
    dims[2] = cg;
    strides[0] = og;
    strides[1] = 1;
    strides[2] = g.o;
  }
  for (int i = 0; i < g.nd; ++i) dims[lead + i] = g.kernel[i];
  OuterStrides(g.kernel, g.nd, cg * g.o, strides + lead);
  dnnl_status_t status = any ? api.memory_desc_create_with_tag(&md.md, lead + g.nd, dims, g.dtype, kFormatAny)
                             : api.memory_desc_create_with_strides(&md.md, lead + g.nd, dims, g.dtype, strides);
  return status == kSuccess ? "" : "cannot describe the kernel layout";
}

// The cached primitives of one geometry: the convolution, and the kernel's reorder between jaxconv's
// layout and the one oneDNN chose (none when they are equal).
struct Entry {
  MemoryDesc src, dst, user_w, any_w;
  Primitive conv, reorder;
  handle chosen_w = nullptr;  // owned by conv.pd
  size_t scratchpad = 0, chosen_w_bytes = 0;
  bool needs_reorder = false;
};

std::string Check(dnnl_status_t status, const char* what) {
  return status == kSuccess ? "" : std::string(what) + " failed (oneDNN status " + std::to_string(status) + ")";
}

std::string Build(const Geometry& g, Entry& e) {
  std::string err;
  if (!(err = ChannelsLast(e.src, g.dtype, g.n, g.c, g.in, g.nd)).empty()) return err;
  if (!(err = ChannelsLast(e.dst, g.dtype, g.n, g.o, g.out, g.nd)).empty()) return err;
  if (!(err = KernelLayout(e.user_w, g, false)).empty()) return err;
  if (!(err = KernelLayout(e.any_w, g, true)).empty()) return err;
  dnnl_dims_t stride{}, dilation{}, lo{}, hi{};
  for (int i = 0; i < g.nd; ++i) {
    stride[i] = g.stride[i];
    dilation[i] = g.dilation[i] - 1;  // oneDNN counts the zeros between taps
    lo[i] = g.pad_lo[i];
    hi[i] = g.pad_hi[i];
  }
  Attr attr;
  Primitive hint;  // backward primitives are described with the forward's as a hint
  if (g.kind != Kind::kForward) {
    Attr plain;
    if (!(err = Check(api.convolution_forward_primitive_desc_create(&hint.pd, engine, kForwardTraining,
                                                                    kConvolutionDirect, e.src.md, e.any_w.md,
                                                                    nullptr, e.dst.md, stride, dilation, lo, hi,
                                                                    plain.attr),
                      "the forward primitive descriptor"))
             .empty())
      return err;
  }
  dnnl_status_t status;
  int w_query = kQueryWeights, src_query = kQuerySrc, dst_query = kQueryDst;
  switch (g.kind) {
    case Kind::kForward:
      status = api.convolution_forward_primitive_desc_create(&e.conv.pd, engine, kForwardTraining,
                                                             kConvolutionDirect, e.src.md, e.any_w.md, nullptr,
                                                             e.dst.md, stride, dilation, lo, hi, attr.attr);
      break;
    case Kind::kInputGrad:
      status = api.convolution_backward_data_primitive_desc_create(&e.conv.pd, engine, kConvolutionDirect,
                                                                   e.src.md, e.any_w.md, e.dst.md, stride,
                                                                   dilation, lo, hi, hint.pd, attr.attr);
      src_query = kQueryDiffSrc;
      dst_query = kQueryDiffDst;
      break;
    default:
      status = api.convolution_backward_weights_primitive_desc_create(&e.conv.pd, engine, kConvolutionDirect,
                                                                      e.src.md, e.any_w.md, nullptr, e.dst.md,
                                                                      stride, dilation, lo, hi, hint.pd, attr.attr);
      w_query = kQueryDiffWeights;
      dst_query = kQueryDiffDst;
  }
  if (status != kSuccess) {
    return "oneDNN has no convolution kernel for this geometry and data type on this CPU (status " +
           std::to_string(status) + ")";
  }
  // The activations must stay in our layout: oneDNN may not have chosen another for them.
  if (!api.memory_desc_equal(api.primitive_desc_query_md(e.conv.pd, src_query, 0), e.src.md) ||
      !api.memory_desc_equal(api.primitive_desc_query_md(e.conv.pd, dst_query, 0), e.dst.md))
    return "oneDNN chose another layout for the activations";
  e.chosen_w = api.primitive_desc_query_md(e.conv.pd, w_query, 0);
  e.chosen_w_bytes = api.memory_desc_get_size(e.chosen_w);
  handle scratch = api.primitive_desc_query_md(e.conv.pd, kQueryScratchpad, 0);
  e.scratchpad = scratch ? api.memory_desc_get_size(scratch) : 0;
  if (!(err = Check(api.primitive_create(&e.conv.primitive, e.conv.pd), "creating the convolution")).empty())
    return err;
  e.needs_reorder = !api.memory_desc_equal(e.chosen_w, e.user_w.md);
  if (e.needs_reorder) {
    handle from = g.kind == Kind::kKernelGrad ? e.chosen_w : e.user_w.md;
    handle to = g.kind == Kind::kKernelGrad ? e.user_w.md : e.chosen_w;
    if (!(err = Check(api.reorder_primitive_desc_create(&e.reorder.pd, from, engine, to, engine, nullptr),
                      "the kernel reorder descriptor"))
             .empty())
      return err;
    if (!(err = Check(api.primitive_create(&e.reorder.primitive, e.reorder.pd), "creating the kernel reorder"))
             .empty())
      return err;
  }
  return "";
}

// --- the bounded LRU cache --------------------------------------------------------------------------

class Cache {
 public:
  std::shared_ptr<Entry> Get(const Geometry& g, std::string* error) {
    std::string key = g.Key();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = index_.find(key);
      if (found != index_.end()) {
        order_.splice(order_.begin(), order_, found->second);
        hits_++;
        return found->second->second;
      }
    }
    auto entry = std::make_shared<Entry>();  // built outside the lock: other geometries go on meanwhile
    *error = Build(g, *entry);
    if (!error->empty()) return nullptr;
    std::lock_guard<std::mutex> lock(mutex_);
    misses_++;
    auto found = index_.find(key);
    if (found != index_.end()) return found->second->second;  // another thread built it first
    order_.emplace_front(key, entry);
    index_[key] = order_.begin();
    Trim();
    return entry;
  }

  void SetCapacity(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_ = capacity;
    Trim();
  }

  void Stats(int64_t* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = static_cast<int64_t>(order_.size());
    out[1] = static_cast<int64_t>(capacity_);
    out[2] = hits_;
    out[3] = misses_;
  }

  void Clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    order_.clear();
    index_.clear();
  }

 private:
  void Trim() {
    while (order_.size() > capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();  // freed now, or when the last call holding it returns
    }
  }

  std::mutex mutex_;
  std::list<std::pair<std::string, std::shared_ptr<Entry>>> order_;
  std::unordered_map<std::string, std::list<std::pair<std::string, std::shared_ptr<Entry>>>::iterator> index_;
  size_t capacity_ = 256;
  int64_t hits_ = 0, misses_ = 0;
};

Cache& TheCache() {
  static Cache* cache = new Cache();  // never destroyed: handlers may run while the process exits
  return *cache;
}

// --- the handlers -----------------------------------------------------------------------------------

int DnnlType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return kF32;
    case ffi::DataType::BF16:
      return kBF16;
    default:
      return 0;
  }
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxconv oneDNN: " + message);
}

ffi::Error Internal(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kInternal, "jaxconv oneDNN: " + message);
}

// Leading (vmap) dimensions of a buffer of `core` trailing dimensions: their product.
bool Leading(const ffi::AnyBuffer& buffer, int core, int64_t* count) {
  auto dims = buffer.dimensions();
  if (static_cast<int>(dims.size()) < core) return false;
  *count = 1;
  for (size_t i = 0; i + core < dims.size(); ++i) *count *= dims[i];
  return true;
}

int64_t Dim(const ffi::AnyBuffer& buffer, int from_end) {
  auto dims = buffer.dimensions();
  return dims[dims.size() - from_end];
}

// Reads the geometry from the attributes and the buffers: `act` is an activation operand (N, *S, C) or
// (N, *S', O), `kernel_dims` the kernel's (*K, C/G, O) (from the kernel operand or result).
ffi::Error MakeGeometry(Kind kind, ffi::DataType type, ffi::Span<const int64_t> stride,
                        ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo,
                        ffi::Span<const int64_t> pad_hi, int64_t groups, Geometry* g) {
  std::memset(g, 0, sizeof(*g));  // the key is the struct's bytes: no stray padding
  g->kind = kind;
  g->dtype = DnnlType(type);
  if (g->dtype == 0) return Invalid("only float32 and bfloat16 are supported");
  int nd = static_cast<int>(stride.size());
  if (nd < 1 || nd > 3 || dilation.size() != stride.size() || pad_lo.size() != stride.size() ||
      pad_hi.size() != stride.size())
    return Invalid("stride, dilation and padding must name 1 to 3 spatial dimensions alike");
  if (groups < 1) return Invalid("groups must be positive");
  g->nd = nd;
  g->groups = groups;
  for (int i = 0; i < nd; ++i) {
    if (stride[i] < 1 || dilation[i] < 1) return Invalid("stride and dilation must be positive");
    g->stride[i] = stride[i];
    g->dilation[i] = dilation[i];
    g->pad_lo[i] = pad_lo[i];
    g->pad_hi[i] = pad_hi[i];
  }
  return ffi::Error::Success();
}

ffi::Error FillShapes(Geometry* g, const ffi::AnyBuffer& x_like, const ffi::AnyBuffer& y_like,
                      const ffi::AnyBuffer& w_like, int64_t batch) {
  int nd = g->nd;
  g->n = batch;
  g->c = Dim(x_like, 1);
  g->o = Dim(w_like, 1);
  if (Dim(y_like, 1) != g->o) return Invalid("the output's channels differ from the kernel's");
  if (Dim(w_like, 2) * g->groups != g->c) return Invalid("the kernel's input channels times groups differ from C");
  if (g->o % g->groups != 0) return Invalid("the output channels are not a multiple of groups");
  for (int i = 0; i < nd; ++i) {
    g->in[i] = Dim(x_like, nd + 1 - i);
    g->out[i] = Dim(y_like, nd + 1 - i);
    g->kernel[i] = Dim(w_like, nd + 2 - i);
    int64_t span = g->dilation[i] * (g->kernel[i] - 1) + 1;
    int64_t expect = (g->in[i] + g->pad_lo[i] + g->pad_hi[i] - span) / g->stride[i] + 1;
    if (g->in[i] + g->pad_lo[i] + g->pad_hi[i] < span || expect != g->out[i])
      return Invalid("the output's spatial size does not follow from the input, kernel, stride and padding");
  }
  return ffi::Error::Success();
}

struct Run {
  std::shared_ptr<Entry> entry;
  size_t elem;
};

void* Align64(void* p) {
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// Bytes of workspace a geometry's call uses: the primitive's scratchpad and the kernel in oneDNN's layout,
// each 64-byte aligned.  XLA allocates it as the custom call's second result (so it counts in the
// program's memory); a call given less (a vmapped call on a folded batch may need more than the
// unbatched geometry it was sized for) uses thread-local buffers instead.
size_t WorkspaceBytes(const Entry& e) { return 64 + e.scratchpad + 64 + (e.needs_reorder ? e.chosen_w_bytes : 0) + 64; }

// Executes `entry` on one instance: src `x`, kernel `w` and dst `y` (for the backward kinds: the diff_src,
// diff_weights and diff_dst buffers), with `workspace` of `workspace_bytes`.
std::string Execute(Kind kind, Entry& e, void* x, void* w, void* y, void* workspace, size_t workspace_bytes) {
  thread_local Scratch scratchpad, kernel;
  handle stream = ThreadStream();
  if (stream == nullptr) return "cannot create a oneDNN stream";
  void *scratch, *chosen;
  if (workspace != nullptr && workspace_bytes >= WorkspaceBytes(e)) {
    scratch = Align64(workspace);
    chosen = e.needs_reorder ? Align64(static_cast<char*>(scratch) + e.scratchpad) : w;
  } else {
    scratch = e.scratchpad ? scratchpad.Get(e.scratchpad) : nullptr;
    chosen = e.needs_reorder ? kernel.Get(e.chosen_w_bytes) : w;
  }
  Memory user_w(e.user_w.md, w), chosen_w(e.chosen_w, chosen), src(e.src.md, x), dst(e.dst.md, y);
  std::unique_ptr<Memory> pad;
  handle scratch_md = e.scratchpad ? api.primitive_desc_query_md(e.conv.pd, kQueryScratchpad, 0) : nullptr;
  if (scratch_md) pad = std::make_unique<Memory>(scratch_md, scratch);
  if (!user_w.memory || !chosen_w.memory || !src.memory || !dst.memory || (scratch_md && !pad->memory))
    return "cannot create oneDNN memory objects";
  std::string err;
  if (kind != Kind::kKernelGrad && e.needs_reorder) {
    ExecArg args[] = {{kArgFrom, user_w.memory}, {kArgTo, chosen_w.memory}};
    if (!(err = Check(api.primitive_execute(e.reorder.primitive, stream, 2, args), "the kernel reorder")).empty())
      return err;
  }
  int w_arg = kind == Kind::kKernelGrad ? kArgDiffWeights : kArgWeights;
  int src_arg = kind == Kind::kInputGrad ? kArgDiffSrc : kArgSrc;
  int dst_arg = kind == Kind::kForward ? kArgDst : kArgDiffDst;
  ExecArg args[4] = {{src_arg, src.memory}, {w_arg, chosen_w.memory}, {dst_arg, dst.memory}, {0, nullptr}};
  int count = 3;
  if (scratch_md) args[count++] = {kArgScratchpad, pad->memory};
  if (!(err = Check(api.primitive_execute(e.conv.primitive, stream, count, args), "the convolution")).empty())
    return err;
  if (kind == Kind::kKernelGrad && e.needs_reorder) {
    ExecArg back[] = {{kArgFrom, chosen_w.memory}, {kArgTo, user_w.memory}};
    if (!(err = Check(api.primitive_execute(e.reorder.primitive, stream, 2, back), "the kernel reorder")).empty())
      return err;
  }
  return Check(api.stream_wait(stream), "waiting for the stream");
}

ffi::Error Ready() {
  if (engine == nullptr) return Internal("the oneDNN library is not open: " + open_error);
  return ffi::Error::Success();
}

// y = conv(x, w).  x (B?, N, *S, C), w (B?, *K, C/G, O), y (B?, N, *S', O).
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> workspace, ffi::Span<const int64_t> stride,
                   ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi, int64_t groups) {
  if (auto e = Ready(); e.failure()) return e;
  Geometry g;
  if (auto e = MakeGeometry(Kind::kForward, x.element_type(), stride, dilation, pad_lo, pad_hi, groups, &g);
      e.failure())
    return e;
  if (w.element_type() != x.element_type() || y->element_type() != x.element_type())
    return Invalid("x, w and y must have one data type");
  int64_t bx, bw, by;
  if (!Leading(x, g.nd + 2, &bx) || !Leading(w, g.nd + 2, &bw) || !Leading(*y, g.nd + 2, &by))
    return Invalid("an operand has too few dimensions");
  int64_t n = Dim(x, g.nd + 2);
  bool fold = bw == 1;  // unbatched kernel: every vmapped image in one batch
  if (auto e = FillShapes(&g, x, *y, w, fold ? n * bx : n); e.failure()) return e;
  std::string error;
  auto entry = TheCache().Get(g, &error);
  if (!entry) return Internal(error);
  if (fold) {
    if (bx != by) return Invalid("x and y batch differently");
    error = Execute(g.kind, *entry, x.untyped_data(), w.untyped_data(), y->untyped_data(),
                    workspace->untyped_data(), workspace->size_bytes());
    return error.empty() ? ffi::Error::Success() : Internal(error);
  }
  size_t xs = x.size_bytes() / bx, ws = w.size_bytes() / bw, ys = y->size_bytes() / by;
  for (int64_t i = 0; i < by; ++i) {
    error = Execute(g.kind, *entry, static_cast<char*>(x.untyped_data()) + (bx == 1 ? 0 : i * xs),
                    static_cast<char*>(w.untyped_data()) + i * ws, static_cast<char*>(y->untyped_data()) + i * ys,
                    workspace->untyped_data(), workspace->size_bytes() / by);
    if (!error.empty()) return Internal(error);
  }
  return ffi::Error::Success();
}

// dx from (w, dy).  w (B?, *K, C/G, O), dy (B?, N, *S', O), dx (B?, N, *S, C).
ffi::Error InputGrad(ffi::AnyBuffer w, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                     ffi::Result<ffi::AnyBuffer> workspace, ffi::Span<const int64_t> stride, ffi::Span<const int64_t> dilation,
                     ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi, int64_t groups) {
  if (auto e = Ready(); e.failure()) return e;
  Geometry g;
  if (auto e = MakeGeometry(Kind::kInputGrad, dy.element_type(), stride, dilation, pad_lo, pad_hi, groups, &g);
      e.failure())
    return e;
  if (w.element_type() != dy.element_type() || dx->element_type() != dy.element_type())
    return Invalid("w, dy and dx must have one data type");
  int64_t bw, bg, bx;
  if (!Leading(w, g.nd + 2, &bw) || !Leading(dy, g.nd + 2, &bg) || !Leading(*dx, g.nd + 2, &bx))
    return Invalid("an operand has too few dimensions");
  int64_t n = Dim(dy, g.nd + 2);
  bool fold = bw == 1;
  if (auto e = FillShapes(&g, *dx, dy, w, fold ? n * bg : n); e.failure()) return e;
  std::string error;
  auto entry = TheCache().Get(g, &error);
  if (!entry) return Internal(error);
  if (fold) {
    if (bg != bx) return Invalid("dy and dx batch differently");
    error = Execute(g.kind, *entry, dx->untyped_data(), w.untyped_data(), dy.untyped_data(),
                    workspace->untyped_data(), workspace->size_bytes());
    return error.empty() ? ffi::Error::Success() : Internal(error);
  }
  size_t ws = w.size_bytes() / bw, gs = dy.size_bytes() / bg, xs = dx->size_bytes() / bx;
  for (int64_t i = 0; i < bx; ++i) {
    error = Execute(g.kind, *entry, static_cast<char*>(dx->untyped_data()) + i * xs,
                    static_cast<char*>(w.untyped_data()) + i * ws,
                    static_cast<char*>(dy.untyped_data()) + (bg == 1 ? 0 : i * gs), workspace->untyped_data(),
                    workspace->size_bytes() / bx);
    if (!error.empty()) return Internal(error);
  }
  return ffi::Error::Success();
}

// dw from (x, dy).  x (B?, N, *S, C), dy (B?, N, *S', O), dw (B?, *K, C/G, O); a batched dw is one
// kernel gradient per vmapped instance, so the instances run one by one on the one primitive.
ffi::Error KernelGrad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                      ffi::Result<ffi::AnyBuffer> workspace, ffi::Span<const int64_t> stride, ffi::Span<const int64_t> dilation,
                      ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi, int64_t groups) {
  if (auto e = Ready(); e.failure()) return e;
  Geometry g;
  if (auto e = MakeGeometry(Kind::kKernelGrad, x.element_type(), stride, dilation, pad_lo, pad_hi, groups, &g);
      e.failure())
    return e;
  if (dy.element_type() != x.element_type() || dw->element_type() != x.element_type())
    return Invalid("x, dy and dw must have one data type");
  int64_t bx, bg, bw;
  if (!Leading(x, g.nd + 2, &bx) || !Leading(dy, g.nd + 2, &bg) || !Leading(*dw, g.nd + 2, &bw))
    return Invalid("an operand has too few dimensions");
  if (auto e = FillShapes(&g, x, dy, *dw, Dim(x, g.nd + 2)); e.failure()) return e;
  std::string error;
  auto entry = TheCache().Get(g, &error);
  if (!entry) return Internal(error);
  size_t xs = x.size_bytes() / bx, gs = dy.size_bytes() / bg, ws = dw->size_bytes() / bw;
  for (int64_t i = 0; i < bw; ++i) {
    error = Execute(g.kind, *entry, static_cast<char*>(x.untyped_data()) + (bx == 1 ? 0 : i * xs),
                    static_cast<char*>(dw->untyped_data()) + i * ws,
                    static_cast<char*>(dy.untyped_data()) + (bg == 1 ? 0 : i * gs), workspace->untyped_data(),
                    workspace->size_bytes() / bw);
    if (!error.empty()) return Internal(error);
  }
  return ffi::Error::Success();
}

}  // namespace

#define JAXCONV_EXPORT extern "C" __attribute__((visibility("default")))

#define JAXCONV_GEOMETRY_ATTRS                     \
  .Attr<ffi::Span<const int64_t>>("stride")        \
      .Attr<ffi::Span<const int64_t>>("dilation")  \
      .Attr<ffi::Span<const int64_t>>("pad_lo")    \
      .Attr<ffi::Span<const int64_t>>("pad_hi")    \
      .Attr<int64_t>("groups")

// The handlers' symbols are exported (the file is built with -fvisibility=hidden).
JAXCONV_EXPORT XLA_FFI_Error* jaxconv_onednn_forward(XLA_FFI_CallFrame* call_frame);
JAXCONV_EXPORT XLA_FFI_Error* jaxconv_onednn_input_grad(XLA_FFI_CallFrame* call_frame);
JAXCONV_EXPORT XLA_FFI_Error* jaxconv_onednn_kernel_grad(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxconv_onednn_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JAXCONV_GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxconv_onednn_input_grad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JAXCONV_GEOMETRY_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxconv_onednn_kernel_grad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() JAXCONV_GEOMETRY_ATTRS);

// Opens the oneDNN library at `path` (once per process; later calls report the first outcome).
// Returns 0 on success; otherwise copies the reason into `error` (at most `size` bytes with its NUL).
JAXCONV_EXPORT int jaxconv_onednn_open(const char* path, char* error, size_t size) {
  static std::mutex mutex;
  static bool tried = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (!tried) {
    tried = true;
    open_error = OpenLibrary(path);
    if (!open_error.empty()) engine = nullptr;
  }
  if (open_error.empty()) return 0;
  std::snprintf(error, size, "%s", open_error.c_str());
  return 1;
}

// The opened library's version: {major, minor, patch}; zeros before a successful open.
JAXCONV_EXPORT void jaxconv_onednn_version(int* out) {
  out[0] = version.major;
  out[1] = version.minor;
  out[2] = version.patch;
}

// The primitive cache: at most `capacity` geometries are kept (least recently used evicted first).
JAXCONV_EXPORT void jaxconv_onednn_set_cache_size(int64_t capacity) {
  TheCache().SetCapacity(capacity < 0 ? 0 : static_cast<size_t>(capacity));
}

// {entries, capacity, hits, misses}.
JAXCONV_EXPORT void jaxconv_onednn_cache_stats(int64_t* out) { TheCache().Stats(out); }

JAXCONV_EXPORT void jaxconv_onednn_cache_clear() { TheCache().Clear(); }

// Whether oneDNN has kernels for all three formulas in this data type (0: float32, 1: bfloat16) on this
// CPU: builds (and caches) a small 2-D geometry of each kind.  Returns 0 if so; else copies the reason.
JAXCONV_EXPORT int jaxconv_onednn_probe(int bfloat16, char* error, size_t size) {
  if (engine == nullptr) {
    std::snprintf(error, size, "%s", open_error.c_str());
    return 1;
  }
  for (Kind kind : {Kind::kForward, Kind::kInputGrad, Kind::kKernelGrad}) {
    Geometry g;
    std::memset(&g, 0, sizeof(g));
    g.kind = kind;
    g.dtype = bfloat16 ? kBF16 : kF32;
    g.nd = 2;
    g.n = 2;
    g.c = 16;
    g.o = 16;
    g.groups = 1;
    for (int i = 0; i < 2; ++i) {
      g.in[i] = 8;
      g.out[i] = 8;
      g.kernel[i] = 3;
      g.stride[i] = 1;
      g.dilation[i] = 1;
      g.pad_lo[i] = 1;
      g.pad_hi[i] = 1;
    }
    std::string why;
    if (!TheCache().Get(g, &why)) {
      std::snprintf(error, size, "%s", why.c_str());
      return 1;
    }
  }
  return 0;
}

// The workspace bytes (the second result of each custom call) for one geometry, packed as int64s:
// {kind (0 forward, 1 input grad, 2 kernel grad), bfloat16 (0/1), nd, n, c, o, groups, in[3], out[3],
// kernel[3], stride[3], dilation[3], pad_lo[3], pad_hi[3]}.  Builds (and caches) the primitive.
// Returns -1 and copies the reason where oneDNN has no kernel for it (the call then fails the same way).
JAXCONV_EXPORT int64_t jaxconv_onednn_workspace_bytes(const int64_t* packed, char* error, size_t size) {
  if (engine == nullptr) {
    std::snprintf(error, size, "%s", open_error.c_str());
    return -1;
  }
  Geometry g;
  std::memset(&g, 0, sizeof(g));
  g.kind = static_cast<Kind>(packed[0]);
  g.dtype = packed[1] ? kBF16 : kF32;
  g.nd = static_cast<int>(packed[2]);
  g.n = packed[3];
  g.c = packed[4];
  g.o = packed[5];
  g.groups = packed[6];
  if (g.nd < 1 || g.nd > 3 || packed[0] < 0 || packed[0] > 2) {
    std::snprintf(error, size, "bad geometry");
    return -1;
  }
  for (int i = 0; i < g.nd; ++i) {
    g.in[i] = packed[7 + i];
    g.out[i] = packed[10 + i];
    g.kernel[i] = packed[13 + i];
    g.stride[i] = packed[16 + i];
    g.dilation[i] = packed[19 + i];
    g.pad_lo[i] = packed[22 + i];
    g.pad_hi[i] = packed[25 + i];
  }
  std::string why;
  auto entry = TheCache().Get(g, &why);
  if (!entry) {
    std::snprintf(error, size, "%s", why.c_str());
    return -1;
  }
  return static_cast<int64_t>(WorkspaceBytes(*entry));
}
