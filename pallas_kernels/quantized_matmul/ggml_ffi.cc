// XLA FFI custom call: y[T, N] = x[T, K] @ W^T for W [N, K] stored in a ggml quantized type
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>
#include "ggml.h"
#include "ggml-cpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
std::mutex mu;
ggml_threadpool* pool = nullptr;
int pool_threads = 0;
std::vector<uint8_t> work;
alignas(64) uint8_t meta[64 * 1024];

ffi::Error MulMat(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                  ffi::ResultBuffer<ffi::F32> y, int64_t gtype, int64_t n_threads) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() < 2) return ffi::Error::InvalidArgument("bad ranks");
  const int64_t T = xd[0], K = xd[1];
  const int64_t N = wd[wd.size() - 2], row_bytes = wd[wd.size() - 1];
  const ggml_type type = static_cast<ggml_type>(gtype);
  if (ggml_row_size(type, K) != (size_t)row_bytes) return ffi::Error::InvalidArgument("row bytes do not match K");
  int64_t l = wd.size() > 2 ? layer.typed_data()[0] : 0;
  const uint8_t* wp = static_cast<const uint8_t*>(w.untyped_data()) + l * N * row_bytes;

  std::lock_guard<std::mutex> lock(mu);
  static bool inited = false;
  if (!inited) { ggml_cpu_init(); inited = true; }
  if (pool == nullptr || pool_threads != n_threads) {
    if (pool) ggml_threadpool_free(pool);
    ggml_threadpool_params p = ggml_threadpool_params_default((int)n_threads); if (getenv("GPOLL")) p.poll = atoi(getenv("GPOLL"));
    pool = ggml_threadpool_new(&p);
    pool_threads = (int)n_threads;
  }
  ggml_init_params ip = {sizeof(meta), meta, true};
  ggml_context* ctx = ggml_init(ip);
  ggml_tensor* wt = ggml_new_tensor_2d(ctx, type, K, N);
  wt->data = const_cast<uint8_t*>(wp);
  ggml_tensor* xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, T);
  xt->data = const_cast<float*>(x.typed_data());
  ggml_tensor* yt = ggml_mul_mat(ctx, wt, xt);
  yt->data = y->typed_data();
  ggml_cgraph* gf = ggml_new_graph_custom(ctx, 4, false);
  ggml_build_forward_expand(gf, yt);
  ggml_cplan plan = ggml_graph_plan(gf, (int)n_threads, pool);
  if (work.size() < plan.work_size) work.resize(plan.work_size);
  plan.work_data = work.data();
  ggml_status st = ggml_graph_compute(gf, &plan);
  ggml_free(ctx);
  if (st != GGML_STATUS_SUCCESS) return ffi::Error::Internal("ggml_graph_compute failed");
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
                                  .Attr<int64_t>("n_threads"));
