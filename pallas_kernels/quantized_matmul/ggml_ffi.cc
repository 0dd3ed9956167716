// XLA FFI custom call "jaxllm_ggml_mul_mat": y[T, N] = x[T, K] @ W^T, W [N, K] in a ggml block format.
//
//   x:     f32 [T, K]
//   w:     u8  [N, row_bytes] or [L, N, row_bytes] (a stack of layers; `layer` picks one, so a layer
//          scan passes the stack whole instead of copying a slice out every layer)
//   layer: s32 scalar
//   y:     f32 [T, N]
//   attrs: ggml_type (ggml's type id), n_threads, poll (ggml's idle-polling level of its workers, 0-100)
//
// ggml computes it as llama.cpp does: x is quantized per block to 8 bits and dotted with the packed
// rows by ggml's SIMD kernels, never expanding W. The tensors are views of XLA's buffers (no copies);
// one graph of one node is built per call in a small static arena.
#include <cstdint>
#include <mutex>
#include <vector>

#include "ggml-cpu.h"
#include "ggml.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// XLA may run independent custom calls concurrently; ggml's thread pool and the arena are not
// reentrant, and a second pool would only oversubscribe the cores, so calls take turns.
std::mutex mu;
ggml_threadpool* pool = nullptr;
int pool_threads = 0;
int64_t pool_poll = -1;
std::vector<uint8_t> work;
alignas(64) uint8_t arena[16 * 1024];

ffi::Error MulMat(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                  ffi::ResultBuffer<ffi::F32> y, int64_t ggml_type_id, int64_t n_threads, int64_t poll) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || (wd.size() != 2 && wd.size() != 3)) {
    return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: x must be [T, K], w [N, row_bytes] or [L, N, row_bytes]");
  }
  const int64_t t = xd[0], k = xd[1];
  const int64_t n = wd[wd.size() - 2], row_bytes = wd[wd.size() - 1];
  const auto type = static_cast<ggml_type>(ggml_type_id);
  if (ggml_row_size(type, k) != static_cast<size_t>(row_bytes)) {
    return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: row_bytes does not match K for this ggml type");
  }
  const int64_t index = wd.size() == 3 ? layer.typed_data()[0] : 0;
  if (index < 0 || (wd.size() == 3 && index >= wd[0])) {
    return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: layer index out of range");
  }
  const uint8_t* rows = static_cast<const uint8_t*>(w.untyped_data()) + index * n * row_bytes;

  std::lock_guard<std::mutex> lock(mu);
  static const bool initialized = (ggml_cpu_init(), true);
  (void)initialized;
  if (pool == nullptr || pool_threads != n_threads || pool_poll != poll) {
    if (pool != nullptr) ggml_threadpool_free(pool);
    ggml_threadpool_params params = ggml_threadpool_params_default(static_cast<int>(n_threads));
    params.poll = static_cast<uint32_t>(poll);
    pool = ggml_threadpool_new(&params);
    pool_threads = static_cast<int>(n_threads);
    pool_poll = poll;
  }
  ggml_init_params init = {sizeof(arena), arena, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* wt = ggml_new_tensor_2d(ctx, type, k, n);
  wt->data = const_cast<uint8_t*>(rows);
  ggml_tensor* xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, t);
  xt->data = const_cast<float*>(x.typed_data());
  ggml_tensor* yt = ggml_mul_mat(ctx, wt, xt);  // [N, T] in ggml's order = row-major [T, N]
  yt->data = y->typed_data();
  ggml_cgraph* graph = ggml_new_graph_custom(ctx, 4, false);
  ggml_build_forward_expand(graph, yt);
  ggml_cplan plan = ggml_graph_plan(graph, pool_threads, pool);
  if (work.size() < plan.work_size) work.resize(plan.work_size);
  plan.work_data = work.data();
  const ggml_status status = ggml_graph_compute(graph, &plan);
  ggml_free(ctx);
  if (status != GGML_STATUS_SUCCESS) return ffi::Error::Internal("jaxllm_ggml_mul_mat: ggml_graph_compute failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmGgmlMulMat, MulMat,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ggml_type")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));
