// Small steps of Q4_1 weights in ggml's AMX tile layout as int8 tile products (amx_int8.cc).
#pragma once
#include <cstdint>

// Whether this build and CPU run amx_int8_mul_mat for weights of ggml type `type` in ggml's AMX tile
// layout (Q4_1, the format of the GGUFs llama.cpp's q4 presets write for small models).
bool amx_int8_takes(int type);

// Bytes amx_int8_quantize_rows writes for m rows of k: ggml's block_q8_1 rows (36 bytes per 32 of k)
// for round_up(m, 16) rows, then their scales as float32 [round_up(m, 16)][k / 32][2] (d, s).
int64_t amx_int8_rows_bytes(int64_t m, int64_t k);

// x's rows quantized as ggml does for its Q4_1 kernels (quantize_row_q8_1: 8 bits per 32 of k, the
// block's scale d and d * sum(q); the same bits), rows past m zeros. The share `ith` of `nth` threads
// takes its part of the rows.
//   x: f32 row-major [m, k], k % 32 == 0;  xq: amx_int8_rows_bytes(m, k) bytes
void amx_int8_quantize_rows(const float* x, int64_t m, int64_t k, uint8_t* xq, int ith, int nth);

// y[m, n] f32 = x[m, k] @ dequantize(w)^T computed from the 8-bit blocks (llama.cpp's arithmetic), for
// the share `ith` of `nth` threads (16-column tiles are split between them).
//   w:  [n, k] Q4_1 in ggml's AMX tile layout (jaxllm_amx_pack), n % 16 == 0, k % 32 == 0
//   xq: x by amx_int8_quantize_rows;  y: f32 row-major [m, n]
// The caller's thread must hold the AMX tile state (ggml's AMX buffer type requests it at start).
void amx_int8_mul_mat(int type, const uint8_t* w, int64_t n, int64_t k, const uint8_t* xq, int64_t m, float* y,
                      int ith, int nth);
