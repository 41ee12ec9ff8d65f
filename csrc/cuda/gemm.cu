// fp16/bf16 GEMM on tensor cores with a fused bias/GELU epilogue: c = act(a @ B + bias).
//
// Tiling: a 128 x 128 output tile per block of 8 warps (2 x 4), each warp 64 x 32 as 4 x 2 WMMA
// 16x16x16 fragments with fp32 accumulators. K advances in steps of 32 through a 3-stage shared-memory
// ring filled by cp.async (the loads of step k+2 overlap the math of step k). Shared rows are padded by
// 8 elements to spread the fragment loads over the banks. B is either an nn.Linear weight (N, K),
// read as a column-major K x N operand, or a row-major (K, N) matrix: one kernel, a template flag.
// Epilogue: each warp stages a fragment in shared memory, adds bias, applies the activation in fp32
// and writes the output dtype, 16 bytes per lane when N % 8 == 0 (else bounds-checked elements).
#include <mma.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/pipeline.cuh"

namespace pyllm {
namespace cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, THREADS = 256;
constexpr int LDA = BK + 8;        // A stage: BM x LDA, K contiguous
constexpr int LDB_NK = BK + 8;     // B stage from an (N, K) weight: BN x LDB_NK
constexpr int LDB_KN = BN + 8;     // B stage from a (K, N) matrix: BK x LDB_KN
constexpr int A_STAGE = BM * LDA;  // elements
constexpr int B_STAGE = (BN * LDB_NK > BK * LDB_KN) ? BN * LDB_NK : BK * LDB_KN;
constexpr int kSmemBytes = STAGES * (A_STAGE + B_STAGE) * 2 + (THREADS / 32) * 16 * 16 * 4;

__device__ __forceinline__ float activate(float v, int activation) {
  if (activation == 1) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
  if (activation == 2) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  return v;
}

// At most 128 registers a thread, so that two blocks (2 x 68 KB of shared memory) share an SM.
template <class T, bool B_NK>
__global__ void __launch_bounds__(THREADS, 2) gemm_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                        const T* __restrict__ bias, T* __restrict__ c, int M, int N,
                                                        int K, int activation) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + STAGES * A_STAGE;
  float* scratch = reinterpret_cast<float*>(smem_b + STAGES * B_STAGE);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;  // warp tile: rows warp_m*64, cols warp_n*32
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int k_tiles = K / BK + (K % BK != 0);  // not (K + BK - 1) / BK: that overflows for K near 2^31

  // 16-byte chunks: A and (N, K) B tiles are 128 rows x 4 chunks, a (K, N) B tile 32 rows x 16 chunks.
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    T* sa = smem_a + stage * A_STAGE;
    T* sb = smem_b + stage * B_STAGE;
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int chunk = threadIdx.x + it * THREADS;
      const int row = chunk / 4, col = (chunk % 4) * 8;
      const bool ok = m0 + row < M && k0 + col < K;
      cp_async16(sa + row * LDA + col, ok ? a + static_cast<int64_t>(m0 + row) * K + k0 + col : a, ok);
      if (B_NK) {
        const bool okb = n0 + row < N && k0 + col < K;
        cp_async16(sb + row * LDB_NK + col, okb ? b + static_cast<int64_t>(n0 + row) * K + k0 + col : b, okb);
      } else {
        const int brow = chunk / 16, bcol = (chunk % 16) * 8;
        const bool okb = k0 + brow < K && n0 + bcol < N;
        cp_async16(sb + brow * LDB_KN + bcol, okb ? b + static_cast<int64_t>(k0 + brow) * N + n0 + bcol : b, okb);
      }
    }
  };

  using BLayout = typename std::conditional<B_NK, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt has landed for every thread, and stage kt-1 is no longer being read
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next);
    cp_async_commit();

    const T* sa = smem_a + (kt % STAGES) * A_STAGE;
    const T* sb = smem_b + (kt % STAGES) * B_STAGE;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], sa + (warp_m * 64 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = warp_n * 32 + j * 16;
        if (B_NK)
          wmma::load_matrix_sync(fb[j], sb + col * LDB_NK + kk, LDB_NK);
        else
          wmma::load_matrix_sync(fb[j], sb + kk * LDB_KN + col, LDB_KN);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();

  float* mine = scratch + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(mine, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      // Lane owns 8 consecutive columns of one row of the 16 x 16 fragment.
      const int r = lane / 2, col = (lane % 2) * 8;
      const int m = m0 + warp_m * 64 + i * 16 + r, n = n0 + warp_n * 32 + j * 16 + col;
      if (m < M) {
        const float* src = mine + r * 16 + col;
        T* dst = c + static_cast<int64_t>(m) * N + n;
        if (N % 8 == 0) {  // the 8 values are one 16-byte aligned vector inside the row (n % 8 == 0)
          if (n < N) {
            Pack<T, 8> out;
#pragma unroll
            for (int e = 0; e < 8; ++e)
              out.v[e] = from_float<T>(activate(src[e] + (bias ? to_float(bias[n + e]) : 0.0f), activation));
            store_pack<T, 8>(dst, out);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (n + e < N) dst[e] = from_float<T>(activate(src[e] + (bias ? to_float(bias[n + e]) : 0.0f), activation));
        }
      }
      __syncwarp();
    }
  }
}

template <class T, bool B_NK>
void launch(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t c, int64_t M, int64_t N, int64_t K, int activation,
            cudaStream_t s) {
  auto kernel = gemm_kernel<T, B_NK>;
  allow_dynamic_smem(kernel, kSmemBytes, "gemm");
  const dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, BM)));
  kernel<<<grid, THREADS, kSmemBytes, s>>>(ptr<const T>(a), ptr<const T>(b), ptr<const T>(bias), ptr<T>(c),
                                           static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), activation);
}

}  // namespace

void gemm(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t c, int64_t M, int64_t N, int64_t K, bool b_is_nk,
          int activation, int dtype, uintptr_t stream) {
  if (M == 0 || N == 0) return;
  if (K % 8 != 0 || (!b_is_nk && N % 8 != 0))
    throw std::invalid_argument("pyllm._C.cuda_gemm: K (and N for a (K, N) operand) must be multiples of 8");
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_HALF(dtype, T, {
    if (b_is_nk)
      launch<T, true>(a, b, bias, c, M, N, K, activation, s);
    else
      launch<T, false>(a, b, bias, c, M, N, K, activation, s);
  });
  check_launch("gemm");
}

}  // namespace cuda
}  // namespace pyllm
