// XLA FFI custom calls for the sampler's reductions over the whole vocabulary (jaxllm/engine/sampler.py),
// one pass over a row each (reference: the jnp functions of __init__.py):
//
//   jaxllm_cpu_row_argmax:    x f32 [R, V] -> s32 [R]: the first index of each row's max
//   jaxllm_cpu_row_logprobs:  logits f32 [R, V], wanted s32 [R] (each in [0, V)) ->
//                             lse f32 [R] (log of the row's sum of exp), rank s32 [R]
//                             (1 + the number of logits above logits[wanted])
//
// Rows are split over ggml's thread pool. Each row's arithmetic is its own (batch invariance).
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_vectors.h"
#include "ggml_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;

int32_t argmax_row(const float* x, int64_t v) {
  const int64_t whole = v / kLanes * kLanes;
  v16 m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < whole; i += kLanes) m = vmax(m, load(x + i));
  float top = lane_max(m);
  for (int64_t i = whole; i < v; ++i) top = x[i] > top ? x[i] : top;
  for (int64_t i = 0; i < v; ++i) {
    if (x[i] == top) return static_cast<int32_t>(i);
  }
  return 0;  // a row of NaNs
}

void logprobs_row(const float* x, int64_t v, int32_t wanted, float* lse, int32_t* rank) {
  const int64_t whole = v / kLanes * kLanes;
  const float w = x[wanted];
  v16 m = splat(-std::numeric_limits<float>::infinity());
  i16 above{};
  for (int64_t i = 0; i < whole; i += kLanes) {
    const v16 xi = load(x + i);
    m = vmax(m, xi);
    above -= xi > w;  // true lanes are -1
  }
  float top = lane_max(m);
  int32_t count = 0;
  for (int j = 0; j < kLanes; ++j) count += above[j];
  for (int64_t i = whole; i < v; ++i) top = x[i] > top ? x[i] : top, count += x[i] > w;
  v16 sum{};
  for (int64_t i = 0; i < whole; i += kLanes) sum += exp_nonpositive(load(x + i) - top);
  float total = lane_sum(sum);
  for (int64_t i = whole; i < v; ++i) total += std::exp(x[i] - top);
  *lse = std::isinf(top) ? top : top + std::log(total);
  *rank = 1 + count;
}

struct Rows {
  const float* x;
  int64_t r, v;
  const int32_t* wanted;  // null: argmax
  int32_t* ids;
  float* lse;
  int32_t* rank;
};

void run_rows(ggml_tensor* /*dst*/, int ith, int nth, void* userdata) {
  const Rows& p = *static_cast<const Rows*>(userdata);
  for (int64_t i = ith; i < p.r; i += nth) {
    if (p.wanted == nullptr) {
      p.ids[i] = argmax_row(p.x + i * p.v, p.v);
    } else {
      const int32_t w = p.wanted[i];
      logprobs_row(p.x + i * p.v, p.v, w >= 0 && w < p.v ? w : 0, p.lse + i, p.rank + i);
    }
  }
}

ffi::Error Launch(const Rows& rows, int64_t n_threads, int64_t poll) {
  if (rows.r * rows.v < (1 << 16) || n_threads <= 1) {  // a pool wake-up costs more than a small step
    run_rows(nullptr, 0, 1, const_cast<Rows*>(&rows));
    return ffi::Error::Success();
  }
  const ggml_status status = jaxllm_run_on_pool(run_rows, const_cast<Rows*>(&rows), static_cast<int>(n_threads),
                                                static_cast<int>(poll));
  return status == GGML_STATUS_SUCCESS ? ffi::Error::Success() : ffi::Error::Internal("ggml compute failed");
}

ffi::Error RowArgmax(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> ids, int64_t n_threads, int64_t poll) {
  const auto d = x.dimensions();
  if (d.size() != 2 || ids->element_count() != d[0] || d[1] == 0) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_row_argmax: x [R, V > 0] -> ids [R]");
  }
  return Launch({x.typed_data(), d[0], d[1], nullptr, ids->typed_data(), nullptr, nullptr}, n_threads, poll);
}

ffi::Error RowLogprobs(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> wanted, ffi::ResultBuffer<ffi::F32> lse,
                       ffi::ResultBuffer<ffi::S32> rank, int64_t n_threads, int64_t poll) {
  const auto d = x.dimensions();
  if (d.size() != 2 || d[1] == 0 || wanted.element_count() != d[0] || lse->element_count() != d[0] ||
      rank->element_count() != d[0]) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_row_logprobs: logits [R, V > 0], wanted [R] -> lse [R], rank [R]");
  }
  return Launch({x.typed_data(), d[0], d[1], wanted.typed_data(), nullptr, lse->typed_data(), rank->typed_data()},
                n_threads, poll);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuRowArgmax, RowArgmax,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuRowLogprobs, RowLogprobs,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));
