// Large steps of AMX-packed weights as one bfloat16 GEMM on the AMX tiles (amx_bf16.cc).
#pragma once
#include <cstdint>

// Whether this build and CPU run amx_bf16_mul_mat for weights of ggml type `type` in ggml's AMX
// tile layout (Q4_0, Q4_1, Q8_0; the K-quants' layouts are not read).
bool amx_bf16_takes(int type);

// x's rows as the GEMM reads them: bf16 (rounded to nearest even) in tile order, [round_up(m, 32) / 16]
// blocks of 16 rows x [k / 32] tiles of [16][32], rows past m zeros; so each tile load is one contiguous
// kilobyte. The share `ith` of `nth` threads converts its 16-row blocks.
//   x: f32 row-major [m, k], k % 32 == 0
//   a: round_up(m, 32) * k elements
void amx_bf16_pack_rows(const float* x, int64_t m, int64_t k, uint16_t* a, int ith, int nth);

// y[m, n] f32 = a[m, k] bf16 @ dequantize(w)^T, or with w_up a gated MLP's activation
// silu(a @ dequantize(w)^T) * (a @ dequantize(w_up)^T), for the share `ith` of `nth` threads (column
// panels of 32 are split between them).
//   w, w_up: [n, k] of ggml type `type` in ggml's AMX tile layout (jaxllm_amx_pack), n % 32 == 0,
//            k % 32 == 0; w_up may be null
//   a: x packed by amx_bf16_pack_rows
//   y: f32 row-major [m, n]
// The caller's thread must hold the AMX tile state (ggml's AMX buffer type requests it at start).
void amx_bf16_mul_mat(int type, const uint8_t* w, const uint8_t* w_up, int64_t n, int64_t k, const uint16_t* a,
                      int64_t m, float* y, int ith, int nth);
