// XLA FFI custom call "jaxllm_ggml_mul_mat": y_i[T, N_i] = x[T, K] @ W_i^T for one or more weights W_i
// [N_i, K] in ggml block formats, all applied to the same x (q/k/v, gate/up) in one ggml graph, so the
// thread pool wakes once for them.
//
//   x:       f32 [T, K]
//   layer:   s32 scalar
//   w_1..n:  u8 [N_i, row_bytes_i] or [L, N_i, row_bytes_i] (a stack of layers; `layer` picks one, so a
//            layer scan passes the stack whole instead of copying a slice out every layer)
//   y_1..n:  f32 [T, N_i]
//   attrs:   ggml_types (ggml's type id of each weight), n_threads, poll (ggml's idle-polling level of
//            its workers, 0-100)
//
// ggml computes it as llama.cpp does: x is quantized per block to 8 bits and dotted with the packed
// rows by ggml's SIMD kernels, never expanding W. The tensors are views of XLA's buffers (no copies);
// one small graph is built per call in a static arena.
#include <cstdint>
#include <mutex>
#include <vector>

#include "ggml_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

std::recursive_mutex mu;  // guards the pool, its work buffer and the matmul's graph arena
ggml_threadpool* pool = nullptr;
int pool_threads = 0;
int64_t pool_poll = -1;
std::vector<uint8_t> work;
alignas(64) uint8_t arena[32 * 1024];
constexpr size_t kMaxWeights = 4;

}  // namespace

ggml_status jaxllm_ggml_compute(ggml_cgraph* graph, int n_threads, int poll) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  static const bool initialized = (ggml_cpu_init(), true);
  (void)initialized;
  if (pool == nullptr || pool_threads != n_threads || pool_poll != poll) {
    if (pool != nullptr) ggml_threadpool_free(pool);
    ggml_threadpool_params params = ggml_threadpool_params_default(n_threads);
    params.poll = static_cast<uint32_t>(poll);
    pool = ggml_threadpool_new(&params);
    pool_threads = n_threads;
    pool_poll = poll;
  }
  ggml_cplan plan = ggml_graph_plan(graph, pool_threads, pool);
  if (work.size() < plan.work_size) work.resize(plan.work_size);
  plan.work_data = work.data();
  return ggml_graph_compute(graph, &plan);
}

namespace {

ffi::Error MulMats(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights,
                   ffi::RemainingRets outs, ffi::Span<const int64_t> ggml_types, int64_t n_threads,
                   int64_t poll) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: x must be [T, K]");
  const int64_t t = xd[0], k = xd[1];
  const size_t n_weights = weights.size();
  if (n_weights == 0 || outs.size() != n_weights || ggml_types.size() != n_weights || n_weights > kMaxWeights) {
    return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: one output and one ggml type per weight (at most 4)");
  }

  std::lock_guard<std::recursive_mutex> lock(mu);  // the arena
  ggml_init_params init = {sizeof(arena), arena, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, t);
  xt->data = const_cast<float*>(x.typed_data());
  ggml_cgraph* graph = ggml_new_graph_custom(ctx, 2 * kMaxWeights, false);
  for (size_t i = 0; i < n_weights; ++i) {
    auto w = weights.get<ffi::AnyBuffer>(i);
    auto y = outs.get<ffi::AnyBuffer>(i);
    if (!w.has_value() || !y.has_value()) {
      ggml_free(ctx);
      return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: bad weight or output buffer");
    }
    const auto wd = w->dimensions();
    const auto type = static_cast<ggml_type>(ggml_types[i]);
    const int64_t n = wd.size() >= 2 ? wd[wd.size() - 2] : 0, row_bytes = wd.size() == 0 ? 0 : wd[wd.size() - 1];
    const int64_t index = wd.size() == 3 ? layer.typed_data()[0] : 0;
    if ((wd.size() != 2 && wd.size() != 3) || ggml_row_size(type, k) != static_cast<size_t>(row_bytes) ||
        index < 0 || (wd.size() == 3 && index >= wd[0]) || (*y)->element_count() != t * n) {
      ggml_free(ctx);
      return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: a weight's shape does not match x, its type or its output");
    }
    ggml_tensor* wt = ggml_new_tensor_2d(ctx, type, k, n);
    wt->data = static_cast<uint8_t*>(w->untyped_data()) + index * n * row_bytes;
    ggml_tensor* yt = ggml_mul_mat(ctx, wt, xt);  // [N, T] in ggml's order = row-major [T, N]
    yt->data = (*y)->untyped_data();
    ggml_build_forward_expand(graph, yt);
  }
  const ggml_status status = jaxllm_ggml_compute(graph, static_cast<int>(n_threads), static_cast<int>(poll));
  ggml_free(ctx);
  if (status != GGML_STATUS_SUCCESS) return ffi::Error::Internal("jaxllm_ggml_mul_mat: ggml_graph_compute failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlMulMat, MulMats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("ggml_types")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));
