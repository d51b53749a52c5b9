// oneDNN convolutions (forward, backward-data, backward-weights) as XLA FFI custom calls for XLA:CPU.
//
// Why hand-written: XLA:CPU (jaxlib 0.10) runs small-channel convolution gradients at a fraction of this CPU's
// peak; oneDNN (what PyTorch uses on CPU) JIT-compiles kernels for the ISA it finds. Layouts are JAX's:
// activations NHWC, weights HWIO, float32 or bfloat16 (every buffer of a call the same; oneDNN accumulates in
// float32 either way). Primitives are built once per shape and type and cached; each call uses its own
// scratchpad, so XLA may run calls concurrently.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Shapes of one convolution: input (n, h, w, c), kernel (kh, kw, c, o), output (oh, ow), strides, paddings,
// and the element type of every buffer.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  dt type;
  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int>(type));
  }
  memory::desc src() const { return memory::desc({n, c, h, w}, type, tag::nhwc); }
  memory::desc dst() const { return memory::desc({n, o, oh, ow}, type, tag::nhwc); }
  memory::desc user_weights() const { return memory::desc({o, c, kh, kw}, type, tag::hwio); }
  memory::desc any_weights() const { return memory::desc({o, c, kh, kw}, type, tag::any); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(cpu_engine(), dnnl::prop_kind::forward_training,
                                                   dnnl::algorithm::convolution_direct, g.src(), g.any_weights(),
                                                   g.dst(), g.strides(), g.pad_l(), g.pad_r(), user_scratchpad());
}

// One cached primitive plus the reorder between the user's HWIO weights and the primitive's weight layout.
struct Plan {
  dnnl::primitive prim;
  memory::desc weights;           // the primitive's weight layout
  bool reorder_weights = false;   // weights != HWIO
  dnnl::primitive weight_reorder; // HWIO -> weights (forward, backward-data) or weights -> HWIO (backward-weights)
  memory::desc scratchpad;
};

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

Plan make_plan(Kind kind, const Geometry& g) {
  Plan plan;
  auto fwd = forward_pd(g);
  if (kind == kForward) {
    // forward_inference: the same function; oneDNN may pick a faster kernel than for forward_training.
    dnnl::convolution_forward::primitive_desc pd(cpu_engine(), dnnl::prop_kind::forward_inference,
                                                 dnnl::algorithm::convolution_direct, g.src(), g.any_weights(),
                                                 g.dst(), g.strides(), g.pad_l(), g.pad_r(), user_scratchpad());
    plan.prim = dnnl::convolution_forward(pd);
    plan.weights = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(cpu_engine(), dnnl::algorithm::convolution_direct, g.src(),
                                                       g.any_weights(), g.dst(), g.strides(), g.pad_l(), g.pad_r(),
                                                       fwd, user_scratchpad());
    plan.prim = dnnl::convolution_backward_data(pd);
    plan.weights = pd.weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(cpu_engine(), dnnl::algorithm::convolution_direct, g.src(),
                                                          g.any_weights(), g.dst(), g.strides(), g.pad_l(),
                                                          g.pad_r(), fwd, user_scratchpad());
    plan.prim = dnnl::convolution_backward_weights(pd);
    plan.weights = pd.diff_weights_desc();
    plan.scratchpad = pd.scratchpad_desc();
  }
  plan.reorder_weights = plan.weights != g.user_weights();
  if (plan.reorder_weights) {
    auto user = g.user_weights();
    plan.weight_reorder = kind == kBackwardWeights
                              ? dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plan.weights, cpu_engine(), user))
                              : dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), user, cpu_engine(), plan.weights));
  }
  return plan;
}

const Plan& get_plan(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::tuple<int, decltype(g.key())>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = plans[std::make_tuple(static_cast<int>(kind), g.key())];
  if (!slot) slot = std::make_unique<Plan>(make_plan(kind, g));
  return *slot;
}

// A 64-byte aligned scratch buffer owned by one call.
struct Scratch {
  std::vector<char> bytes;
  void* get(size_t size) {
    bytes.resize(size + 64);
    auto p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
  }
};

// The oneDNN type of three buffers that must share one: float32 or bfloat16.
dt common_type(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& c) {
  if (a.element_type() != b.element_type() || a.element_type() != c.element_type())
    throw std::invalid_argument("operands and result must have one element type");
  switch (a.element_type()) {
    case ffi::DataType::F32: return dt::f32;
    case ffi::DataType::BF16: return dt::bf16;
    default: throw std::invalid_argument("element type must be float32 or bfloat16");
  }
}

Geometry geometry(ffi::Span<const int64_t> in, int64_t kh, int64_t kw, int64_t o, ffi::Span<const int64_t> out,
                  int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, dt type) {
  return Geometry{in[0], in[1], in[2], in[3], kh, kw, o, out[1], out[2], sh, sw, pt, pb, pl, pr, type};
}

template <typename F>
ffi::Error guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution failed: ") + e.what());
  }
}

// Runs a primitive that reads the HWIO weights `w` (forward, backward-data): `in` and `out` are its NHWC
// activation arguments (src/dst or diff_dst/diff_src).
void run_with_weights(Kind kind, const Geometry& g, void* w, int in_arg, void* in, int out_arg, void* out) {
  const Plan& plan = get_plan(kind, g);
  dnnl::stream stream(cpu_engine());
  Scratch scratch, wbuf;
  memory user_w(g.user_weights(), cpu_engine(), w);
  memory weights = user_w;
  if (plan.reorder_weights) {
    weights = memory(plan.weights, cpu_engine(), wbuf.get(plan.weights.get_size()));
    plan.weight_reorder.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, weights}});
  }
  const memory::desc in_desc = kind == kForward ? g.src() : g.dst();
  const memory::desc out_desc = kind == kForward ? g.dst() : g.src();
  plan.prim.execute(stream, {{in_arg, memory(in_desc, cpu_engine(), in)},
                             {DNNL_ARG_WEIGHTS, weights},
                             {out_arg, memory(out_desc, cpu_engine(), out)},
                             {DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, cpu_engine(),
                                                          scratch.get(plan.scratchpad.get_size()))}});
  stream.wait();
}

// y = conv(x, w): x (N, H, W, C), w (KH, KW, C, O) -> y (N, OH, OW, O).
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return guarded([&] {
    auto wd = w.dimensions();
    Geometry g = geometry(x.dimensions(), wd[0], wd[1], wd[3], y->dimensions(), sh, sw, pt, pb, pl, pr,
                          common_type(x, w, *y));
    run_with_weights(kForward, g, w.untyped_data(), DNNL_ARG_SRC, x.untyped_data(), DNNL_ARG_DST,
                     y->untyped_data());
  });
}

// dx = conv_transpose(dy, w): dy (N, OH, OW, O), w (KH, KW, C, O) -> dx (N, H, W, C).
ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return guarded([&] {
    auto wd = w.dimensions();
    Geometry g = geometry(dx->dimensions(), wd[0], wd[1], wd[3], dy.dimensions(), sh, sw, pt, pb, pl, pr,
                          common_type(dy, w, *dx));
    run_with_weights(kBackwardData, g, w.untyped_data(), DNNL_ARG_DIFF_DST, dy.untyped_data(), DNNL_ARG_DIFF_SRC,
                     dx->untyped_data());
  });
}

// dw = correlation of x and dy: x (N, H, W, C), dy (N, OH, OW, O) -> dw (KH, KW, C, O).
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return guarded([&] {
    auto wd = dw->dimensions();
    Geometry g = geometry(x.dimensions(), wd[0], wd[1], wd[3], dy.dimensions(), sh, sw, pt, pb, pl, pr,
                          common_type(x, dy, *dw));
    const Plan& plan = get_plan(kBackwardWeights, g);
    dnnl::stream stream(cpu_engine());
    Scratch scratch, wbuf;
    memory user_dw(g.user_weights(), cpu_engine(), dw->untyped_data());
    memory diff_weights = plan.reorder_weights
                              ? memory(plan.weights, cpu_engine(), wbuf.get(plan.weights.get_size()))
                              : user_dw;
    plan.prim.execute(stream, {{DNNL_ARG_SRC, memory(g.src(), cpu_engine(), x.untyped_data())},
                               {DNNL_ARG_DIFF_DST, memory(g.dst(), cpu_engine(), dy.untyped_data())},
                               {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                               {DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, cpu_engine(),
                                                            scratch.get(plan.scratchpad.get_size()))}});
    if (plan.reorder_weights)
      plan.weight_reorder.execute(stream, {{DNNL_ARG_FROM, diff_weights}, {DNNL_ARG_TO, user_dw}});
    stream.wait();
  });
}

}  // namespace

// 1 when oneDNN runs bfloat16 convolutions with native instructions here (AVX512-BF16 or AMX), else 0: without
// them oneDNN emulates bfloat16 (AVX-512) or has no bfloat16 convolution at all (AVX2), slower than float32.
extern "C" int CifarJaxOnednnNativeBfloat16() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto bf16 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  return (isa & bf16) == bf16 ? 1 : 0;
}

#define CONV_ATTRS                                                                                  \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")                                                                    \
      .Attr<int64_t>("pad_right")

#define CONV_BINDING ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>() CONV_ATTRS

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights, CONV_BINDING);
