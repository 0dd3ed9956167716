// Large steps (prefill) of weights in ggml's AMX tile layout as one bfloat16 GEMM on the AMX tiles.
//
//   y[m, n] f32 = a[m, k] bf16 @ dequantize(w)^T        (shapes and layouts: amx_bf16.h)
//   or, for a gated MLP, silu(a @ dequantize(w)^T) * (a @ dequantize(w_up)^T)
//
// The gated form takes each 32 x 32 block's two products into the activation (ggml's own SwiGLU, so the
// numbers are unchanged) while they are in L1: the products of a 506-token prefill (6 MB a layer) no
// longer go through memory to a SwiGLU pass of their own (SmolLM2 -q gguf, 506 uncached tokens: 140 /
// 148 -> 127 / 125 ms).
//
// Why: ggml's AMX int8 kernels scale every 32-wide block of k in AVX-512 (the product of two block
// scales), re-reading and re-writing the output block and re-unpacking the weight for each 32 rows, so
// a 512-row step of SmolLM2's Q4_1 projections ran at ~5 % of the tile units' peak. Here each 32-column
// panel of the weight is dequantized once per call into bf16 tiles, up to a megabyte of panels at a
// time so that they stay in L2 while every 64-row block of the step runs over them, and every 32 rows
// of a block are one run of tile dot products over the whole k with float32 accumulation in the tile
// registers. x arrives packed in the tiles' order, so each tile load reads one contiguous kilobyte.
// The result is what the reference computes in float32 with weights and activations rounded to
// bfloat16 (tests/test_quantization.py); ggml's int8 kernels keep the small steps, where dequantizing
// every panel would cost more than the product.
//
// Packed layout read here (ggml-cpu/amx/mmq.cpp, pack_B): per 16 output columns and 32 of k, one tile
// of TILE_SIZE bytes: the quants as 8 rows of 4 consecutive k for each of the 16 columns ([8][16][4]
// int8 for Q8_0; two such rows per 64 bytes as low / high nibbles for Q4_0 / Q4_1), then the 16
// columns' float16 scales (and Q4_1's float16 mins).
#include "amx_bf16.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "ggml.h"

// ggml-cpu's SwiGLU (vec.h, internal): the activation ggml's swiglu op takes, lane by lane, so the gated
// form's numbers are those of the two products followed by that op.
extern "C" void ggml_vec_swiglu_f32(int n, float* y, const float* x, const float* g);

#ifdef JAXLLM_AMX_BF16

#define AMX_BF16_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx512vbmi")))

namespace {

struct Layout {
  int tile_size;   // bytes per (16 columns, 32 of k)
  int scale_at;    // float16 [16]
  int min_at;      // float16 [16] (Q4_1), or 0
  bool q8;         // quants are int8 [8][16][4]; else nibbles
  int q4_offset;   // Q4_0 stores q + 8
};

bool layout_of(int type, Layout* l) {
  switch (type) {
    case GGML_TYPE_Q4_0: *l = {16 * 18, 256, 0, false, 8}; return true;
    case GGML_TYPE_Q4_1: *l = {16 * 20, 256, 288, false, 0}; return true;
    case GGML_TYPE_Q8_0: *l = {16 * 34 + 16 * 4, 512, 0, true, 0}; return true;  // + ggml's s8s8 compensation
    default: return false;
  }
}

// A quad row of packed quants holds byte 4 c + i for column c and k 4 kq + i. One vpermb per 16 quants
// puts each where its float goes, zero-extended by the mask: lane L of half h (columns 8 h .. 8 h + 7),
// pair p is column 8 h + L / 2 at k 4 kq + 2 p + L % 2, so each column's two k are a bf16 pair and one
// cvtne2ps of the two halves is the tile's row 2 kq + p. An extract and a widening per 16 quants plus a
// permute per row did this before; the loop was port-5 bound (harness, one thread, Q4_1 3072 x 576
// streamed from memory: 16 rows 68 -> 60 ns per block, 32 rows 85 -> 76, 48 rows 104 -> 97).
// Signed quants (Q8_0) land in the lane's highest byte and are shifted down arithmetically.
struct LaneBytes {
  alignas(64) uint8_t idx[2][2][2][64];  // [signed][half][pair]
  constexpr LaneBytes() : idx() {
    for (int high = 0; high < 2; ++high)
      for (int half = 0; half < 2; ++half)
        for (int pair = 0; pair < 2; ++pair)
          for (int lane = 0; lane < 16; ++lane)
            idx[high][half][pair][4 * lane + 3 * high] =
                static_cast<uint8_t>(4 * (8 * half + lane / 2) + 2 * pair + lane % 2);
  }
};
constexpr LaneBytes kLaneBytes;

AMX_BF16_TARGET inline __m512 quants_to_floats(__m512i q, int half, int pair, bool is_signed) {
  const __m512i idx = _mm512_load_si512(kLaneBytes.idx[is_signed][half][pair]);
  __m512i v = _mm512_maskz_permutexvar_epi8(is_signed ? 0x8888888888888888ULL : 0x1111111111111111ULL, idx, q);
  if (is_signed) v = _mm512_srai_epi32(v, 24);
  return _mm512_cvtepi32_ps(v);
}

// One packed block (16 columns x 32 of k) -> a bf16 B tile [16 k-pairs][16 columns][2].
AMX_BF16_TARGET void dequantize_tile(const Layout& l, const uint8_t* src, uint16_t* tile) {
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + l.scale_at)));
  const __m512 offset = l.min_at ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + l.min_at)))
                                 : _mm512_mul_ps(d, _mm512_set1_ps(-static_cast<float>(l.q4_offset)));
  // Lane L of a half's floats belongs to column 8 * half + L / 2, and takes its scale and offset.
  const __m512i lo_columns = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_columns = _mm512_add_epi32(lo_columns, _mm512_set1_epi32(8));
  const __m512 d_lo = _mm512_permutexvar_ps(lo_columns, d), d_hi = _mm512_permutexvar_ps(hi_columns, d);
  const __m512 o_lo = _mm512_permutexvar_ps(lo_columns, offset), o_hi = _mm512_permutexvar_ps(hi_columns, offset);
  const __m512i nibble = _mm512_set1_epi8(0xF);
  for (int kq = 0; kq < 8; ++kq) {
    __m512i q;
    if (l.q8) {
      q = _mm512_loadu_si512(src + kq * 64);
    } else {
      const __m512i bytes = _mm512_loadu_si512(src + (kq & ~1) * 32);
      q = _mm512_and_si512(kq & 1 ? _mm512_srli_epi16(bytes, 4) : bytes, nibble);
    }
    for (int pair = 0; pair < 2; ++pair) {
      const __m512 lo = _mm512_fmadd_ps(quants_to_floats(q, 0, pair, l.q8), d_lo, o_lo);
      const __m512 hi = _mm512_fmadd_ps(quants_to_floats(q, 1, pair, l.q8), d_hi, o_hi);
      _mm512_store_si512(tile + (2 * kq + pair) * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

// The dequantized panels one call keeps at a time: every 64-row block of the step runs over them while
// they sit in L2 (2 MB per core on Sapphire Rapids), beside that block's rows of x.
constexpr int64_t kPanelBudget = 1 << 19;  // bf16 elements: 1 MB
constexpr int64_t kRowBlock = 64;
// Dequantizing streams the weight from memory, and stalled on each tile's first load (~1/8 of the
// GEMM's time in a 56-row step): the bytes of the tile this many ahead are requested meanwhile (a
// 56-row step of SmolLM2 over 500 cached tokens: 30.2 / 30.6 -> 29.0 / 28.8 ms; 12 ahead measured the
// same as 4).
constexpr int64_t kPrefetchTiles = 4;

struct Scratch {
  std::vector<uint16_t> panels;  // over-allocated to align the tiles
  alignas(64) float tail[32 * 32];  // a block of rows cut short by the step, or with glu the gate's product
  alignas(64) float up[32 * 32];    // with glu: the up projection's product
  uint16_t* tiles(size_t elements) {
    if (panels.size() < elements + 32) panels.resize(elements + 32);
    return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(panels.data()) + 63) & ~uintptr_t{63});
  }
};

}  // namespace

bool amx_tiles_granted() {
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// ldtilecfg / sttilecfg as asm: GCC before 14 drops the stores filling a struct that _tile_loadconfig
// reads (build._patch_amx).
AMX_BF16_TARGET AmxTileScope::AmxTileScope(TileShapes shapes, int rows) {
  __asm__ __volatile__("sttilecfg %0" : "=m"(saved_));
  alignas(64) unsigned char mine[64] = {1};  // palette 1
  for (int t = 0; t < 8; ++t) mine[16 + 2 * t] = 64, mine[48 + t] = 16;  // colsb[t] (u16), rows[t]
  if (shapes == TileShapes::kInt8Block32) {
    mine[16] = mine[18] = mine[28] = 32;  // A: rows of 32 int8
    mine[50] = mine[51] = 8;              // B: 8 rows of [16 columns][4 int8]
    mine[54] = mine[55] = static_cast<unsigned char>(rows > 0 && rows < 16 ? rows : 16);  // the last group's A, C
  }
  __asm__ __volatile__("ldtilecfg %0" : : "m"(mine));
}

AMX_BF16_TARGET AmxTileScope::~AmxTileScope() {
  if (saved_[0] != 0) {
    __asm__ __volatile__("ldtilecfg %0" : : "m"(saved_));
  } else {
    __asm__ __volatile__("tilerelease");
  }
}

bool amx_bf16_takes(int type) {
  Layout l;
  return layout_of(type, &l);
}

AMX_BF16_TARGET void amx_bf16_pack_rows(const float* x, int64_t m, int64_t k, uint16_t* a, int ith, int nth) {
  const int64_t kb_count = k / 32, blocks = (m + 31) / 32 * 2;
  for (int64_t rb = blocks * ith / nth, end = blocks * (ith + 1) / nth; rb < end; ++rb) {
    uint16_t* block = a + rb * kb_count * 512;
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t row = rb * 16 + r;
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        uint16_t* dst = block + kb * 512 + r * 32;
        if (row >= m) {
          _mm512_storeu_si512(dst, _mm512_setzero_si512());
          continue;
        }
        const float* src = x + row * k + kb * 32;
        _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src))));
      }
    }
  }
}

AMX_BF16_TARGET void amx_bf16_mul_mat(int type, const uint8_t* w, const uint8_t* w_up, int64_t n, int64_t k,
                                      const uint16_t* a, int64_t m, float* y, int ith, int nth) {
  Layout l;
  if (!layout_of(type, &l)) return;
  const int64_t kb_count = k / 32, panels = n / 32, panel_elements = 2 * kb_count * 512;
  const int64_t weights = w_up != nullptr ? 2 : 1;  // with glu a panel's gate and up are held side by side
  const int64_t begin = panels * ith / nth, end = panels * (ith + 1) / nth;
  if (begin == end) return;
  const int64_t group = std::clamp<int64_t>(kPanelBudget / (weights * panel_elements), 1, end - begin);
  static thread_local Scratch scratch;
  uint16_t* held = scratch.tiles(group * weights * panel_elements);

  AmxTileScope tiles;

  // rows m0 .. m0 + 31 (or 16 with `half`) of the held panel `b0` into c [32][ldc]
  const auto block_product = [&](const uint16_t* b0, int64_t m0, bool half, float* c, int64_t ldc) {
    const uint16_t* b1 = b0 + kb_count * 512;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const uint16_t* a0 = a + (m0 / 16) * kb_count * 512;
    const uint16_t* a1 = a0 + kb_count * 512;
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      _tile_loadd(0, a0 + kb * 512, 64);
      _tile_loadd(2, b0 + kb * 512, 64);
      _tile_loadd(3, b1 + kb * 512, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(6, 0, 3);
      if (!half) {
        _tile_loadd(1, a1 + kb * 512, 64);
        _tile_dpbf16ps(5, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
    _tile_stored(4, c, ldc * 4);
    _tile_stored(6, c + 16, ldc * 4);
    if (!half) {
      _tile_stored(5, c + 16 * ldc, ldc * 4);
      _tile_stored(7, c + 16 * ldc + 16, ldc * 4);
    }
  };

  for (int64_t g = begin; g < end; g += group) {
    const int64_t g_end = std::min(end, g + group);
    for (int64_t p = g; p < g_end; ++p) {
      for (int64_t wi = 0; wi < weights; ++wi) {
        uint16_t* b = held + ((p - g) * weights + wi) * panel_elements;
        const uint8_t* panel = (wi ? w_up : w) + 2 * p * kb_count * l.tile_size;
        for (int64_t kb = 0; kb < 2 * kb_count; ++kb) {  // the panel's two 16-column halves in turn
          const uint8_t* src = panel + kb * l.tile_size;
          const uint8_t* ahead = src + kPrefetchTiles * l.tile_size;
          for (int64_t line = 0; line < l.tile_size; line += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
          }
          dequantize_tile(l, src, b + kb * 512);
        }
      }
    }
    for (int64_t mb = 0; mb < m; mb += kRowBlock) {
      for (int64_t p = g; p < g_end; ++p) {
        const uint16_t* b0 = held + (p - g) * weights * panel_elements;
        for (int64_t m0 = mb; m0 < std::min(m, mb + kRowBlock); m0 += 32) {
          // A last block of at most 16 rows takes half the products (tiles 5 and 7 stay zero, unread): a
          // step just past a multiple of 32 rows would otherwise pay for 16 rows it does not have.
          const bool half = m - m0 <= 16;
          const int64_t rows = std::min<int64_t>(32, m - m0);
          if (weights == 2) {  // both products of the block, then the activation straight into y
            block_product(b0, m0, half, scratch.tail, 32);
            block_product(b0 + panel_elements, m0, half, scratch.up, 32);
            ggml_vec_swiglu_f32(static_cast<int>(rows * 32), scratch.tail, scratch.tail, scratch.up);
            for (int64_t r = 0; r < rows; ++r) std::memcpy(y + (m0 + r) * n + p * 32, scratch.tail + r * 32, 32 * 4);
            continue;
          }
          const bool full = rows == 32;
          block_product(b0, m0, half, full ? y + m0 * n + p * 32 : scratch.tail, full ? n : 32);
          if (!full) {
            for (int64_t r = 0; r < rows; ++r) std::memcpy(y + (m0 + r) * n + p * 32, scratch.tail + r * 32, 32 * 4);
          }
        }
      }
    }
  }
}

#else  // built without AMX bf16: ggml's int8 kernels take every step

bool amx_tiles_granted() { return false; }
AmxTileScope::AmxTileScope(TileShapes, int) {}
AmxTileScope::~AmxTileScope() {}
bool amx_bf16_takes(int) { return false; }
void amx_bf16_pack_rows(const float*, int64_t, int64_t, uint16_t*, int, int) {}
void amx_bf16_mul_mat(int, const uint8_t*, const uint8_t*, int64_t, int64_t, const uint16_t*, int64_t, float*, int,
                      int) {}

#endif
