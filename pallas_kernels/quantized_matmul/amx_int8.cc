// Small steps (decode, a cached turn's few dozen new tokens) of Q4_1 weights in ggml's AMX tile layout
// as int8 tile products, one 32-wide block of k at a time.
//
//   y[m, n] f32 = sum over blocks b of  d_w[n, b] d_x[m, b] (q_x[m, b] . q_w[n, b]) + min_w[n, b] s_x[m, b]
//
// (q_x, d_x, s_x: x's rows as ggml's quantize_row_q8_1 writes them; shapes and layouts: amx_int8.h)
//
// Why: ggml's AMX kernel for 2-63 rows (mmq.cpp, tinygemm_kernel_amx) loads and stores every output
// row from memory for each block of k, converts both float16 scales of every row per block, and
// unpacks the weight's nibbles again for every 32 rows; on SmolLM2's projections 2 rows cost 1.5x and
// 16 rows 2.2x its one-row kernel. Here each 16-column tile's nibbles are unpacked once per call into L1,
// each 16 rows keep their outputs in registers over the whole k, the scales arrive as float32, and the
// tile product of the next block is issued before the current one is scaled, so the tile unit and the
// vector units overlap.
//
// Every output takes the same float operations in the same order as ggml's Q4_1 kernels (its AMX
// kernel and its one-row VNNI kernel): per block, acc = fma(float(dot), d_w * d_x, acc), then
// acc = fma(min_w, s_x, acc), from zero. So a row's result does not depend on which kernel or how many
// other rows its step had (tests/test_quantization.py checks it bit for bit against ggml's one-row
// kernel).
#include "amx_int8.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "ggml.h"

namespace {

constexpr int64_t kQ8Bytes = 36;      // ggml's block_q8_1: d, s (float16), then 32 int8
constexpr int64_t kQ41Tile = 16 * 20;  // per 16 columns and 32 of k: 256 bytes of nibbles, d[16], min[16] (float16)

int64_t round16(int64_t m) { return (m + 15) / 16 * 16; }
int64_t quants_bytes(int64_t rows, int64_t blocks) { return (rows * blocks * kQ8Bytes + 63) / 64 * 64; }

}  // namespace

int64_t amx_int8_rows_bytes(int64_t m, int64_t k) {
  const int64_t rows = round16(m), blocks = k / 32;
  return quants_bytes(rows, blocks) + rows * blocks * 2 * static_cast<int64_t>(sizeof(float));
}

#ifdef JAXLLM_AMX

#define AMX_INT8_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,f16c")))

bool amx_int8_takes(int type) { return type == GGML_TYPE_Q4_1 && amx_tiles_granted(); }

namespace {

// ggml's quantize_row_q8_1 (its x86 path) in AVX-512, the same numbers: per 32 of k, d = amax / 127
// (stored as float16), q = x * (127 / amax) rounded to nearest even, s = d * sum(q) (float16); the two
// scales also go to `scales` as float32. ggml's, through its type traits, took ~6 % of a 37-row step.
AMX_INT8_TARGET void quantize_row(const float* x, int64_t k, uint8_t* q, float* scales) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.f;
    const __m512 mul = _mm512_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, mul), kNearest);
    const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, mul), kNearest);
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    const uint16_t half[2] = {_cvtss_sh(d, 0), _cvtss_sh(d * static_cast<float>(sum), 0)};
    uint8_t* block = q + b * kQ8Bytes;
    std::memcpy(block, half, sizeof(half));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(block + 4), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(block + 20), _mm512_cvtepi32_epi8(i1));
    scales[2 * b] = _cvtsh_ss(half[0]);
    scales[2 * b + 1] = _cvtsh_ss(half[1]);
  }
}

}  // namespace

AMX_INT8_TARGET void amx_int8_quantize_rows(const float* x, int64_t m, int64_t k, uint8_t* xq, int ith, int nth) {
  const int64_t rows = round16(m), blocks = k / 32;
  float* scales = reinterpret_cast<float*>(xq + quants_bytes(rows, blocks));
  // by rows, not 16-row blocks: 37 rows split 19 / 18, not 16 / 32 (zero padding included)
  for (int64_t row = rows * ith / nth, end = rows * (ith + 1) / nth; row < end; ++row) {
    uint8_t* q = xq + row * blocks * kQ8Bytes;
    float* s = scales + row * blocks * 2;
    if (row >= m) {  // the tile loads read 16 rows
      std::memset(q, 0, blocks * kQ8Bytes);
      std::memset(s, 0, blocks * 2 * sizeof(float));
      continue;
    }
    quantize_row(x + row * k, k, q, s);
  }
}

namespace {

// One packed block (16 columns x 32 of k, nibbles as 8 rows of [16 columns][4 k], two rows per 64 bytes
// as low / high halves) -> the B tile's 8 rows of 64 int8.
AMX_INT8_TARGET inline void unpack_q4_1(const uint8_t* packed, uint8_t* tile) {
  const __m512i low = _mm512_set1_epi8(0xF);
  for (int r = 0; r < 8; r += 2) {
    const __m512i bytes = _mm512_loadu_si512(packed + r * 32);
    _mm512_store_si512(tile + r * 64, _mm512_and_si512(bytes, low));
    _mm512_store_si512(tile + r * 64 + 64, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
  }
}

// The int32 dots of 16 rows of x with 16 columns over one block of k, into c [16][16]. Two sets of tile
// registers (the intrinsics take register numbers as literals), so one block's product is issued
// before the previous one is scaled.
#define JAXLLM_BLOCK_DOTS(name, TA, TB, TC)                                                          \
  AMX_INT8_TARGET inline void name(const uint8_t* a, int64_t lda, const uint8_t* b, int32_t* c) { \
    _tile_loadd(TA, a, lda);                                                                      \
    _tile_loadd(TB, b, 64);                                                                       \
    _tile_zero(TC);                                                                               \
    _tile_dpbssd(TC, TA, TB);                                                                     \
    _tile_stored(TC, c, 64);                                                                      \
  }
JAXLLM_BLOCK_DOTS(block_dots_even, 0, 2, 4)
JAXLLM_BLOCK_DOTS(block_dots_odd, 1, 3, 5)
// A last group of fewer than 16 rows: tiles 6 and 7 of just those rows, so that its loads, product and
// store cost in proportion to them (a 33-row step paid a whole 16-row group for its last row)
JAXLLM_BLOCK_DOTS(block_dots_short_even, 6, 2, 7)
JAXLLM_BLOCK_DOTS(block_dots_short_odd, 6, 3, 7)
#undef JAXLLM_BLOCK_DOTS

template <int MR>
AMX_INT8_TARGET inline void scale_block(__m512 (&acc)[MR], const int32_t* c, const uint8_t* w_block,
                                        const float* scales, int64_t blocks) {
  const __m512 wd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_block + 256)));
  const __m512 wmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_block + 288)));
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const float* s = scales + r * blocks * 2;
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c + r * 16));
    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(wd, _mm512_set1_ps(s[0])), acc[r]);
    acc[r] = _mm512_fmadd_ps(wmin, _mm512_set1_ps(s[1]), acc[r]);
  }
}

// MR (<= 16) rows of y over one 16-column tile.
//   a: the rows' first block's int8 (row stride lda);  b: the tile's unpacked blocks, 512 bytes each
//   w_tile: the packed tile (scales per block);  scales: the first row's (d, s) per block
template <int MR>
AMX_INT8_TARGET void column_tile(const uint8_t* a, int64_t lda, const uint8_t* b, const uint8_t* w_tile,
                                 const float* scales, int64_t blocks, float* y, int64_t ldy, const uint8_t* next) {
  // the step's last group of fewer than 16 rows runs on tiles 6, 7 of MR rows
  constexpr auto dots_even = MR < 16 ? block_dots_short_even : block_dots_even;
  constexpr auto dots_odd = MR < 16 ? block_dots_short_odd : block_dots_odd;
  alignas(64) int32_t c[2][16 * 16];
  __m512 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  dots_even(a, lda, b, c[0]);
  for (int64_t i = 0; i < blocks; ++i) {
    // A small step is bound by reading the weights (a core streams ~7-9 GB/s on the dev VM): the next
    // tile's bytes are requested while this one computes.
    if (next != nullptr) {
      for (int64_t line = 0; line < kQ41Tile; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(next + i * kQ41Tile + line), _MM_HINT_T0);
      }
    }
    if (i + 1 < blocks) {
      const uint8_t* a_next = a + (i + 1) * kQ8Bytes;
      const uint8_t* b_next = b + (i + 1) * 512;
      i & 1 ? dots_even(a_next, lda, b_next, c[0]) : dots_odd(a_next, lda, b_next, c[1]);
    }
    scale_block<MR>(acc, c[i & 1], w_tile + i * kQ41Tile, scales + 2 * i, blocks);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

using ColumnTile = void (*)(const uint8_t*, int64_t, const uint8_t*, const uint8_t*, const float*, int64_t, float*,
                            int64_t, const uint8_t*);
constexpr ColumnTile kColumnTiles[16] = {column_tile<1>,  column_tile<2>,  column_tile<3>,  column_tile<4>,
                                         column_tile<5>,  column_tile<6>,  column_tile<7>,  column_tile<8>,
                                         column_tile<9>,  column_tile<10>, column_tile<11>, column_tile<12>,
                                         column_tile<13>, column_tile<14>, column_tile<15>, column_tile<16>};

}  // namespace

AMX_INT8_TARGET void amx_int8_mul_mat(int type, const uint8_t* w, int64_t n, int64_t k, const uint8_t* xq, int64_t m,
                                      float* y, int ith, int nth) {
  if (type != GGML_TYPE_Q4_1 || m <= 0) return;
  const int64_t blocks = k / 32, tiles = n / 16, lda = blocks * kQ8Bytes;
  const int64_t begin = tiles * ith / nth, end = tiles * (ith + 1) / nth;
  if (begin == end) return;
  const float* scales = reinterpret_cast<const float*>(xq + quants_bytes(round16(m), blocks));
  static thread_local std::vector<uint8_t> unpacked;
  if (unpacked.size() < static_cast<size_t>(blocks * 512 + 64)) unpacked.resize(blocks * 512 + 64);
  uint8_t* b = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(unpacked.data()) + 63) & ~uintptr_t{63});

  AmxTileScope tile_state(TileShapes::kInt8Block32, static_cast<int>(m % 16));
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* w_tile = w + t * blocks * kQ41Tile;
    for (int64_t i = 0; i < blocks; ++i) unpack_q4_1(w_tile + i * kQ41Tile, b + i * 512);
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
      kColumnTiles[std::min<int64_t>(16, m - m0) - 1](xq + m0 * lda + 4, lda, b, w_tile, scales + m0 * blocks * 2,
                                                      blocks, y + m0 * n + t * 16, n,
                                                      m0 == 0 && t + 1 < end ? w_tile + blocks * kQ41Tile : nullptr);
    }
  }
}

#else  // built without AMX: ggml's kernels take every step

bool amx_int8_takes(int) { return false; }
void amx_int8_quantize_rows(const float*, int64_t, int64_t, uint8_t*, int, int) {}
void amx_int8_mul_mat(int, const uint8_t*, int64_t, int64_t, const uint8_t*, int64_t, float*, int, int) {}

#endif
