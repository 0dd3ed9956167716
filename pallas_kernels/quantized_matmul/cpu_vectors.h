// 16-float vectors for our CPU kernels (the paged attention, the sampler's row reductions): GCC/Clang
// vector extensions, lowered to one AVX-512 register, two AVX2 ones, or scalars, whatever the build
// targets (no intrinsics: the same source serves every x86 build).
#pragma once
#include <cstdint>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint32_t u16x32 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline v16 splat(float x) { return v16{} + x; }
inline v16 load(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
// Horizontal sum / max by halving (4 shuffle steps; a lane loop is 16 dependent scalar ops). Written
// out twice: one template over the operation measured ~30 % slower per key in the kernel (GCC 12).
inline float lane_sum(v16 v) {
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline float lane_max(v16 v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// exp(x) for x <= 0 (a score minus the running max), lane-wise: x = n ln2 + r, |r| <= ln2 / 2, exp(r)
// by Cephes' degree-6 polynomial (~1 ulp), times 2^n built in the exponent bits; 0 below -87.
inline v16 exp_nonpositive(v16 x) {
  const v16 t = x < -87.0f ? splat(-87.0f) : x;
  const v16 n = (t * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const v16 r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16 scale = reinterpret_cast<v16>((__builtin_convertvector(n, i16) + 127) << 23);
  return x < -87.0f ? v16{} : p * scale;
}

