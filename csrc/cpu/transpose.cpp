// Out-of-place float32 matrix transpose: the copies the fp32 GEMMs of the linear backward need (oneDNN
// takes a transposed right operand in place but copies a transposed left one; see "linear (GEMMs)" in
// pyllm/ops/cpu_backend.py), in place of PyTorch's strided copy (`x.t().contiguous()`). 8 x 8 blocks move
// through registers (AVX2 unpack/shuffle/permute, in the avx2 and avx512 builds); scalar elsewhere and
// at the edges.
#include "kernels.h"
#include "vec_math.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kGroup = 16;

#if defined(__AVX2__)
// dst rows 0..7 (stride ld_dst) = columns 0..7 of src rows 0..7 (stride ld_src).
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
constexpr int64_t kBlock = 8;
#endif

// Columns [c0, c1) of src (at most kGroup: whole 64-byte lines of each source row), every row: the
// destination rows c0..c1 are written front to back, kGroup sequential streams.
inline void transpose_columns(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t c0,
                              int64_t c1) {
  int64_t r = 0;
#if defined(__AVX2__)
  const int64_t cb_end = c0 + (c1 - c0) / kBlock * kBlock;  // columns covered by whole 8 x 8 blocks
  for (; r + kBlock <= rows; r += kBlock) {
    for (int64_t c = c0; c < cb_end; c += kBlock) transpose8x8(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    for (int64_t c = cb_end; c < c1; ++c) {
      for (int64_t rr = r; rr < r + kBlock; ++rr) dst[c * ld_dst + rr] = src[rr * ld_src + c];
    }
  }
#endif
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t rr = r; rr < rows; ++rr) dst[c * ld_dst + rr] = src[rr * ld_src + c];
  }
}

}  // namespace

// Groups of 16 source columns (16 destination rows) swept down all the rows, one group per thread at a
// time. Sweeping rows in bands instead (each destination row receiving 16 floats per band) was 1.9x
// slower than PyTorch's copy at 2048 x 128: its stores, every destination row 8 KiB apart, all hit one
// L1 set and shared their low 12 address bits with the loads (4K aliasing).
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols, int threads) {
  const int64_t groups = (cols + kGroup - 1) / kGroup;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= 2 * PYLLM_MIN_PARALLEL_WORK)
  for (int64_t g = 0; g < groups; ++g) {
    transpose_columns(src, ld_src, dst, ld_dst, rows, g * kGroup, min_i64(cols, (g + 1) * kGroup));
  }
}

PYLLM_CPU_NS_END
