// XLA FFI custom call "jaxllm_cpu_paged_attention": reference.py's ragged paged attention for CPU, over
// a float32 pool or an int8 / float8 QuantizedPages pool, built into the ggml extension
// (pallas_kernels/quantized_matmul/build.py).
//
//   q:          f32 [T, Hq, D]
//   kv_pages:   f32 or bf16 [(L,) P, S, 2 * Hkv, D]   K of head h at 2h, V at 2h + 1 (write_kv's layout), or
//               the bytes of a QuantizedPages pool (u8 / s8), read as value(byte) * scales[token, 2h (+1)]
//   scales:     f32 [(L,) P, S, 2 * Hkv] of a byte pool (else unused)
//   lut:        f32 [256], a u8 (float8 bits) pool's value of each byte; s8 bytes convert directly
//   layer:      s32 scalar, the layer of a stacked pool
//   kv_lens:    s32 [N]          page_table: s32 [N, max_pages]
//   cu_q_lens:  s32 [N + 1]      num_seqs: s32 [1]
//   window:     s32 scalar, a sliding window (<= 0: none)
//   out:        f32 [T, Hq, D]; rows past cu_q_lens[num_seqs] are zero
//   attrs:      sm_scale, soft_cap (0: none), amx_bf16 (1: bf16 pools may take the tile units), n_threads, poll
//
// Why: XLA:CPU runs the reference as a loop of gathers, transposes and small dots, ~90 us per layer per
// 128 keys even for one decode row (a 1-row step of SmolLM2 at 1,000 tokens of context spent 28 ms in
// attention). Here each (row, KV head) walks only its own keys, page by page, reading the pool in
// place. Keys are taken in tiles of 16 at absolute positions (within a page) with an online softmax, so
// a row's result does not depend on the other rows of the step (batch invariance). A tile's 16 scores
// are one vector (GCC/Clang vector extensions, no intrinsics: AVX-512, AVX2 or scalar code, whatever
// the build targets); each key row is read once for its group's query heads. All but tiny steps split
// the items (up to kRows consecutive rows of a sequence, one KV head) over ggml's thread pool. bfloat16
// pools on CPUs with AMX-BF16 take attend_amx instead, on the tile units (its comment says how).
//
// The file also holds "jaxllm_cpu_write_kv", write_kv for bfloat16 pools in place (see WriteKv).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef JAXLLM_AMX_BF16
#include <immintrin.h>
#endif

#include "amx_tiles.h"
#include "cpu_vectors.h"
#include "ggml_runtime.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 4;  // rows of one sequence per item, sharing each gathered tile

// attend_amx: rows of one lane group (as many query rows as fill 16 lanes with their group's heads), and
// the most lane groups one item takes
inline int64_t lane_group_rows(int64_t group) { return std::max<int64_t>(1, 16 / group); }
constexpr int64_t kMaxLaneGroups = 8;

// A unit of work: `count` consecutive rows (from `row`) of sequence `seq`, for KV heads `kv_head` ..
// `kv_head + heads - 1` (heads > 1 only for attend_amx: a decode row's query heads fill one tile).
struct Item {
  int32_t seq, kv_head, row, count, heads = 1;
};

struct Problem {
  const float* q;
  const float* pages = nullptr;   // this layer's float pool, or its bfloat16 pool, or
  const uint16_t* bf16 = nullptr;
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
  std::vector<Item> items;
  std::vector<int32_t> row_pos;  // each row's position in its sequence
  bool amx = false;              // items go to attend_amx
  mutable std::atomic<int64_t> next_item{0};  // the pool's threads take items in turn as they finish

  // The first key a row at position `pos` attends to: its sliding window's start, or 0.
  int64_t first_key(int64_t pos) const { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }
};

constexpr int kTile = 16;  // keys per softmax update: one vector of 16 scores

// n (a multiple of 16) bfloat16 values -> float32: each is the high half of its float's bits.
inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kTile) {
    u16x16 h;
    __builtin_memcpy(&h, src + i, sizeof(h));
    const v16 f = reinterpret_cast<v16>(__builtin_convertvector(h, u16x32) << 16);
    __builtin_memcpy(dst + i, &f, sizeof(f));
  }
}

// The 16 lane sums of 16 vectors, as one vector (lane j: the sum of v[j]'s lanes): a tree of pairwise
// half-swaps (30 two-source shuffles, 15 adds) instead of 16 horizontal reductions.
inline v16 sum_lanes16(const v16* v) {
  v16 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {
    a[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * k], v[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int k = 0; k < 4; ++k) {
    b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int k = 0; k < 2; ++k) {
    c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Per-thread scratch, grown on first use (no allocation per item).
struct Scratch {
  std::vector<v16> qs, acc, part;  // per (row, head): q, its output sums (d / 16 vectors each); per key of
                                   // the tile, the 16 partial products of its score
  std::vector<float> m, l, kbuf, vbuf;
};

// Attention of up to kRows consecutive rows of one sequence, for the query heads of one KV head (a
// group), over the sequence's keys in tiles of kTile keys at absolute positions (page-aligned). Each
// tile's K / V rows are gathered once for all of the item's rows, whose updates interleave (independent
// chains for the out-of-order core); each row's arithmetic is what it would be alone, so a row's
// result does not depend on the other rows of the step (batch invariance).
// DV = head_dim / 16 (the compiler unrolls and keeps a head's sums in registers); 0: any, at run time.
template <int DV>
void attend(const Problem& p, int64_t item) {
  const Item it = p.items[item];
  const int64_t seq = it.seq, h = it.kv_head, rows = it.count;
  const int64_t group = p.num_q_heads / p.num_kv_heads, d = p.head_dim, s = p.page_size;
  const int64_t dv = DV > 0 ? DV : d / kTile, heads = rows * group;
  const int64_t kv_len = p.kv_lens[seq];
  int64_t ends[kRows];
  for (int64_t r = 0; r < rows; ++r) ends[r] = std::min<int64_t>(p.row_pos[it.row + r] + 1, kv_len);
  const int64_t end = ends[rows - 1];  // rows are consecutive positions
  // a window's rows start apart (items of one row, see PagedAttention)
  const int64_t begin = p.first_key(p.row_pos[it.row]);
  const int32_t* pages = p.page_table + seq * p.max_pages;
  const int64_t token_stride = 2 * p.num_kv_heads * d;
  static thread_local Scratch sc;
  sc.qs.resize(heads * dv);
  sc.acc.assign(heads * dv, v16{});
  sc.part.assign(kTile, v16{});
  sc.m.assign(heads, -std::numeric_limits<float>::infinity());
  sc.l.assign(heads, 0.0f);
  sc.kbuf.resize(kTile * d);
  sc.vbuf.resize(kTile * d);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < group; ++g) {
      const float* src = p.q + ((it.row + r) * p.num_q_heads + h * group + g) * d;
      for (int64_t c = 0; c < dv; ++c) sc.qs[(r * group + g) * dv + c] = load(src + c * kTile) * p.sm_scale;
    }
  }
  const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const float* krows[kTile];
  const float* vrows[kTile];
  for (int64_t t0 = begin; t0 < end;) {
    const int64_t chunk = t0 / s * s;
    const int64_t n_all = std::min<int64_t>({kTile, end - t0, chunk + s - t0});
    const int64_t page_id = pages[chunk / s];
    for (int64_t j = 0; j < n_all; ++j) {  // the tile's K and V rows (a bf16 / byte pool's widened)
      const int64_t tok = page_id * s + (t0 - chunk + j);
      if (p.pages != nullptr) {
        krows[j] = p.pages + tok * token_stride + 2 * h * d;
        vrows[j] = krows[j] + d;
        continue;
      }
      float* kd = sc.kbuf.data() + j * d;
      float* vd = sc.vbuf.data() + j * d;
      if (p.bf16 != nullptr) {
        const uint16_t* src = p.bf16 + tok * token_stride + 2 * h * d;
        widen_bf16(src, kd, d);
        widen_bf16(src + d, vd, d);
      } else {
        const uint8_t* src = p.bytes + (tok * 2 * p.num_kv_heads + 2 * h) * d;
        const float sk = p.scales[tok * 2 * p.num_kv_heads + 2 * h], sv = p.scales[tok * 2 * p.num_kv_heads + 2 * h + 1];
        if (p.int8) {  // a plain conversion, which vectorizes (a table lookup does not)
          const int8_t* s8 = reinterpret_cast<const int8_t*>(src);
          for (int64_t i = 0; i < d; ++i) kd[i] = static_cast<float>(s8[i]) * sk;
          for (int64_t i = 0; i < d; ++i) vd[i] = static_cast<float>(s8[d + i]) * sv;
        } else {
          for (int64_t i = 0; i < d; ++i) kd[i] = p.lut[src[i]] * sk;
          for (int64_t i = 0; i < d; ++i) vd[i] = p.lut[src[d + i]] * sv;
        }
      }
      krows[j] = kd;
      vrows[j] = vd;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = std::min<int64_t>(n_all, ends[r] - t0);  // this row's keys of the tile
      if (n <= 0) continue;
      for (int64_t g = r * group; g < (r + 1) * group; ++g) {
        // Per key, 16 partial products of its score (the lane sums come after, for all keys at once).
        const v16* qg = sc.qs.data() + g * dv;
        v16* part = sc.part.data();
        for (int64_t j = 0; j < n; ++j) {
          v16 acc = qg[0] * load(krows[j]);
          for (int64_t c = 1; c < dv; ++c) acc += qg[c] * load(krows[j] + c * kTile);
          part[j] = acc;
        }
        for (int64_t j = n; j < kTile; ++j) part[j] = v16{};
        v16 score = sum_lanes16(part);
        if (p.soft_cap > 0.0f) {
          for (int j = 0; j < kTile; ++j) score[j] = p.soft_cap * std::tanh(score[j] / p.soft_cap);
        }
        score = lane < static_cast<int32_t>(n) ? score : splat(-std::numeric_limits<float>::infinity());
        const float top = std::max(sc.m[g], lane_max(score));
        const v16 w = exp_nonpositive(score - top);  // masked lanes: exp(-inf) = 0
        const float corr = std::isinf(sc.m[g]) ? 0.0f : std::exp(sc.m[g] - top);
        sc.l[g] = sc.l[g] * corr + lane_sum(w);
        sc.m[g] = top;
        // This head's output sums, in registers for the tile (two sets: keys alternate between them).
        v16* out = sc.acc.data() + g * dv;
        v16 a0[DV > 0 ? DV : 16], a1[DV > 0 ? DV : 16];
        for (int64_t c = 0; c < dv; ++c) a0[c] = out[c] * corr, a1[c] = v16{};
        int64_t j = 0;
        for (; j + 1 < n; j += 2) {
          const float w0 = w[j], w1 = w[j + 1];
          for (int64_t c = 0; c < dv; ++c) {
            a0[c] += w0 * load(vrows[j] + c * kTile);
            a1[c] += w1 * load(vrows[j + 1] + c * kTile);
          }
        }
        if (j < n) {
          for (int64_t c = 0; c < dv; ++c) a0[c] += w[j] * load(vrows[j] + c * kTile);
        }
        for (int64_t c = 0; c < dv; ++c) out[c] = a0[c] + a1[c];
      }
    }
    t0 += n_all;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = r * group + g;
      float* dst = p.out + ((it.row + r) * p.num_q_heads + h * group + g) * d;
      const float inv = sc.l[head] > 0.0f ? 1.0f / sc.l[head] : 0.0f;
      for (int64_t c = 0; c < dv; ++c) {
        const v16 o = sc.acc[head * dv + c] * inv;
        __builtin_memcpy(dst + c * kTile, &o, sizeof(o));
      }
    }
  }
}

void attend_any(const Problem& p, int64_t item) {
  switch (p.head_dim) {
    case 64: return attend<4>(p, item);
    case 128: return attend<8>(p, item);
    case 256: return attend<16>(p, item);
    default: return attend<0>(p, item);
  }
}

#ifdef JAXLLM_AMX_BF16
// bfloat16 pools on CPUs with AMX: the item's query rows x heads (up to 16 "lanes") against 16 keys at
// a time on the tile units, K read from the pool as it lies:
//   S^T [16 keys, 16 lanes] = K [16 keys, D] . Q^T     (Q rounded to bf16 once per item)
//   softmax down each lane (one vector per key: no lane reductions), exactly by chunks of kChunk keys
//   at absolute positions: the chunk's max per lane, its weights P = exp(S - max) rounded to bf16, and
//   out = out * exp(old max - new max) + P . V    (float32 accumulation in the tiles)
// A decode row's item takes several KV heads (lanes = heads x group, up to 16): each head's K . Q^T and
// P . V accumulate into the same tiles, its Q^T and P holding zeros in the other heads' lanes, so the
// softmax and the weights' pass run once per key for all of them (16 rows over 230 keys: 12.9 -> 9.7 ms).
// Each lane's arithmetic involves its own query row only (other heads add exact zeros), and chunks and
// tiles sit at absolute key positions, so a row's result is the same in any item and any step (batch
// invariance).
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

constexpr int kChunk = 256;

// The product's column order (V's pairs come from in-lane unpacks): in each 32 of d, tile column x
// holds d 8 * (x % 16 / 4) + 4 * (x / 16) + x % 4, i.e. columns 4L..4L+3 of the even tile hold d
// 8L..8L+3 and those of the odd tile 8L+4..8L+7.

// One lane group's queries and running softmax state.
struct LaneGroup {
  alignas(64) int32_t first[16];  // each lane's keys: [first, last)
  alignas(64) int32_t last[16];
  alignas(64) float m[16];        // the running max and sum of weights, per lane
  alignas(64) float l[16];
  int64_t row, lanes;
};

struct AmxScratch {
  std::vector<LaneGroup> groups;
  std::vector<uint16_t> qt;   // per lane group and KV head: Q^T as D / 32 B tiles [16 d pairs][16 lanes][2],
                              // zero in the other heads' lanes
  std::vector<float> st;      // two lane groups' S^T of a chunk [2][kChunk + 16][16] (a tile's spare rows
                              // land past its keys)
  std::vector<uint16_t> pa;   // per KV head: P as kChunk / 32 A tiles [16 lanes][32 keys], zero in the
                              // other heads' lanes
  std::vector<uint16_t> vb;   // per KV head: V as (kChunk / 32) x (D / 16) B tiles [16 key pairs][16 d][2]
  std::vector<uint16_t> kpad; // a tile cut short by its page, zero-padded [16][D]
  std::vector<float> out;     // per lane group [16][D]: the lanes' running sums
  std::vector<float> pv;      // [16][D]: a chunk's product
  const uint16_t* krows[kChunk];  // the chunk's K and V rows in the pool
  const uint16_t* vrows[kChunk];
};

// exp(x) for x <= 0 to ~5e-5 (a degree-4 polynomial: the weights are rounded to bf16, 2^-9, after), or
// -inf -> 0: 9 instructions where exp_nonpositive takes ~20; the weights' exp is the kernel's largest
// cost.
AMX_TARGET inline __m512 exp_weights(__m512 x) {
  const __m512 t = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), t);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24), r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ), p, n);
}

// The 16 x 16 transpose of 32-bit lanes, in place: r[j] lane i <- r[i] lane j. In 4 x 4 blocks of rows
// within each 128-bit lane (unpacks of 32, then 64 bits), then the 4 x 4 transpose of those lanes.
AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], 128-bit lane L: column 4L + c of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
    t[12 + c] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// A tile of K rows for keys [t, t + n) of a chunk, of the KV head `head` places past the item's first
// (n < 16: copied to `pad`, zero-filled: rows past the page are not ours to read); *ld: its row stride
// in elements.
AMX_TARGET inline const uint16_t* key_tile(const AmxScratch& sc, int64_t c0, int64_t t, int64_t n, int64_t d,
                                           int64_t stride, int64_t head, uint16_t* pad, int64_t* ld) {
  if (n == 16) {
    *ld = stride;
    return sc.krows[t - c0] + 2 * head * d;
  }
  for (int64_t r = 0; r < 16; ++r) {
    if (r < n) std::copy(sc.krows[t - c0 + r] + 2 * head * d, sc.krows[t - c0 + r] + 2 * head * d + d, pad + r * d);
    else std::fill(pad + r * d, pad + (r + 1) * d, 0);
  }
  *ld = d;
  return pad;
}

// A decode row's item (the only one to read its keys, from memory): the K and V rows (`bytes` of them
// per key) of keys [from, to) are requested ahead of their tiles; the paged rows are strided, which the
// hardware prefetcher follows poorly (16 decode rows over 579 keys: 27 -> 19 ms, when V was paired after
// the chunk's scores). Since V is paired first, for all lane groups, only the K rows are still ahead
// then; with 8 rows over 800 keys bound by memory bandwidth, these prefetches, other hints (T1, NTA) or
// none measured the same (2026-12-03).
inline void prefetch_keys(const AmxScratch& sc, int64_t c0, int64_t from, int64_t to, int64_t bytes) {
  for (int64_t r = from; r < to; ++r) {
    const char* row = reinterpret_cast<const char*>(sc.krows[r - c0]);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
}

// The keys' tile length at t: to the next 16, the group's end k1 or the page's end.
inline int64_t tile_len(int64_t t, int64_t k1, int64_t s) {
  return std::min<int64_t>({16 - t % 16, k1 - t, s - t % s});
}

// S^T of one KV head's keys [k0, k1) for one lane group (head_dim <= 128), into st: Q^T stays in
// tiles 2, 3, 6, 7 for the chunk and two key tiles are taken at a time, into tiles 0 and 4, so that
// two chains of products are in flight (one chain waited on each product, ~1/3 of the kernel's time
// for 37 rows over 533 keys). Each tile's sums take the same steps in the same order as one tile
// alone: the same bits.
AMX_TARGET void pair_scores(const Problem& p, AmxScratch& sc, int64_t c0, int64_t k0, int64_t k1, const uint16_t* qt,
                            float* st, bool prefetch) {
  const int64_t d = p.head_dim, s = p.page_size, stride = 2 * p.num_kv_heads * d;
  _tile_loadd(2, qt, 64);
  if (d > 32) _tile_loadd(3, qt + 32 * 16, 64);
  if (d > 64) _tile_loadd(6, qt + 64 * 16, 64);
  if (d > 96) _tile_loadd(7, qt + 96 * 16, 64);
  uint16_t* pad0 = sc.kpad.data();
  uint16_t* pad1 = pad0 + 16 * d;
  for (int64_t t = k0; t < k1;) {
    const int64_t n0 = tile_len(t, k1, s), t1 = t + n0;
    const int64_t n1 = t1 < k1 ? tile_len(t1, k1, s) : 0;
    if (prefetch) prefetch_keys(sc, c0, t1 + n1, std::min<int64_t>(t1 + n1 + 32, k1), 4 * d);
    int64_t lda, ldb = 0;
    const uint16_t* a = key_tile(sc, c0, t, n0, d, stride, 0, pad0, &lda);
    const uint16_t* b = n1 ? key_tile(sc, c0, t1, n1, d, stride, 0, pad1, &ldb) : nullptr;
    _tile_zero(0);
    _tile_zero(4);
    // (with d <= 64 the second 32 of d loads into tiles 6, 7, free then, so no load waits on a product)
    _tile_loadd(1, a, lda * 2);
    if (b) _tile_loadd(5, b, ldb * 2);
    _tile_dpbf16ps(0, 1, 2);
    if (b) _tile_dpbf16ps(4, 5, 2);
    if (d == 64) {
      _tile_loadd(6, a + 32, lda * 2);
      if (b) _tile_loadd(7, b + 32, ldb * 2);
      _tile_dpbf16ps(0, 6, 3);
      if (b) _tile_dpbf16ps(4, 7, 3);
    } else {
      for (int64_t c = 32; c < d; c += 32) {
        _tile_loadd(1, a + c, lda * 2);
        if (b) _tile_loadd(5, b + c, ldb * 2);
        if (c == 32) {
          _tile_dpbf16ps(0, 1, 3);
          if (b) _tile_dpbf16ps(4, 5, 3);
        } else if (c == 64) {
          _tile_dpbf16ps(0, 1, 6);
          if (b) _tile_dpbf16ps(4, 5, 6);
        } else {
          _tile_dpbf16ps(0, 1, 7);
          if (b) _tile_dpbf16ps(4, 5, 7);
        }
      }
    }
    _tile_stored(0, st + (t - c0) * 16, 64);
    if (b) _tile_stored(4, st + (t1 - c0) * 16, 64);
    t = t1 + n1;
  }
}

// S^T of one key tile at a time for two lane groups (head_dim <= 64): both groups' Q^T stay in tiles
// (2, 3 and 6, 7) and each key tile is loaded once for both, where pair_scores loads it per group. Each
// tile's sums take the same steps as pair_scores': the same bits (harness, one thread: 30 rows over 766
// keys 234 -> 221 us a layer, 48 over 430 209 -> 194, 64 over 900 599 -> 519; whole SmolLM2 steps, where
// attention is ~1/5, moved within their noise).
AMX_TARGET void shared_scores(const Problem& p, AmxScratch& sc, int64_t c0, int64_t k0, int64_t k1,
                              const uint16_t* qt0, const uint16_t* qt1, float* st0, float* st1) {
  const int64_t d = p.head_dim, s = p.page_size, stride = 2 * p.num_kv_heads * d;
  _tile_loadd(2, qt0, 64);
  _tile_loadd(6, qt1, 64);
  if (d > 32) {
    _tile_loadd(3, qt0 + 32 * 16, 64);
    _tile_loadd(7, qt1 + 32 * 16, 64);
  }
  for (int64_t t = k0; t < k1;) {
    const int64_t n = tile_len(t, k1, s);
    int64_t ld;
    const uint16_t* a = key_tile(sc, c0, t, n, d, stride, 0, sc.kpad.data(), &ld);
    _tile_zero(0);
    _tile_zero(4);
    _tile_loadd(1, a, ld * 2);
    if (d > 32) _tile_loadd(5, a + 32, ld * 2);
    _tile_dpbf16ps(0, 1, 2);
    _tile_dpbf16ps(4, 1, 6);
    if (d > 32) {
      _tile_dpbf16ps(0, 5, 3);
      _tile_dpbf16ps(4, 5, 7);
    }
    _tile_stored(0, st0 + (t - c0) * 16, 64);
    _tile_stored(4, st1 + (t - c0) * 16, 64);
    t += n;
  }
}

// kMulti: the item may hold several KV heads (a decode row); compiled apart so that one-head items keep
// the loops of a single head (their prefill ran ~10 % slower through the general ones).
// A one-head item holds up to kMaxLaneGroups lane groups of consecutive rows of one sequence: a chunk's
// K and V rows are fetched and V paired once for all of them, the later groups reading K from cache.
// Each group's lanes take exactly the steps of that group alone (its own keys, chunks and tiles): the
// shared V pairs hold keys another group owns where a group alone holds zeros, and those keys' weights
// are 0 in its P, so its products add the same zeros.
template <bool kMulti>
AMX_TARGET void attend_amx_heads(const Problem& p, int64_t item) {
  const Item it = p.items[item];
  const int64_t seq = it.seq, h = it.kv_head, group = p.num_q_heads / p.num_kv_heads, d = p.head_dim;
  const int64_t heads = kMulti ? it.heads : 1, per_row = group * heads;
  // a lane's KV head, counted from h
  const auto head_of = [&](int64_t lane) -> int64_t { return kMulti ? lane % per_row / group : 0; };
  const int64_t group_rows = kMulti ? 1 : lane_group_rows(group);
  const int64_t num_groups = (it.count + group_rows - 1) / group_rows;
  const int64_t s = p.page_size, kv_len = p.kv_lens[seq];
  const int64_t stride = 2 * p.num_kv_heads * d;  // between consecutive tokens' rows
  const int32_t* pages = p.page_table + seq * p.max_pages;
  static thread_local AmxScratch tls;
  // one thread-local lookup per item: opaque to the compiler, which would otherwise look it up again
  // inside the loops (a library's thread-locals are found by a call)
  AmxScratch* scratch = &tls;
  asm("" : "+r"(scratch));
  AmxScratch& sc = *scratch;
  // Lanes are (row, head, query of the group); each head's Q^T and P tiles hold only its own lanes, so
  // its products add exact zeros to the others' (a lane's result is the same in any item).
  sc.groups.resize(num_groups);
  sc.qt.assign(num_groups * heads * d * 16, 0);
  sc.st.resize(2 * (kChunk + 16) * 16);
  sc.pa.resize(heads * kChunk * 16);
  sc.vb.resize(heads * kChunk * d);
  sc.kpad.resize(2 * 16 * d);
  sc.out.assign(num_groups * 16 * d, 0.0f);
  sc.pv.resize(16 * d);
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    LaneGroup& lg = sc.groups[gi];
    lg.row = it.row + gi * group_rows;
    lg.lanes = std::min<int64_t>(group_rows, it.count - gi * group_rows) * per_row;
    for (int64_t j = 0; j < 16; ++j) {
      lg.first[j] = lg.last[j] = 0;
      lg.m[j] = -std::numeric_limits<float>::infinity();
      lg.l[j] = 0.0f;
      if (j >= lg.lanes) continue;
      const int64_t row = lg.row + j / per_row, hh = head_of(j), g = j % group;
      const int64_t pos = p.row_pos[row];
      lg.last[j] = static_cast<int32_t>(std::min<int64_t>(pos + 1, kv_len));
      lg.first[j] = static_cast<int32_t>(p.first_key(pos));
      // the lane's q as bf16 pairs (32-bit), spread down column j of its head's Q^T tiles
      const float* q = p.q + (row * p.num_q_heads + (h + hh) * group + g) * d;
      uint32_t* qt = reinterpret_cast<uint32_t*>(sc.qt.data()) + (gi * heads + hh) * d * 8;
      for (int64_t c = 0; c < d; c += 32) {
        alignas(64) uint32_t pairs[16];
        _mm512_store_si512(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + c + 16), _mm512_loadu_ps(q + c))));
        for (int64_t dp = 0; dp < 16; ++dp) qt[(c / 32) * 256 + dp * 16 + j] = pairs[dp];
      }
    }
  }
  // the item's keys: rows are consecutive positions, so the first lane's first and the last lane's last
  const int64_t begin = sc.groups[0].first[0], end = sc.groups[num_groups - 1].last[sc.groups[num_groups - 1].lanes - 1];
  if (kMulti && heads > 1) {  // the lanes' rows of every P tile a chunk writes start at zero
    const int64_t lanes = sc.groups[0].lanes;
    const int64_t blocks = std::min<int64_t>(kChunk, end - begin / kChunk * kChunk + 31) / 32;
    for (int64_t hh = 0; hh < heads; ++hh) {
      for (int64_t b = 0; b < blocks; ++b) {
        std::fill_n(sc.pa.data() + hh * kChunk * 16 + b * 512, lanes * 32, uint16_t{0});
      }
    }
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // pairs the two 16-value halves of one vector of 32 bf16 as the 32-bit lanes of a tile row
  const __m512i lanes_paired = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t c0 = begin / kChunk * kChunk; c0 < end; c0 += kChunk) {
    const int64_t u0 = std::max(c0, begin), u1 = std::min<int64_t>(c0 + kChunk, end);  // the item's keys here
    // each key's K row (V follows it), one page lookup per page
    for (int64_t t = u0; t < u1;) {
      const int64_t page_first = t / s * s, n = std::min(page_first + s, u1) - t;
      const uint16_t* k = p.bf16 + (static_cast<int64_t>(pages[t / s]) * s + t - page_first) * stride + 2 * h * d;
      for (int64_t j = 0; j < n; ++j) sc.krows[t - c0 + j] = k + j * stride, sc.vrows[t - c0 + j] = k + j * stride + d;
      t += n;
    }
    // (V[2kp][i], V[2kp+1][i]) pairs by in-lane unpacks, by blocks of 32 keys (keys outside [u0, u1):
    // zeros): columns of d come out permuted within each 32 (the product's column order, above), the
    // product's columns with them, undone when the item's output is written
    for (int64_t b = (u0 - c0) / 32; b < (u1 - c0 + 31) / 32; ++b) {
      for (int64_t kp = 0; kp < 16; ++kp) {
        const uint16_t* vrow[2];
        for (int e = 0; e < 2; ++e) {
          const int64_t t = c0 + b * 32 + 2 * kp + e;
          vrow[e] = t >= u0 && t < u1 ? sc.vrows[t - c0] : nullptr;
        }
        for (int64_t hh = 0; hh < heads; ++hh) {
          uint16_t* vdst = sc.vb.data() + hh * kChunk * d + (b * (d / 16)) * 512 + kp * 32;
          for (int64_t c = 0; c < d; c += 32) {
            const __m512i v0 = vrow[0] ? _mm512_loadu_si512(vrow[0] + 2 * hh * d + c) : _mm512_setzero_si512();
            const __m512i v1 = vrow[1] ? _mm512_loadu_si512(vrow[1] + 2 * hh * d + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(vdst + (c / 16) * 512, _mm512_unpacklo_epi16(v0, v1));
            _mm512_storeu_si512(vdst + (c / 16 + 1) * 512, _mm512_unpackhi_epi16(v0, v1));
          }
        }
      }
    }
    // the keys of lane group gi in this chunk
    const auto keys_of = [&](int64_t gi, int64_t* k0, int64_t* k1) {
      const LaneGroup& lg = sc.groups[gi];
      *k0 = std::max<int64_t>(c0, lg.first[0]);
      *k1 = std::min<int64_t>(c0 + kChunk, lg.last[lg.lanes - 1]);
    };
    const auto st_of = [&](int64_t gi) { return sc.st.data() + gi % 2 * (kChunk + 16) * 16; };
    // S^T of groups gi and gi + 1 in this chunk: one load of each key tile for both where head_dim
    // allows (a key only one of them has scores a row the other never reads); one-head items only
    const bool scores_by_pairs = !kMulti && d <= 128;
    const auto scores_of_pair = [&](int64_t gi) {
      int64_t k0, k1, j0 = 0, j1 = 0;
      keys_of(gi, &k0, &k1);
      if (gi + 1 < num_groups) keys_of(gi + 1, &j0, &j1);
      const uint16_t* q0 = sc.qt.data() + gi * d * 16;
      if (d <= 64 && k0 < k1 && j0 < j1) {
        shared_scores(p, sc, c0, std::min(k0, j0), std::max(k1, j1), q0, q0 + d * 16, st_of(gi), st_of(gi + 1));
        return;
      }
      if (k0 < k1) pair_scores(p, sc, c0, k0, k1, q0, st_of(gi), it.count == 1);
      if (j0 < j1) pair_scores(p, sc, c0, j0, j1, q0 + d * 16, st_of(gi + 1), it.count == 1);
    };
    for (int64_t gi = 0; gi < num_groups; ++gi) {
      if (scores_by_pairs && gi % 2 == 0) scores_of_pair(gi);
      LaneGroup& lg = sc.groups[gi];
      const int64_t lanes = lg.lanes;
      int64_t k0, k1;
      keys_of(gi, &k0, &k1);
      if (k0 >= k1) continue;  // none of the group's keys in this chunk (a group alone never visits it)
      const uint16_t* qt = sc.qt.data() + gi * heads * d * 16;
      float* st = st_of(gi);
      // S^T of the chunk's keys, a tile at a time (a tile stays inside one page), unless scores_of_pair
      // took them
      if (!scores_by_pairs) {
        for (int64_t t = k0; t < k1;) {
          const int64_t n = tile_len(t, k1, s);
          if (it.count == 1) prefetch_keys(sc, c0, t + n, std::min<int64_t>(t + n + 16, k1), heads * 4 * d);
          _tile_zero(0);
          for (int64_t hh = 0; hh < heads; ++hh) {
            int64_t ld;
            const uint16_t* k = key_tile(sc, c0, t, n, d, stride, hh, sc.kpad.data(), &ld);
            for (int64_t c = 0; c < d; c += 32) {
              _tile_loadd(1, k + c, ld * 2);
              _tile_loadd(2, qt + hh * d * 16 + c * 16, 64);
              _tile_dpbf16ps(0, 1, 2);
            }
          }
          _tile_stored(0, st + (t - c0) * 16, 64);
          t += n;
        }
      }
      // the chunk's max per lane, over its own keys
      const __m512i firstv = _mm512_load_si512(lg.first), lastv = _mm512_load_si512(lg.last);
      __m512 top = neg_inf;
      const __m512 scale = _mm512_set1_ps(p.sm_scale);
      for (int64_t t = k0; t < k1; ++t) {
        const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(t));
        const __mmask16 own = _mm512_cmpge_epi32_mask(key, firstv) & _mm512_cmplt_epi32_mask(key, lastv);
        const __m512 score = _mm512_mask_mul_ps(neg_inf, own, _mm512_loadu_ps(st + (t - c0) * 16), scale);
        _mm512_storeu_ps(st + (t - c0) * 16, score);
        top = _mm512_max_ps(top, score);
      }
      const __m512 m = _mm512_load_ps(lg.m);
      const __m512 m_new = _mm512_max_ps(m, top);
      const __mmask16 live = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ);  // lanes with a key so far
      const __m512 shift = _mm512_maskz_mov_ps(live, m_new);
      const __m512 corr = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, neg_inf, _CMP_NEQ_OQ),
                                              reinterpret_cast<__m512>(exp_nonpositive(reinterpret_cast<v16>(_mm512_sub_ps(m, shift)))));
      // P (bf16, A tiles) by blocks of 32 keys; keys outside [k0, k1) weigh 0
      const int64_t b0 = (k0 - c0) / 32, b1 = (k1 - c0 + 31) / 32;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        __m512i cols[16];  // [key pair][lane]: P's bf16 pairs, transposed to [lane][key pair] below
        for (int64_t kp = 0; kp < 16; ++kp) {
          __m512 w[2];
          for (int e = 0; e < 2; ++e) {
            const int64_t t = c0 + b * 32 + 2 * kp + e;
            w[e] = t >= k0 && t < k1 ? exp_weights(_mm512_sub_ps(_mm512_loadu_ps(st + (t - c0) * 16), shift))
                                     : _mm512_setzero_ps();
            w[e] = _mm512_maskz_mov_ps(live, w[e]);
            sum = _mm512_add_ps(sum, w[e]);
          }
          const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[1], w[0]));  // [w0 lanes | w1 lanes]
          cols[kp] = _mm512_permutexvar_epi16(lanes_paired, both);
        }
        transpose16(cols);
        // each lane's row in its own head's tile; the other heads' rows stay zero, rows past the lanes
        // only feed product rows never read
        for (int64_t j = 0; j < lanes; ++j) {
          _mm512_storeu_si512(sc.pa.data() + head_of(j) * kChunk * 16 + b * 512 + j * 32, cols[j]);
        }
      }
      _mm512_store_ps(lg.l, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(lg.l), corr), sum));
      _mm512_store_ps(lg.m, m_new);
      // P . V for the chunk, 4 column tiles (64 of d) at a time; V's tiles load into 2, 0, 1, 2 in turn
      // (free after the scores), so that a load seldom waits for the product reading its register
      for (int64_t c = 0; c < d; c += 64) {
        const int64_t tiles = std::min<int64_t>(4, (d - c) / 16);
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t hh = 0; hh < heads; ++hh) {
            _tile_loadd(3, sc.pa.data() + hh * kChunk * 16 + b * 512, 64);
            const uint16_t* vt = sc.vb.data() + hh * kChunk * d + (b * (d / 16) + c / 16) * 512;
            _tile_loadd(2, vt, 64);
            _tile_dpbf16ps(4, 3, 2);
            if (tiles > 1) { _tile_loadd(0, vt + 512, 64); _tile_dpbf16ps(5, 3, 0); }
            if (tiles > 2) { _tile_loadd(1, vt + 1024, 64); _tile_dpbf16ps(6, 3, 1); }
            if (tiles > 3) { _tile_loadd(2, vt + 1536, 64); _tile_dpbf16ps(7, 3, 2); }
          }
        }
        _tile_stored(4, sc.pv.data() + c, d * 4);
        if (tiles > 1) _tile_stored(5, sc.pv.data() + c + 16, d * 4);
        if (tiles > 2) _tile_stored(6, sc.pv.data() + c + 32, d * 4);
        if (tiles > 3) _tile_stored(7, sc.pv.data() + c + 48, d * 4);
      }
      alignas(64) float corr_lanes[16];
      _mm512_store_ps(corr_lanes, corr);
      float* out = sc.out.data() + gi * 16 * d;
      for (int64_t j = 0; j < lanes; ++j) {
        const __m512 cj = _mm512_set1_ps(corr_lanes[j]);
        for (int64_t c = 0; c < d; c += 16) {
          float* o = out + j * d + c;
          _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), cj, _mm512_loadu_ps(sc.pv.data() + j * d + c)));
        }
      }
    }
  }
  // The product's column order undone for one 32 of d: two-source permutes of its halves (a: tile
  // columns 0-15, b: 16-31); a scalar loop here took ~1/8 of the kernel (37 rows over 533 keys).
  const __m512i kColumnsLow = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i kColumnsHigh = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    const LaneGroup& lg = sc.groups[gi];
    const float* out = sc.out.data() + gi * 16 * d;
    for (int64_t j = 0; j < lg.lanes; ++j) {
      const int64_t row = lg.row + j / per_row, hh = head_of(j), g = j % group;
      float* dst = p.out + (row * p.num_q_heads + (h + hh) * group + g) * d;
      const float inv = lg.l[j] > 0.0f ? 1.0f / lg.l[j] : 0.0f;
      const __m512 scale = _mm512_set1_ps(inv);
      for (int64_t c = 0; c < d; c += 32) {
        const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(out + j * d + c), scale);
        const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(out + j * d + c + 16), scale);
        _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(a, kColumnsLow, b));
        _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(a, kColumnsHigh, b));
      }
    }
  }
}

AMX_TARGET void attend_amx(const Problem& p, int64_t item) {
  if (p.items[item].heads > 1) {
    attend_amx_heads<true>(p, item);
  } else {
    attend_amx_heads<false>(p, item);
  }
}

// Whether a step takes attend_amx: a bf16 pool, AMX granted, whole 32-wide tiles of head_dim, up to
// 16 query heads per KV head, no soft cap (a vector tanh is not written).
bool amx_attention(const Problem& p, bool allowed) {
  return allowed && p.bf16 != nullptr && p.head_dim % 32 == 0 && p.num_q_heads / p.num_kv_heads <= 16 &&
         p.soft_cap == 0.0f && amx_tiles_granted();
}
#else
void attend_amx(const Problem&, int64_t) {}
bool amx_attention(const Problem&, bool) { return false; }
#endif

void run_share(ggml_tensor* /*dst*/, int /*ith*/, int /*nth*/, void* userdata) {
  const Problem& p = *static_cast<const Problem*>(userdata);
  const int64_t n = static_cast<int64_t>(p.items.size());
  // Items differ in cost (a decode row over a long context, a few prefill rows over a short one), so
  // a thread takes the next item when it is free rather than every nth: less waiting at ggml's
  // barrier. Each item writes only its own rows, so which thread ran it changes no bit.
  if (p.amx) {
    AmxTileScope tiles;
    for (int64_t item; (item = p.next_item.fetch_add(1, std::memory_order_relaxed)) < n;) attend_amx(p, item);
  } else {
    for (int64_t item; (item = p.next_item.fetch_add(1, std::memory_order_relaxed)) < n;) attend_any(p, item);
  }
}

// Below this many key visits (keys x KV heads summed over rows) one thread is faster than waking the pool.
constexpr int64_t kInlineWork = 1 << 12;

ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv_pages, ffi::Buffer<ffi::F32> scales,
                          ffi::Buffer<ffi::F32> lut, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                          ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                          float soft_cap, int64_t amx_bf16, int64_t n_threads, int64_t poll) {
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
  if (pd[off + 3] != p.head_dim || p.head_dim % 16 != 0 || p.num_kv_heads == 0 || p.num_q_heads % p.num_kv_heads != 0 ||
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
  } else if (type == ffi::DataType::BF16) {
    p.bf16 = static_cast<const uint16_t*>(kv_pages.untyped_data()) + index * layer_values;
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
    return ffi::Error::InvalidArgument("jaxllm_cpu_paged_attention: the pool must be f32, bf16, u8 or s8");
  }
  p.q = q.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.page_table = page_table.typed_data();
  p.out = out->typed_data();
  p.window = window.typed_data()[0];
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  std::fill(p.out, p.out + out->element_count(), 0.0f);
  p.amx = amx_attention(p, amx_bf16 != 0);

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
      work += (p.row_pos[row] + 1 - p.first_key(p.row_pos[row])) * p.num_kv_heads;
    }
    // a window's rows do not share the vector kernel's tiles; attend_amx masks each lane's keys and
    // takes several lane groups per item: the sequence's lane groups of a KV head split evenly into
    // as many items as leave each thread ~2 of this sequence. Every item pairs V and reads K for all
    // its keys, so fewer items repeat less of that, and equal ones end together: 30 rows over 766 keys
    // went from 9 items (10 rows each, threads 5 / 4) to 6 (15 rows, 3 / 3), 256 -> 236 us of work a
    // layer on one thread (harness); whole SmolLM2 steps of 20 / 30 / 48 new rows over 400 / 736 / 400
    // cached keys, 2 threads: 15.9 / 20.9 / 23.8 -> 15.2 / 20.5 / 23.4 ms (two alternated runs each).
    const int64_t group = p.num_q_heads / p.num_kv_heads, lane_groups = (last - first + lane_group_rows(group) - 1) / lane_group_rows(group);
    const int64_t items_per_head = std::clamp<int64_t>((2 * std::max<int64_t>(n_threads, 1) + p.num_kv_heads - 1) / p.num_kv_heads, 1, std::max<int64_t>(lane_groups, 1));
    const int64_t per_item = p.amx ? lane_group_rows(group) * std::clamp<int64_t>((lane_groups + items_per_head - 1) / items_per_head, 1, kMaxLaneGroups)
                                   : p.window > 0 ? 1 : kRows;
    // attend_amx: a lone (decode) row takes as many KV heads per item as fill 16 lanes, so the softmax
    // and the weights' pass run once for all of them
    const int64_t heads = p.amx && last - first == 1 ? std::clamp<int64_t>(16 / group, 1, p.num_kv_heads) : 1;
    for (int64_t row = first; row < last; row += per_item) {
      for (int64_t h = 0; h < p.num_kv_heads; h += heads) {
        p.items.push_back({static_cast<int32_t>(seq), static_cast<int32_t>(h), static_cast<int32_t>(row),
                           static_cast<int32_t>(std::min<int64_t>(per_item, last - row)),
                           static_cast<int32_t>(std::min<int64_t>(heads, p.num_kv_heads - h))});
      }
    }
  }
  if (work < kInlineWork || n_threads <= 1) {
    run_share(nullptr, 0, 1, &p);
    return ffi::Error::Success();
  }
  // The threads take items in turn: the costliest first, so that the last ones taken are short and
  // neither thread is left alone with a long one (8 decode rows over 200-1,000 keys: ~10 % faster).
  // Each item writes only its own rows, so the order changes no bit.
  const auto cost = [&](const Item& it) {
    return (p.row_pos[it.row + it.count - 1] + 1 - p.first_key(p.row_pos[it.row])) * it.heads * it.count;
  };
  std::stable_sort(p.items.begin(), p.items.end(), [&](const Item& a, const Item& b) { return cost(a) > cost(b); });
  const ggml_status status = jaxllm_run_on_pool(run_share, &p, static_cast<int>(n_threads), static_cast<int>(poll));
  if (status != GGML_STATUS_SUCCESS) return ffi::Error::Internal("jaxllm_cpu_paged_attention: ggml compute failed");
  return ffi::Error::Success();
}

// "jaxllm_cpu_write_kv": write_kv for a bfloat16 pool, in place. XLA:CPU scatters bfloat16 by converting
// the whole pool to float32 and back around it (and copies it for a bit-cast to integers), ~115-230 ms
// per layer for a 16k-token pool; this writes only the new rows.
//   kv_pages: bf16 [(L,) P, S, 2 * Hkv, D], aliased to the result
//   rows:     f32 [T, 2 * Hkv, D] (K of head h at 2h, V at 2h + 1), rounded to nearest even
//   slots:    s32 [T] (page * S + offset; out of range, e.g. negative: not written)
//   layer:    s32 scalar (a stacked pool's layer)
ffi::Error WriteKv(ffi::AnyBuffer kv_pages, ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> slots,
                   ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = kv_pages.dimensions(), rd = rows.dimensions();
  if (kv_pages.element_type() != ffi::DataType::BF16 || (pd.size() != 4 && pd.size() != 5) || rd.size() != 3 ||
      slots.element_count() != rd[0] || rd[1] != pd[pd.size() - 2] || rd[2] != pd[pd.size() - 1] ||
      out->untyped_data() != kv_pages.untyped_data()) {
    return ffi::Error::InvalidArgument("jaxllm_cpu_write_kv: a bf16 pool [(L,) P, S, 2Hkv, D] aliased to the "
                                       "result, rows [T, 2Hkv, D], slots [T]");
  }
  const int64_t off = pd.size() - 4, slots_per_layer = pd[off] * pd[off + 1], width = rd[1] * rd[2];
  const int64_t index = off == 1 ? layer.typed_data()[0] : 0;
  if (index < 0 || (off == 1 && index >= pd[0])) return ffi::Error::InvalidArgument("jaxllm_cpu_write_kv: layer out of range");
  uint16_t* dst = static_cast<uint16_t*>(out->untyped_data()) + index * slots_per_layer * width;
  const float* src = rows.typed_data();
  for (int64_t t = 0; t < rd[0]; ++t) {
    const int64_t slot = slots.typed_data()[t];
    if (slot < 0 || slot >= slots_per_layer) continue;
    for (int64_t i = 0; i < width; ++i) {
      uint32_t u;
      __builtin_memcpy(&u, src + t * width + i, 4);
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      dst[slot * width + i] = nan ? static_cast<uint16_t>((u >> 16) | 0x40) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
  }
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
                                  .Attr<int64_t>("amx_bf16")
                                  .Attr<int64_t>("n_threads")
                                  .Attr<int64_t>("poll"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmCpuWriteKv, WriteKv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
