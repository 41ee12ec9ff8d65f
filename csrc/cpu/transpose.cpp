// Out-of-place float32 matrix transpose: the copies the fp32 GEMMs of the linear backward need (oneDNN
// takes a transposed right operand in place but copies a transposed left one; see "linear (GEMMs)" in
// pyllm/ops/cpu_backend.py), in place of PyTorch's strided copy (`x.t().contiguous()`). 8 x 8 blocks move
// through registers (AVX2 unpack/shuffle/permute, in the avx2 and avx512 builds); scalar elsewhere and
// at the edges.
#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kGroup = 16;  // source columns per thread's share: whole 64-byte lines of each source row

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
