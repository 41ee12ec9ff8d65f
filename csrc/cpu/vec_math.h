// Branch-free float math that the compiler can vectorise inside `#pragma omp simd` loops (libm's expf,
// tanhf and erff are scalar calls unless -ffast-math, which pyllm does not use: it would break the
// inf/nan checks of the loss scaler). Included only by the per-ISA kernel sources; everything here has
// internal linkage, so the per-ISA builds never share a symbol.
#pragma once
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#ifndef PYLLM_ISA
#error "PYLLM_ISA (the kernel namespace: avx512, avx2 or base) must be defined by the build"
#endif

#define PYLLM_CPU_NS_BEGIN namespace pyllm { namespace cpu { namespace PYLLM_ISA {
#define PYLLM_CPU_NS_END } } }

// A per-row helper that must be inlined into its row loop (GCC's heuristics may decline with many
// template instantiations, and a call per row costs as much as a short row's work).
#define PYLLM_INLINE inline __attribute__((always_inline))

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

// fast_exp, but exactly 0 below -87 (-inf included), where e^x < 1.7e-38: for a masked score's
// probability, which the reference gives as 0. (Not fast_exp's own behaviour: the compare costs the
// cross-entropy and GELU kernels 2-4%, and their sums do not need it.)
inline float fast_exp_or_zero(float x) {
  const float e = fast_exp(x);
  return x < -87.0f ? 0.0f : e;
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

#if defined(__AVX2__)
// An 8 x 8 float32 transpose through registers: dst rows 0..7 (stride ld_dst) = columns 0..7 of src rows
// 0..7 (stride ld_src).
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * ld_src), r1 = _mm256_loadu_ps(src + 1 * ld_src);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
  // pairs of rows interleaved: t0 = r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] r0[5] r1[5], ...
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  // groups of four rows: s0 = column 0 of rows 0-3 | column 4 of rows 0-3, ...
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  // 128-bit halves joined: column j of rows 0-3 with column j of rows 4-7
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for every row r < rows and columns c0 <= c < c1, swept down
// the rows so that the destination rows c0..c1 are written front to back as sequential streams; 8 x 8
// register blocks (transpose8x8) where the ISA has AVX2, scalar at the edges. transpose.cpp runs it per
// group of 16 columns and thread; the attention uses it for its K^T and V^T copies.
inline void transpose_columns(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
                              int64_t c0, int64_t c1) {
  int64_t r = 0;
#if defined(__AVX2__)
  const int64_t cb_end = c0 + (c1 - c0) / 8 * 8;  // columns covered by whole 8 x 8 blocks
  for (; r + 8 <= rows; r += 8) {
    for (int64_t c = c0; c < cb_end; c += 8) transpose8x8(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    for (int64_t c = cb_end; c < c1; ++c) {
      for (int64_t rr = r; rr < r + 8; ++rr) dst[c * ld_dst + rr] = src[rr * ld_src + c];
    }
  }
#endif
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t rr = r; rr < rows; ++rr) dst[c * ld_dst + rr] = src[rr * ld_src + c];
  }
}

// ---- Row reductions. `#pragma omp simd reduction(+ : s)` leaves GCC's vector of partial sums on the
// stack and adds its lanes one at a time (16 dependent scalar adds per reduction with AVX-512), a cost
// paid per row. row_sums keeps L partial sums per value (lane j holds the elements i = j mod L) in
// vector registers and combines them in a tree of log2(L) steps. lanes<K, T...>() picks L: two vector
// registers of partial sums in all (more spilled with AVX2: its fp32 LayerNorm backward at 768 x 128
// went 25 -> 30 us with four), but at least one whole vector of bfloat16 elements when the loop loads any
// (with fewer lanes GCC vectorises the loop at half width: the bf16 LayerNorm at 256 bits with AVX-512).
// LayerNorm with the residual, one thread, AVX-512: fp32 768 x 128 forward 28.5 -> 24 us; bf16 rows of
// 2048 forward 980-1200 -> 540-600 us (with the typed loads below).
#if defined(__AVX512F__)
constexpr int kVecFloats = 16;  // floats per vector register
#elif defined(__AVX2__)
constexpr int kVecFloats = 8;
#else
constexpr int kVecFloats = 4;
#endif

// Combines the L partial sums in p (overwritten) pairwise: p[j] += p[j + w] for w = L/2, ..., 2, 1.
template <int L>
inline float lane_tree(float* p) {
#pragma GCC unroll 8
  for (int w = L / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  }
  return p[0];
}

// The max of the L values in p (overwritten), pairwise as lane_tree.
template <int L>
inline float lane_max(float* p) {
#pragma GCC unroll 8
  for (int w = L / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) p[j] = p[j + w] > p[j] ? p[j + w] : p[j];
  }
  return p[0];
}

// K values per element.
template <int K>
struct Vals {
  float v[K];
};

// Lanes per value for K values per element when the loop loads elements of types T... (float or uint16_t).
template <int K, class... T>
constexpr int lanes() {
  static_assert(K == 1 || K == 2, "two vector registers of partial sums in all");
  return (std::is_same_v<T, uint16_t> || ...) ? 2 * kVecFloats : 2 * kVecFloats / K;
}

// The K sums over i < n of the values f(i) returns (a Vals<K>), in L lanes each; f may also write
// element i's results.
template <int K, int L = lanes<K>(), class F>
inline Vals<K> row_sums(int64_t n, F f) {
  float acc[K][L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const Vals<K> t = f(i + j);
      for (int k = 0; k < K; ++k) acc[k][j] += t.v[k];
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const Vals<K> t = f(i + j);
    for (int k = 0; k < K; ++k) acc[k][j] += t.v[k];
  }
  Vals<K> out;
#pragma GCC unroll 2
  for (int k = 0; k < K; ++k) out.v[k] = lane_tree<L>(acc[k]);
  return out;
}

// The sum over i < n of f(i).
template <class F>
inline float row_sum(int64_t n, F f) {
  return row_sums<1>(n, [&](int64_t i) { return Vals<1>{{f(i)}}; }).v[0];
}

// ---- bfloat16 storage. The row kernels read and write float32 or bfloat16 tensors (Src/Dst in
// kernels.h) and compute in float32: a bfloat16 row is widened into a per-thread float buffer, computed
// on as float32, and narrowed back with round-to-nearest-even (what torch's .to(bfloat16) does).

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(b) << 16)); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // finite values too large become inf
  const uint32_t quiet_nan = (u >> 16) | 0x40u;                       // a nan stays a nan (sign kept)
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

inline bool is_bf16(const pyllm::cpu::Src& s) { return s.p && s.t == pyllm::DType::kBFloat16; }
inline bool is_bf16(const pyllm::cpu::Dst& d) { return d.p && d.t == pyllm::DType::kBFloat16; }

// Element i of a typed row (bfloat16 is held as its uint16_t bits), as float; and storing v there, which
// returns the value as stored (v rounded to bfloat16 for a bfloat16 row). Loops written with these over
// typed pointers convert in registers instead of widening whole rows into buffers first.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline float store(float* p, int64_t i, float v) { return p[i] = v; }
inline float store(uint16_t* p, int64_t i, float v) {
  const uint16_t b = float_to_bf16(v);
  p[i] = b;
  return bf16_to_float(b);
}

// The max of x[0..n) in L lanes (as row_sums: a tree over the lanes, not a scalar chain per row).
template <class T>
PYLLM_INLINE float row_max(const T* __restrict x, int64_t n) {
  constexpr int L = lanes<1, T>();
  float acc[L];
  for (int j = 0; j < L; ++j) acc[j] = -INFINITY;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const float v = load(x, i + j);
      acc[j] = v > acc[j] ? v : acc[j];
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const float v = load(x, i + j);
    acc[j] = v > acc[j] ? v : acc[j];
  }
  return lane_max<L>(acc);
}

// f(p) with p the tensor's address as `const float*` or `const uint16_t*` (bfloat16 bits), as its dtype
// says: a kernel templated on its operands' storage types is instantiated for each combination once.
// An absent tensor (null) is passed as a null float pointer.
template <class F>
inline void typed(const pyllm::cpu::Src& s, F&& f) {
  if (is_bf16(s)) {
    f(static_cast<const uint16_t*>(s.p));
  } else {
    f(static_cast<const float*>(s.p));
  }
}
template <class F>
inline void typed(const pyllm::cpu::Dst& d, F&& f) {
  if (is_bf16(d)) {
    f(static_cast<uint16_t*>(d.p));
  } else {
    f(static_cast<float*>(d.p));
  }
}

// Copies elements [offset, offset + n) of s into buf as float (widening bfloat16).
inline void src_copy(const pyllm::cpu::Src& s, int64_t offset, int64_t n, float* __restrict buf) {
  if (s.t == pyllm::DType::kBFloat16) {
    const uint16_t* __restrict b = static_cast<const uint16_t*>(s.p) + offset;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(b[i]);
    return;
  }
  const float* __restrict f = static_cast<const float*>(s.p) + offset;
  for (int64_t i = 0; i < n; ++i) buf[i] = f[i];
}

// Elements [offset, offset + n) of s as float: the tensor's own memory when it is float32, else
// widened into buf (n floats).
inline const float* src_row(const pyllm::cpu::Src& s, int64_t offset, int64_t n, float* buf) {
  if (s.t != pyllm::DType::kBFloat16) return static_cast<const float*>(s.p) + offset;
  src_copy(s, offset, n, buf);
  return buf;
}

// Element i of s as float.
inline float src_at(const pyllm::cpu::Src& s, int64_t i) {
  return s.t == pyllm::DType::kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(s.p)[i])
                                        : static_cast<const float*>(s.p)[i];
}

// Where to compute elements [offset, ...) of d: its own memory when float32, else buf; dst_commit then
// narrows buf into d (nothing to do for float32).
inline float* dst_row(const pyllm::cpu::Dst& d, int64_t offset, float* buf) {
  return d.t != pyllm::DType::kBFloat16 ? static_cast<float*>(d.p) + offset : buf;
}

inline void dst_commit(const pyllm::cpu::Dst& d, int64_t offset, const float* __restrict buf, int64_t n) {
  if (d.t != pyllm::DType::kBFloat16) return;
  uint16_t* __restrict b = static_cast<uint16_t*>(d.p) + offset;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) b[i] = float_to_bf16(buf[i]);
}

// Writes n floats from src (not d's memory) into d, converting as d's dtype says.
inline void dst_write(const pyllm::cpu::Dst& d, int64_t offset, const float* src, int64_t n) {
  if (d.t == pyllm::DType::kBFloat16) {
    dst_commit(d, offset, src, n);
    return;
  }
  float* f = static_cast<float*>(d.p) + offset;
  for (int64_t i = 0; i < n; ++i) f[i] = src[i];
}

// Adds the nt per-thread partial rows of `partial` (nt x n floats, row t at partial + t n) into row 0, in
// thread order, and writes that total into d.
inline void write_thread_sum(const pyllm::cpu::Dst& d, float* partial, int nt, int64_t n) {
  for (int t = 1; t < nt; ++t) {
    for (int64_t i = 0; i < n; ++i) partial[i] += partial[static_cast<int64_t>(t) * n + i];
  }
  dst_write(d, 0, partial, n);
}

// Float buffers for bfloat16 rows: `slots` rows of n floats, allocated only when `needed` (a kernel whose
// operands are all float32 computes in place and allocates nothing). One per thread.
class RowBuffers {
 public:
  RowBuffers(bool needed, int slots, int64_t n)
      : stride_(stride(n)),
        p_(needed && n > 0
               ? static_cast<float*>(aligned_alloc(64, static_cast<size_t>(slots) * stride_ * sizeof(float)))
               : nullptr) {}
  ~RowBuffers() { free(p_); }
  RowBuffers(const RowBuffers&) = delete;
  RowBuffers& operator=(const RowBuffers&) = delete;
  float* operator[](int slot) const { return p_ ? p_ + slot * stride_ : nullptr; }

 private:
  // Slots start 64-byte aligned and 128 bytes apart modulo 4 KiB: with slots a multiple of 4 KiB apart
  // (rows of 1024k floats), element i of every slot has the same address bits 0-11, and a load from one
  // slot issued after a store to another at that offset waits for the store (4K aliasing): SwiGLU's
  // bf16 forward at 1024 x 8192 took 8.1 ms with unpadded slots (eager 4.1 ms).
  static int64_t stride(int64_t n) { return (n + 15) / 16 * 16 + 32; }
  int64_t stride_;
  float* p_;
};

// body(r, buf) for each row r < rows, the rows split over the threads when rows * n is large enough;
// buf: each thread's RowBuffers of `slots` rows of n floats (allocated only when `widen`).
template <class Body>
inline void for_each_row(int64_t rows, int64_t n, int threads, bool widen, int slots, Body body) {
#pragma omp parallel num_threads(threads) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  {
    RowBuffers buf(widen, slots, n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) body(r, buf);
  }
}

// Columns per span of an elementwise kernel's widened rows: 3-5 float buffers of this size stay in L1.
constexpr int64_t kSpan = 1024;

// The span length for rows of n columns: the whole row when nothing is widened, else at most kSpan.
inline int64_t span_length(int64_t n, bool widen) { return widen ? min_i64(n, kSpan) : n; }

// body(r, c, len, buf) for each row r < rows and each span of columns [c, c + len) of that row: the whole
// row when nothing is widened (float32 computes in place), else spans of at most kSpan columns, so that
// an elementwise kernel's widened buffers stay in L1 instead of streaming rows of n floats through L2
// (SwiGLU's bf16 forward at 1024 x 8192: buffers of 8192 floats made it 0.6x of eager). buf: each
// thread's RowBuffers of `slots` spans, allocated only when `widen`.
template <class Body>
inline void for_each_span(int64_t rows, int64_t n, int threads, bool widen, int slots, Body body) {
  const int64_t span = span_length(n, widen);
#pragma omp parallel num_threads(threads) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  {
    RowBuffers buf(widen, slots, span);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n; c += span) body(r, c, min_i64(span, n - c), buf);
    }
  }
}

}  // namespace
