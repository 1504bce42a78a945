// Dense 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers.
//
// Layouts are JAX's: NHWC activations and HWIO kernels, float32. Three handlers make a
// convolution and its two gradients:
//   JaxcnnConvForward(x, k) -> y
//   JaxcnnConvInputGradient(dy, k) -> dx
//   JaxcnnConvKernelGradient(x, dy) -> dk
// each with attributes strides (sh, sw), dilation (dh, dw) and pads (top, bottom, left, right).
// The Python side (onednn.py) builds this file once per machine and wires the three into a
// custom VJP.
//
// Activations stay in the caller's NHWC buffers. oneDNN picks the kernel's layout (its fastest
// kernels want a blocked one); the kernel, or its gradient, is reordered from or to HWIO on each
// call, which costs little next to the convolution. Primitives are built once per geometry and
// cached. Each call brings its own scratchpad, so calls from several of XLA's threads at once
// are safe.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// N H W C | KH KW O | OH OW | strides | dilation | pads (top, bottom, left, right)
using Geometry = std::array<int64_t, 17>;

struct Primitives {
  memory::desc src, weights, dst;  // the caller's layouts
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc input_gradient_pd;
  dnnl::convolution_backward_weights::primitive_desc kernel_gradient_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data input_gradient;
  dnnl::convolution_backward_weights kernel_gradient;
};

std::shared_ptr<const Primitives> Build(const Geometry& g) {
  const auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, dh, dw, top, bottom, left, right] = g;
  const auto f32 = memory::data_type::f32;
  memory::desc src({n, c, h, w}, f32, memory::format_tag::nhwc);
  memory::desc dst({n, o, oh, ow}, f32, memory::format_tag::nhwc);
  memory::desc weights({o, c, kh, kw}, f32, memory::format_tag::hwio);
  memory::desc any_weights({o, c, kh, kw}, f32, memory::format_tag::any);
  // oneDNN counts dilation from 0 (no gaps)
  memory::dims strides{sh, sw}, dilates{dh - 1, dw - 1}, pad_l{top, left}, pad_r{bottom, right};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc forward_pd(
      Engine(), dnnl::prop_kind::forward_training, algo, src, any_weights, dst, strides, dilates,
      pad_l, pad_r, attr);
  dnnl::convolution_backward_data::primitive_desc input_gradient_pd(
      Engine(), algo, src, any_weights, dst, strides, dilates, pad_l, pad_r, forward_pd, attr);
  dnnl::convolution_backward_weights::primitive_desc kernel_gradient_pd(
      Engine(), algo, src, any_weights, dst, strides, dilates, pad_l, pad_r, forward_pd, attr);
  return std::make_shared<const Primitives>(Primitives{
      src, weights, dst, forward_pd, input_gradient_pd, kernel_gradient_pd,
      dnnl::convolution_forward(forward_pd), dnnl::convolution_backward_data(input_gradient_pd),
      dnnl::convolution_backward_weights(kernel_gradient_pd)});
}

// Built primitives by geometry, at most kCached of them (a process that runs many models, such as
// a test suite, would otherwise keep every one); a caller holds its own reference, so eviction
// never pulls primitives from under a running call.
constexpr size_t kCached = 1024;

std::shared_ptr<const Primitives> PrimitivesFor(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, std::shared_ptr<const Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(g);
  if (found != cache.end()) return found->second;
  if (cache.size() >= kCached) cache.erase(cache.begin());
  return cache[g] = Build(g);
}

Geometry GeometryOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                    ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                    ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pads) {
  return {x[0],       x[1],       x[2],        x[3],        k[0],    k[1],    k[3],    y[1], y[2],
          strides[0], strides[1], dilation[0], dilation[1], pads[0], pads[1], pads[2], pads[3]};
}

memory Scratchpad(const memory::desc& desc) { return memory(desc, Engine()); }

// The kernel in the layout a primitive wants: the caller's HWIO buffer, or a reordered copy.
memory KernelAs(const memory::desc& wanted, const memory::desc& given, void* data,
                dnnl::stream& stream) {
  memory user(given, Engine(), data);
  if (wanted == given) return user;
  memory copy(wanted, Engine());
  dnnl::reorder(user, copy).execute(stream, user, copy);
  return copy;
}

// Runs `body`, turning oneDNN's exceptions into an FFI error XLA reports to the caller.
template <typename Body>
ffi::Error Guarded(const char* what, Body body) {
  try {
    body();
  } catch (const std::exception& e) {   // dnnl::error, std::bad_alloc
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN ") + what + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pads) {
  return Guarded("convolution", [&] {
    const auto primitives = PrimitivesFor(
        GeometryOf(x.dimensions(), k.dimensions(), y->dimensions(), strides, dilation, pads));
    const Primitives& p = *primitives;
    dnnl::stream stream(Engine());
    memory src(p.src, Engine(), x.typed_data()), dst(p.dst, Engine(), y->typed_data());
    memory weights = KernelAs(p.forward_pd.weights_desc(), p.weights, k.typed_data(), stream);
    p.forward.execute(stream, {{DNNL_ARG_SRC, src},
                               {DNNL_ARG_WEIGHTS, weights},
                               {DNNL_ARG_DST, dst},
                               {DNNL_ARG_SCRATCHPAD, Scratchpad(p.forward_pd.scratchpad_desc())}});
    stream.wait();
  });
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pads) {
  return Guarded("convolution input gradient", [&] {
    const auto primitives = PrimitivesFor(
        GeometryOf(dx->dimensions(), k.dimensions(), dy.dimensions(), strides, dilation, pads));
    const Primitives& p = *primitives;
    dnnl::stream stream(Engine());
    memory diff_dst(p.dst, Engine(), dy.typed_data()), diff_src(p.src, Engine(), dx->typed_data());
    memory weights =
        KernelAs(p.input_gradient_pd.weights_desc(), p.weights, k.typed_data(), stream);
    p.input_gradient.execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                 {DNNL_ARG_WEIGHTS, weights},
                 {DNNL_ARG_DIFF_SRC, diff_src},
                 {DNNL_ARG_SCRATCHPAD, Scratchpad(p.input_gradient_pd.scratchpad_desc())}});
    stream.wait();
  });
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pads) {
  return Guarded("convolution kernel gradient", [&] {
    const auto primitives = PrimitivesFor(
        GeometryOf(x.dimensions(), dk->dimensions(), dy.dimensions(), strides, dilation, pads));
    const Primitives& p = *primitives;
    dnnl::stream stream(Engine());
    memory src(p.src, Engine(), x.typed_data()), diff_dst(p.dst, Engine(), dy.typed_data());
    memory user(p.weights, Engine(), dk->typed_data());
    const memory::desc& wanted = p.kernel_gradient_pd.diff_weights_desc();
    memory diff_weights = wanted == p.weights ? user : memory(wanted, Engine());
    p.kernel_gradient.execute(
        stream, {{DNNL_ARG_SRC, src},
                 {DNNL_ARG_DIFF_DST, diff_dst},
                 {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                 {DNNL_ARG_SCRATCHPAD, Scratchpad(p.kernel_gradient_pd.scratchpad_desc())}});
    if (wanted != p.weights) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
    stream.wait();
  });
}

}  // namespace

#define JAXCNN_CONV_HANDLER(symbol, function)                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, function,                            \
                                ffi::Ffi::Bind()                             \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Attr<ffi::Span<const int64_t>>("strides") \
                                    .Attr<ffi::Span<const int64_t>>("dilation") \
                                    .Attr<ffi::Span<const int64_t>>("pads"));

JAXCNN_CONV_HANDLER(JaxcnnConvForward, Forward)
JAXCNN_CONV_HANDLER(JaxcnnConvInputGradient, InputGradient)
JAXCNN_CONV_HANDLER(JaxcnnConvKernelGradient, KernelGradient)
