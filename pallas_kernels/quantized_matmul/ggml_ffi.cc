// XLA FFI custom call "jaxllm_ggml_mul_mat": y_i[T, N_i] = x[T, K] @ W_i^T for one or more weights W_i
// [N_i, K] in ggml block formats, all applied to the same x (q/k/v, gate/up) in one ggml graph, so the
// thread pool wakes once for them.
//
//   x:       f32 [T, K]
//   layer:   s32 [1] (the stack's layer), or [2]: the layer, then the step's live rows (rows of x past
//            it are padding: no product is computed for them, their outputs are zeros)
//   w_1..n:  u8 [N_i, row_bytes_i] or [L, N_i, row_bytes_i] (a stack of layers; `layer` picks one, so a
//            layer scan passes the stack whole instead of copying a slice out every layer)
//   y_1..n:  f32 [T, N_i], or with glu one y: f32 [T, N] = silu(x @ W_1^T) * (x @ W_2^T)
//   attrs:   ggml_types (ggml's type id of each weight), amx (per weight: 1 if it is in ggml's AMX tile
//            layout, see jaxllm_amx_pack), bf16_min_rows (steps of at least this many live rows take
//            AMX-layout weights through amx_bf16.cc's bf16 GEMM where it reads their type; 0: never),
//            int8_min_rows (smaller steps of at least this many live rows take AMX-layout Q4_1 weights
//            through amx_int8.cc's tile kernel, ggml's numbers at a lower cost; 0: never),
//            glu (1: two weights, gate and up, of the same N, and a gated MLP's SwiGLU taken in the
//            same graph, so XLA never runs it over the step's padded rows as a pass of its own),
//            n_threads, poll (ggml's idle-polling level of its workers, 0-100)
//
// ggml computes it as llama.cpp does: x is quantized per block to 8 bits and dotted with the packed
// rows by ggml's SIMD kernels, never expanding W. The tensors are views of XLA's buffers (no copies);
// one small graph is built per call in a static arena.
//
// On CPUs with AMX (Intel Xeon 4th gen+), weights repacked once at load into ggml's AMX tile layout
// are multiplied by its int8 tile kernels (llama.cpp's AMX buffer type): a GEMM for every row count,
// where the row-layout kernels of most block formats (Q4_1, the K-quants) are one dot per row. Large
// steps of Q4_0 / Q4_1 / Q8_0 AMX weights go to a bf16 tile GEMM instead (amx_bf16.cc): x is
// converted once to bf16 in the tiles' order (amx_bf16_pack_rows), then each weight's product runs as
// a custom op on ggml's pool (with glu, gate and up are one op that writes the activation). Smaller
// steps of two rows or more of Q4_1 AMX weights go to amx_int8.cc's tile kernel the same way (x
// quantized once by amx_int8_quantize_rows): ggml's numbers, computed faster.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "amx_bf16.h"
#include "amx_int8.h"
#include "ggml_runtime.h"
#include "xla/ffi/api/ffi.h"

#ifdef JAXLLM_AMX
#include "ggml-backend-impl.h"
// ggml-cpu/amx/amx.h and mmq.h (internal)
ggml_backend_buffer_type_t ggml_backend_amx_buffer_type(void);
void ggml_backend_amx_convert_weight(struct ggml_tensor* tensor, const void* data, size_t offset, size_t size);
#endif

namespace ffi = xla::ffi;

namespace {

std::recursive_mutex mu;  // guards the pool, its work buffer and the matmul's graph arena
ggml_threadpool* pool = nullptr;
int pool_threads = 0;
int64_t pool_poll = -1;
bool bind_workers = true;  // jaxllm_ggml_bind_workers
std::vector<uint8_t> work;
alignas(64) uint8_t arena[32 * 1024];
constexpr size_t kMaxWeights = 4;
std::vector<uint16_t> x_bf16;  // x for the bf16 GEMM (amx_bf16_pack_rows)
std::vector<uint8_t> x_q8;  // x for the int8 tile products of small steps (amx_int8_quantize_rows)
std::vector<float> glu_products;  // with glu: the gate's and the up projection's products

}  // namespace

namespace {

#ifdef JAXLLM_AMX
// A buffer of ggml's AMX buffer type: weights that claim it (tensor->buffer) are computed by the AMX
// kernels, which read them in the tile layout. Null when the kernels are not built or the kernel
// refuses this process the AMX tile state.
ggml_backend_buffer_t amx_buffer() {
  static ggml_backend_buffer_t buffer = [] {
    ggml_cpu_init();
    ggml_backend_buffer_type_t type = ggml_backend_amx_buffer_type();
    return type == nullptr ? nullptr : ggml_backend_buft_alloc_buffer(type, 64);
  }();
  return buffer;
}
#else
ggml_backend_buffer_t amx_buffer() { return nullptr; }
#endif

bool amx_kernel_type(int64_t type) {
  switch (type) {
    case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K: case GGML_TYPE_IQ4_XS: return true;
    default: return false;
  }
}

}  // namespace

// Bytes per row of a [n, k] weight of ggml type `type` in the AMX tile layout; 0 when AMX cannot take
// it (no AMX, another type, or n / k not multiples of the tiles).
extern "C" int64_t jaxllm_amx_row_bytes(int64_t type, int64_t n, int64_t k) {
  ggml_backend_buffer_t buffer = amx_buffer();
  const int64_t block = ggml_blck_size(static_cast<ggml_type>(type));
  if (buffer == nullptr || !amx_kernel_type(type) || n <= 0 || n % 32 || k % (block > 32 ? block : 32)) return 0;
#ifdef JAXLLM_AMX
  alignas(64) uint8_t scratch[1024];
  ggml_init_params init = {sizeof(scratch), scratch, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* t = ggml_new_tensor_2d(ctx, static_cast<ggml_type>(type), k, n);
  const size_t bytes = ggml_backend_buft_get_alloc_size(buffer->buft, t);
  ggml_free(ctx);
  return static_cast<int64_t>(bytes) / n;
#else
  return 0;
#endif
}

// Repacks a [n, k] weight of ggml type `type` from its row layout (src, as GGUF stores it) into the AMX
// tile layout (dst, n * jaxllm_amx_row_bytes bytes). Returns 0 on success.
extern "C" int jaxllm_amx_pack(int64_t type, int64_t n, int64_t k, const void* src, void* dst) {
  if (jaxllm_amx_row_bytes(type, n, k) == 0) return 1;
#ifdef JAXLLM_AMX
  alignas(64) uint8_t scratch[1024];
  ggml_init_params init = {sizeof(scratch), scratch, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* t = ggml_new_tensor_2d(ctx, static_cast<ggml_type>(type), k, n);
  t->data = dst;
  ggml_backend_amx_convert_weight(t, src, 0, ggml_nbytes(t));
  ggml_free(ctx);
  return 0;
#else
  return 1;
#endif
}

// Whether steps of bf16_min_rows or more take AMX-layout weights of ggml type `type` through the bf16
// tile GEMM (amx_bf16.cc): built for this CPU, AMX granted, and a layout it reads.
extern "C" int jaxllm_amx_bf16_takes(int64_t type) {
  return amx_buffer() != nullptr && amx_bf16_takes(static_cast<int>(type));
}

// Whether steps of int8_min_rows or more live rows take AMX-layout weights of ggml type `type` through
// amx_int8.cc's tile kernel: built for this CPU, AMX granted, and Q4_1.
extern "C" int jaxllm_amx_int8_takes(int64_t type) {
  return amx_buffer() != nullptr && amx_int8_takes(static_cast<int>(type));
}

// y[m, n] = x[m, k] @ w^T by amx_int8.cc alone, on the calling thread (tests compare it with ggml's
// kernels). w: [n, k] of `type` in the AMX tile layout. Returns 0 on success.
extern "C" int jaxllm_amx_int8_mul_mat(int64_t type, const float* x, int64_t m, int64_t k, const void* w, int64_t n,
                                       float* y) {
  if (jaxllm_amx_int8_takes(type) == 0 || jaxllm_amx_row_bytes(type, n, k) == 0 || m <= 0) return 1;
  std::vector<uint8_t> xq(amx_int8_rows_bytes(m, k));
  amx_int8_quantize_rows(x, m, k, xq.data(), 0, 1);
  amx_int8_mul_mat(static_cast<int>(type), static_cast<const uint8_t*>(w), n, k, xq.data(), m, y, 0, 1);
  return 0;
}

extern "C" void jaxllm_ggml_bind_workers(int bind) {
  std::lock_guard<std::recursive_mutex> lock(mu);
  bind_workers = bind != 0;
}

namespace {

void bind_to_cpu(ggml_tensor* /*dst*/, int ith, int /*nth*/, void* userdata) {
  if (ith == 0) return;  // the calling thread: XLA's, and not always the same one
  const std::vector<int>& cpus = *static_cast<const std::vector<int>*>(userdata);
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpus[cpus.size() - ith], &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

// Binds each worker of a new pool to one CPU of the process's set, from the last one down. Left free,
// the scheduler at times woke XLA's thread (which runs the graph as ggml's thread 0) onto the core
// where the worker was polling and left it queued there while the other core idled: served prefill
// steps of SmolLM2 on 2 cores took 2-4x their in-process time in about half the turns. The calling
// thread stays free: XLA runs programs on more than one thread. Skipped when the pool has more threads
// than the process has CPUs (there is nothing to keep apart).
void bind_pool_workers(int n_threads, int poll) {
  cpu_set_t allowed;
  if (n_threads < 2 || sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (n_threads > static_cast<int>(cpus.size())) return;
  jaxllm_run_on_pool(bind_to_cpu, &cpus, n_threads, poll);  // the pool is set up by now: no recursion
}

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
    if (bind_workers) bind_pool_workers(n_threads, poll);
  }
  ggml_cplan plan = ggml_graph_plan(graph, pool_threads, pool);
  if (work.size() < plan.work_size) work.resize(plan.work_size);
  plan.work_data = work.data();
  return ggml_graph_compute(graph, &plan);
}

ggml_status jaxllm_run_on_pool(ggml_custom_op_t fn, void* userdata, int n_threads, int poll) {
  // on the stack, not static: a pool's first call runs a second task (bind_pool_workers) inside this one
  alignas(64) uint8_t task_arena[4 * 1024];
  ggml_init_params init = {sizeof(task_arena), task_arena, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* task = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, nullptr, 0, fn, n_threads, userdata);
  float sink = 0;
  task->data = &sink;
  ggml_cgraph* graph = ggml_new_graph_custom(ctx, 2, false);
  ggml_build_forward_expand(graph, task);
  const ggml_status status = jaxllm_ggml_compute(graph, n_threads, poll);
  ggml_free(ctx);
  return status;
}

namespace {

void run_pack_rows(ggml_tensor* a, int ith, int nth, void* /*userdata*/) {
  const ggml_tensor* x = a->src[0];
  amx_bf16_pack_rows(static_cast<const float*>(x->data), x->ne[1], x->ne[0], static_cast<uint16_t*>(a->data), ith, nth);
}

void run_quantize_rows(ggml_tensor* a, int ith, int nth, void* /*userdata*/) {
  const ggml_tensor* x = a->src[0];
  amx_int8_quantize_rows(static_cast<const float*>(x->data), x->ne[1], x->ne[0], static_cast<uint8_t*>(a->data), ith,
                         nth);
}

void run_amx_int8(ggml_tensor* y, int ith, int nth, void* /*userdata*/) {
  const ggml_tensor* w = y->src[0];
  const ggml_tensor* x = y->src[1];
  amx_int8_mul_mat(w->type, static_cast<const uint8_t*>(w->data), w->ne[1], w->ne[0],
                   static_cast<const uint8_t*>(x->data), y->ne[1], static_cast<float*>(y->data), ith, nth);
}

void run_amx_bf16(ggml_tensor* y, int ith, int nth, void* /*userdata*/) {
  const ggml_tensor* w = y->src[0];
  const ggml_tensor* x = y->src[1];
  const ggml_tensor* up = y->src[2];  // with glu: the up projection (w is the gate)
  amx_bf16_mul_mat(w->type, static_cast<const uint8_t*>(w->data),
                   up ? static_cast<const uint8_t*>(up->data) : nullptr, w->ne[1], w->ne[0],
                   static_cast<const uint16_t*>(x->data), y->ne[1], static_cast<float*>(y->data), ith, nth);
}

ffi::Error MulMats(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights,
                   ffi::RemainingRets outs, ffi::Span<const int64_t> ggml_types, ffi::Span<const int64_t> amx,
                   int64_t bf16_min_rows, int64_t int8_min_rows, int64_t glu, int64_t n_threads, int64_t poll) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: x must be [T, K]");
  const int64_t t = xd[0], k = xd[1];
  // Only the live rows are multiplied: a step padded up to its compiled bucket (67 rows run as 96)
  // would otherwise pay for every padding row in every projection.
  const int64_t live = layer.element_count() >= 2 ? std::clamp<int64_t>(layer.typed_data()[1], 0, t) : t;
  const size_t n_weights = weights.size();
  if (n_weights == 0 || outs.size() != (glu ? 1 : n_weights) || ggml_types.size() != n_weights ||
      amx.size() != n_weights || n_weights > kMaxWeights || (glu && n_weights != 2)) {
    return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: one output, one ggml type and one layout per weight (at most 4); "
                                       "with glu two weights and one output");
  }

  std::lock_guard<std::recursive_mutex> lock(mu);  // the arena
  ggml_init_params init = {sizeof(arena), arena, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, live);
  xt->data = const_cast<float*>(x.typed_data());
  ggml_cgraph* graph = ggml_new_graph_custom(ctx, 2 * kMaxWeights + 2, false);
  ggml_tensor* xt_bf16 = nullptr;  // made by the first weight that takes the bf16 GEMM
  ggml_tensor* xt_q8 = nullptr;  // made by the first weight that takes the int8 tile products
  ggml_tensor* products[kMaxWeights] = {};
  // By live rows, not the compiled size: the kernels' costs follow the rows they multiply (the
  // threshold's figures: quantized_matmul/__init__.py).
  const auto takes_bf16 = [&](size_t i) {
    return amx[i] && bf16_min_rows > 0 && live >= bf16_min_rows && amx_bf16_takes(static_cast<int>(ggml_types[i]));
  };
  // Gate and up both through the bf16 GEMM: one op takes the activation (ggml's SwiGLU, the same
  // numbers) from their products block by block, without the products' round trip through memory, a
  // SwiGLU pass of its own and two barriers.
  const bool glu_in_gemm = glu && ggml_types[0] == ggml_types[1] && takes_bf16(0) && takes_bf16(1);
  ggml_tensor* gate = nullptr;
  for (size_t i = 0; i < n_weights; ++i) {
    auto w = weights.get<ffi::AnyBuffer>(i);
    auto y = outs.get<ffi::AnyBuffer>(glu ? 0 : i);
    if (!w.has_value() || !y.has_value()) {
      ggml_free(ctx);
      return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: bad weight or output buffer");
    }
    const auto wd = w->dimensions();
    const auto type = static_cast<ggml_type>(ggml_types[i]);
    const int64_t n = wd.size() >= 2 ? wd[wd.size() - 2] : 0, row_bytes = wd.size() == 0 ? 0 : wd[wd.size() - 1];
    const int64_t index = wd.size() == 3 ? layer.typed_data()[0] : 0;
    const int64_t want_bytes = amx[i] ? jaxllm_amx_row_bytes(type, n, k) : static_cast<int64_t>(ggml_row_size(type, k));
    if ((wd.size() != 2 && wd.size() != 3) || want_bytes == 0 || want_bytes != row_bytes ||
        index < 0 || (wd.size() == 3 && index >= wd[0]) || (*y)->element_count() != t * n) {
      ggml_free(ctx);
      return ffi::Error::InvalidArgument("jaxllm_ggml_mul_mat: a weight's shape does not match x, its type or its output");
    }
    // padding rows' outputs are zeros
    std::memset(static_cast<float*>((*y)->untyped_data()) + live * n, 0, (t - live) * n * sizeof(float));
    if (live == 0) continue;  // nothing to multiply
    float* product = static_cast<float*>((*y)->untyped_data());
    if (glu && !glu_in_gemm) {  // the products go to scratch; the gated activation writes y
      if (glu_products.size() < static_cast<size_t>(2 * live * n)) glu_products.resize(2 * live * n);
      product = glu_products.data() + i * live * n;
    }
    ggml_tensor* wt = ggml_new_tensor_2d(ctx, type, k, n);
    wt->data = static_cast<uint8_t*>(w->untyped_data()) + index * n * row_bytes;
    const auto add_product = [&](ggml_tensor* yt) {  // written to `product`, kept for the SwiGLU
      yt->data = product;
      ggml_build_forward_expand(graph, yt);
      products[i] = yt;
    };
    // With glu_in_gemm the op takes the gate (held back) and this up projection, and writes the
    // activation where the product would go (y).
    const auto add_custom_product = [&](ggml_tensor* x_prepared, ggml_custom_op_t run) {
      ggml_tensor* args[3] = {glu_in_gemm ? gate : wt, x_prepared, wt};
      add_product(ggml_custom_4d(ctx, GGML_TYPE_F32, n, live, 1, 1, args, glu_in_gemm ? 3 : 2, run, GGML_N_TASKS_MAX,
                                 nullptr));
    };
    if (takes_bf16(i)) {
      if (xt_bf16 == nullptr) {
        const int64_t rows = (live + 31) / 32 * 32;
        if (x_bf16.size() < static_cast<size_t>(rows * k)) x_bf16.resize(rows * k);
        ggml_tensor* src[1] = {xt};
        xt_bf16 = ggml_custom_4d(ctx, GGML_TYPE_BF16, k, rows, 1, 1, src, 1, run_pack_rows, GGML_N_TASKS_MAX, nullptr);
        xt_bf16->data = x_bf16.data();
      }
      if (glu_in_gemm && i == 0) {  // taken with the up projection
        gate = wt;
        continue;
      }
      add_custom_product(xt_bf16, run_amx_bf16);
      continue;
    }
    if (amx[i] && int8_min_rows > 0 && live >= int8_min_rows && amx_int8_takes(type)) {
      if (xt_q8 == nullptr) {
        const int64_t bytes = amx_int8_rows_bytes(live, k);
        if (x_q8.size() < static_cast<size_t>(bytes)) x_q8.resize(bytes);
        ggml_tensor* src[1] = {xt};
        xt_q8 = ggml_custom_4d(ctx, GGML_TYPE_I8, bytes, 1, 1, 1, src, 1, run_quantize_rows, GGML_N_TASKS_MAX, nullptr);
        xt_q8->data = x_q8.data();
      }
      add_custom_product(xt_q8, run_amx_int8);
      continue;
    }
#ifdef JAXLLM_AMX  // (without it no weight passes the layout check above as AMX-packed)
    if (amx[i]) {  // claimed by the AMX buffer type, whose kernels then compute this product
      ggml_backend_buffer_t buffer = amx_buffer();
      wt->buffer = buffer;
      buffer->iface.init_tensor(buffer, wt);
    }
#endif
    add_product(ggml_mul_mat(ctx, wt, xt));  // [N, T] in ggml's order = row-major [T, N]
  }
  if (glu && live > 0 && !glu_in_gemm) {  // both products are [live, N]: each was checked against the one output
    ggml_tensor* h = ggml_swiglu_split(ctx, products[0], products[1]);
    h->data = outs.get<ffi::AnyBuffer>(0).value()->untyped_data();
    ggml_build_forward_expand(graph, h);
  }
  const ggml_status status =
      live == 0 ? GGML_STATUS_SUCCESS : jaxllm_ggml_compute(graph, static_cast<int>(n_threads), static_cast<int>(poll));
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
                                  .Attr<ffi::Span<const int64_t>>("amx")
                                  .Attr<int64_t>("bf16_min_rows")
                                  .Attr<int64_t>("int8_min_rows")
                                  .Attr<int64_t>("glu")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));
