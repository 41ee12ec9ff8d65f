// Branch-free float math that the compiler can vectorise inside `#pragma omp simd` loops (libm's expf,
// tanhf and erff are scalar calls unless -ffast-math, which pyllm does not use: it would break the
// inf/nan checks of the loss scaler). Included only by the per-ISA kernel sources; everything here has
// internal linkage, so the per-ISA builds never share a symbol.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef PYLLM_ISA
#error "PYLLM_ISA (the kernel namespace: avx512, avx2 or base) must be defined by the build"
#endif

#define PYLLM_CPU_NS_BEGIN namespace pyllm { namespace cpu { namespace PYLLM_ISA {
#define PYLLM_CPU_NS_END } } }

// Parallel loops over rows only when there is enough work to repay waking the threads.
#define PYLLM_MIN_PARALLEL_WORK 32768

namespace {

inline float bits_to_float(int32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x, relative error ~2e-7 on [-87, 88]; inputs below -87 give ~1e-38 (treated as 0 by callers that
// sum), above 88 saturate at ~1.6e38, nan stays nan. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// then a degree-7 Taylor polynomial for e^r (truncation error r^8/8! < 6e-9).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) with the 1.5 * 2^23 trick (exact in round-to-nearest, no SSE4.1 needed)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)); absolute error ~1e-7.
inline float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  return x < 0.0f ? -t : t;
}

// erf(x) by Abramowitz & Stegun 7.1.28: 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, odd extension;
// absolute error <= 3e-7, and no exp: a polynomial, one division and four squarings.
inline float fast_erf(float x) {
  const float z = x < 0.0f ? -x : x;
  float p = 0.0000430638f;
  p = p * z + 0.0002765672f;
  p = p * z + 0.0001520143f;
  p = p * z + 0.0092705272f;
  p = p * z + 0.0422820123f;
  p = p * z + 0.0705230784f;
  p = p * z + 1.0f;
  p = p * p;  // ^2
  p = p * p;  // ^4
  p = p * p;  // ^8
  p = p * p;  // ^16 (inf for large z, giving erf = 1)
  const float e = 1.0f - 1.0f / p;
  return x < 0.0f ? -e : e;
}

inline float fast_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace
