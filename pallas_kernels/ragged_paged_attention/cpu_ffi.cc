// XLA FFI custom call "jaxllm_cpu_paged_attention": reference.py's ragged paged attention for CPU, over
// a float32 pool or an int8 / float8 QuantizedPages pool, built into the ggml extension
// (pallas_kernels/quantized_matmul/build.py).
//
//   q:          f32 [T, Hq, D]
//   kv_pages:   f32 [(L,) P, S, 2 * Hkv, D]   K of head h at 2h, V at 2h + 1 (write_kv's layout), or
//               the bytes of a QuantizedPages pool (u8 / s8), read as value(byte) * scales[token, 2h (+1)]
//   scales:     f32 [(L,) P, S, 2 * Hkv] of a byte pool (else unused)
//   lut:        f32 [256], a u8 (float8 bits) pool's value of each byte; s8 bytes convert directly
//   layer:      s32 scalar, the layer of a stacked pool
//   kv_lens:    s32 [N]          page_table: s32 [N, max_pages]
//   cu_q_lens:  s32 [N + 1]      num_seqs: s32 [1]
//   window:     s32 scalar, a sliding window (<= 0: none)
//   out:        f32 [T, Hq, D]; rows past cu_q_lens[num_seqs] are zero
//   attrs:      sm_scale, soft_cap (0: none), n_threads, poll
//
// Why: XLA:CPU runs the reference as a loop of gathers, transposes and small dots, ~90 us per layer per
// 128 keys even for one decode row (a 1-row step of SmolLM2 at 1,000 tokens of context spent 28 ms in
// attention). Here each (row, KV head) walks only its own keys, page by page, reading the pool in
// place. Keys are taken in chunks of one page at absolute positions with an online softmax, so a row's
// result does not depend on the other rows of the step (batch invariance). Plain loops: the compiler
// vectorizes the head_dim loops (-fopenmp-simd for the dot's reduction; no OpenMP runtime). Large
// steps (prefill) split the (row, head) items over ggml's thread pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ggml_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const float* pages = nullptr;   // this layer's float pool, or
  const uint8_t* bytes = nullptr;  // this layer's byte pool, with
  const float* scales = nullptr;   // its scales [P, S, 2 * Hkv] and
  const float* lut = nullptr;      // each byte's value
  bool int8 = false;               // a byte pool of int8 values (read without the table)
  const int32_t* kv_lens;
  const int32_t* page_table;
  float* out;
  int64_t num_q_heads, num_kv_heads, head_dim, page_size, max_pages;
  int32_t window;
  float sm_scale, soft_cap;
  std::vector<int32_t> item_seq, item_row;  // one entry per (row, KV head) item: the row's sequence, the row
  std::vector<int32_t> row_pos;             // the row's position in its sequence
};

// Attention of one row's query heads of one KV head (a group) over its sequence's keys.
void attend(const Problem& p, int64_t item) {
  const int64_t seq = p.item_seq[item], row = p.item_row[item] / p.num_kv_heads;
  const int64_t h = p.item_row[item] % p.num_kv_heads;
  const int64_t group = p.num_q_heads / p.num_kv_heads, d = p.head_dim, s = p.page_size;
  const int64_t pos = p.row_pos[row], kv_len = p.kv_lens[seq];
  const int64_t end = std::min<int64_t>(pos + 1, kv_len);
  const int64_t begin = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
  const int32_t* pages = p.page_table + seq * p.max_pages;
  const int64_t token_stride = 2 * p.num_kv_heads * d;
  std::vector<float> qs(group * d), acc(group * d, 0.0f), scores(s), kbuf, vbuf;
  if (p.bytes != nullptr) kbuf.resize(s * d), vbuf.resize(s * d);
  std::vector<float> m(group, -std::numeric_limits<float>::infinity()), l(group, 0.0f);
  for (int64_t g = 0; g < group; ++g) {
    const float* src = p.q + (row * p.num_q_heads + h * group + g) * d;
    for (int64_t i = 0; i < d; ++i) qs[g * d + i] = src[i] * p.sm_scale;
  }
  for (int64_t chunk = begin / s * s; chunk < end; chunk += s) {
    const int64_t j0 = std::max(chunk, begin), j1 = std::min(chunk + s, end);
    const int64_t page_id = pages[chunk / s];
    // Keys j of this chunk at kp + (j - chunk) * stride, values at vp + (j - chunk) * stride.
    const float *kp, *vp;
    int64_t stride = token_stride;
    if (p.bytes == nullptr) {
      kp = p.pages + page_id * s * token_stride + 2 * h * d;
      vp = kp + d;
    } else {  // dequantize the chunk's K/V of head h once, for all the group's query heads
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t tok = page_id * s + (j - chunk);
        const uint8_t* src = p.bytes + (tok * 2 * p.num_kv_heads + 2 * h) * d;
        const float sk = p.scales[tok * 2 * p.num_kv_heads + 2 * h], sv = p.scales[tok * 2 * p.num_kv_heads + 2 * h + 1];
        float* kd = kbuf.data() + (j - chunk) * d;
        float* vd = vbuf.data() + (j - chunk) * d;
        if (p.int8) {  // a plain conversion, which vectorizes (a table lookup does not)
          const int8_t* s8 = reinterpret_cast<const int8_t*>(src);
          for (int64_t i = 0; i < d; ++i) kd[i] = static_cast<float>(s8[i]) * sk;
          for (int64_t i = 0; i < d; ++i) vd[i] = static_cast<float>(s8[d + i]) * sv;
        } else {
          for (int64_t i = 0; i < d; ++i) kd[i] = p.lut[src[i]] * sk;
          for (int64_t i = 0; i < d; ++i) vd[i] = p.lut[src[d + i]] * sv;
        }
      }
      kp = kbuf.data();
      vp = vbuf.data();
      stride = d;
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qs.data() + g * d;
      float top = m[g];
      for (int64_t j = j0; j < j1; ++j) {
        const float* k = kp + (j - chunk) * stride;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; ++i) dot += qg[i] * k[i];
        if (p.soft_cap > 0.0f) dot = p.soft_cap * std::tanh(dot / p.soft_cap);
        scores[j - j0] = dot;
        top = std::max(top, dot);
      }
      const float corr = std::isinf(m[g]) ? 0.0f : std::exp(m[g] - top);
      float* a = acc.data() + g * d;
      for (int64_t i = 0; i < d; ++i) a[i] *= corr;
      float sum = 0.0f;
      for (int64_t j = j0; j < j1; ++j) {
        const float w = std::exp(scores[j - j0] - top);
        sum += w;
        const float* v = vp + (j - chunk) * stride;
        for (int64_t i = 0; i < d; ++i) a[i] += w * v[i];
      }
      l[g] = l[g] * corr + sum;
      m[g] = top;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* dst = p.out + (row * p.num_q_heads + h * group + g) * d;
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    for (int64_t i = 0; i < d; ++i) dst[i] = acc[g * d + i] * inv;
  }
}

void run_share(ggml_tensor* /*dst*/, int ith, int nth, void* userdata) {
  const Problem& p = *static_cast<const Problem*>(userdata);
  const int64_t n = static_cast<int64_t>(p.item_seq.size());
  for (int64_t item = ith; item < n; item += nth) attend(p, item);
}

// Below this many key visits (keys x KV heads summed over rows) one thread is faster than waking the pool.
constexpr int64_t kInlineWork = 1 << 15;

ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv_pages, ffi::Buffer<ffi::F32> scales,
                          ffi::Buffer<ffi::F32> lut, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                          ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                          float soft_cap, int64_t n_threads, int64_t poll) {
  const auto qd = q.dimensions(), pd = kv_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || (pd.size() != 4 && pd.size() != 5) || td.size() != 2) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: q [T, Hq, D], pool [(L,) P, S, 2Hkv, D], "
                                       "page_table [N, max_pages]");
  }
  const int64_t rows = qd[0], off = pd.size() - 4;
  Problem p;
  p.num_q_heads = qd[1];
  p.head_dim = qd[2];
  p.page_size = pd[off + 1];
  p.num_kv_heads = pd[off + 2] / 2;
  p.max_pages = td[1];
  const int64_t max_seqs = td[0], num_pages = pd[off];
  if (pd[off + 3] != p.head_dim || p.num_kv_heads == 0 || p.num_q_heads % p.num_kv_heads != 0 ||
      kv_lens.element_count() != max_seqs || cu_q_lens.element_count() != max_seqs + 1) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: inconsistent shapes");
  }
  const int64_t index = off == 1 ? layer.typed_data()[0] : 0;
  if (index < 0 || (off == 1 && index >= pd[0])) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: layer out of range");
  }
  const int64_t layer_values = num_pages * p.page_size * 2 * p.num_kv_heads * p.head_dim;
  const auto type = kv_pages.element_type();
  if (type == ffi::DataType::F32) {
    p.pages = static_cast<const float*>(kv_pages.untyped_data()) + index * layer_values;
  } else if (type == ffi::DataType::U8 || type == ffi::DataType::S8) {
    if (lut.element_count() != 256 || scales.element_count() * p.head_dim != kv_pages.element_count()) {
      return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: a byte pool needs scales [(L,) P, S, 2Hkv] "
                                         "and a 256-entry lut");
    }
    p.bytes = static_cast<const uint8_t*>(kv_pages.untyped_data()) + index * layer_values;
    p.scales = scales.typed_data() + index * (layer_values / p.head_dim);
    p.lut = lut.typed_data();
    p.int8 = type == ffi::DataType::S8;
  } else {
    return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: the pool must be f32, u8 or s8");
  }
  p.q = q.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.page_table = page_table.typed_data();
  p.out = out->typed_data();
  p.window = window.typed_data()[0];
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  std::fill(p.out, p.out + out->element_count(), 0.0f);

  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t n_seqs = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, max_seqs);
  p.row_pos.assign(rows, 0);
  int64_t work = 0;
  for (int64_t seq = 0; seq < n_seqs; ++seq) {
    const int64_t first = std::max<int64_t>(cu[seq], 0), last = std::min<int64_t>(cu[seq + 1], rows);
    const int64_t kv_len = p.kv_lens[seq];
    if (kv_len > p.max_pages * p.page_size || kv_len < cu[seq + 1] - cu[seq]) {
      return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: a kv_len exceeds its pages or its rows");
    }
    for (int64_t i = 0; i < (kv_len + p.page_size - 1) / p.page_size; ++i) {
      const int32_t page = p.page_table[seq * p.max_pages + i];
      if (page < 0 || page >= num_pages) {
        return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: a page id is out of the pool");
      }
    }
    for (int64_t row = first; row < last; ++row) {
      p.row_pos[row] = static_cast<int32_t>(kv_len - (cu[seq + 1] - row));
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        p.item_seq.push_back(static_cast<int32_t>(seq));
        p.item_row.push_back(static_cast<int32_t>(row * p.num_kv_heads + h));
      }
      work += (p.row_pos[row] + 1) * p.num_kv_heads;
    }
  }
  if (work < kInlineWork || n_threads <= 1) {
    for (int64_t item = 0; item < static_cast<int64_t>(p.item_seq.size()); ++item) attend(p, item);
    return ffi::Error::Success();
  }
  alignas(64) static thread_local uint8_t arena[4 * 1024];
  ggml_init_params init = {sizeof(arena), arena, /*no_alloc=*/true};
  ggml_context* ctx = ggml_init(init);
  ggml_tensor* task = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, nullptr, 0, run_share,
                                     static_cast<int>(n_threads), &p);
  static thread_local float sink;
  task->data = &sink;
  ggml_cgraph* graph = ggml_new_graph_custom(ctx, 2, false);
  ggml_build_forward_expand(graph, task);
  const ggml_status status = jaxllm_ggml_compute(graph, static_cast<int>(n_threads), static_cast<int>(poll));
  ggml_free(ctx);
  if (status != GGML_STATUS_SUCCESS) return ffi::Error::Internal("jaxllm_cpu_paged_attention: ggml compute failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));
