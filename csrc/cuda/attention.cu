// Fused attention forward and backward on tensor cores: the FlashAttention-2 algorithm (Dao 2023).
//
// Layout: q (B, Hq, T, D), k/v (B, Hkv, S, D) contiguous; grouped-query heads map query head h to
// key/value head h / (Hq / Hkv). Queries are the last T of the S positions (query i sits at S - T + i),
// so causal masking is bottom-right aligned as in a KV-cached decode. D is 64 or 128 (template).
//
// Forward, per block of 64 queries (4 warps x 16 rows): for each 64-key tile (loaded with cp.async),
// S = Q K^T on WMMA 16x16x16 fragments (fp32 accumulate), online softmax in the exp2 domain with the
// running row max m and sum l (each row owned by a pair of lanes), P = exp2(S - m) rounded to the
// input dtype, O = O * alpha + P V. The output is O / l; lse = (m + log2 l) ln 2 is kept for backward.
// Fragment layouts are opaque in WMMA, so S and P V pass through per-warp shared memory; O stays in
// registers, 16 x D per warp spread over the lanes.
//
// Backward, per block of 64 keys of one key/value head (4 warps x 16 keys), looping over the query
// heads of the group and over the query tiles that can see these keys:
//   P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta), delta = rowsum(dO O)
//   dV += P^T dO,  dK += dS^T Q * scale  (fragments held in registers for the whole loop)
//   dQ += dS K * scale                    (fp32 atomics into a workspace, converted at the end)
#include <mma.h>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/pipeline.cuh"

namespace pyllm {
namespace cuda {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int BLOCK = 64;  // queries per forward block, keys per backward block, and the tile of the other side
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int LDS = BLOCK + 4;  // fp32 score tiles (16 x 64 per warp)
constexpr int LDP = BLOCK + 8;  // input-dtype probability tiles

template <int D>
struct Dims {
  static constexpr int LD = D + 8;   // input-dtype Q/K/V/dO tiles (64 x D)
  static constexpr int LDO = D + 4;  // fp32 per-warp 16 x D tiles
};

// 64 rows x D of a contiguous (rows, D) matrix into shared memory (leading dim ld), zero past `valid`.
template <class T, int D>
__device__ __forceinline__ void load_tile(T* smem, int ld, const T* g, int valid) {
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = threadIdx.x; c < BLOCK * kChunksPerRow; c += THREADS) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const bool ok = row < valid;
    cp_async16(smem + row * ld + col, ok ? g + static_cast<int64_t>(row) * D + col : g, ok);
  }
}

template <class T, int D>
constexpr int fwd_smem_bytes() {
  return 3 * BLOCK * Dims<D>::LD * 2 + WARPS * (16 * LDS * 4 + 16 * LDP * 2 + 16 * Dims<D>::LDO * 4);
}

template <class T, int D, bool CAUSAL>
__global__ void __launch_bounds__(THREADS) attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                 const T* __restrict__ v, T* __restrict__ o,
                                                                 float* __restrict__ lse, int Hq, int group, int T_,
                                                                 int S_, float scale_log2) {
  constexpr int LD = Dims<D>::LD, LDO = Dims<D>::LDO;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + BLOCK * LD;
  T* sv = sk + BLOCK * LD;
  float* s_all = reinterpret_cast<float*>(sv + BLOCK * LD);
  T* p_all = reinterpret_cast<T*>(s_all + WARPS * 16 * LDS);
  float* pv_all = reinterpret_cast<float*>(p_all + WARPS * 16 * LDP);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hkv = h / group;
  const int Hkv = Hq / group;
  const int q0 = blockIdx.x * BLOCK;
  const T* qg = q + (static_cast<int64_t>(bh) * T_ + q0) * D;
  const T* kg = k + (static_cast<int64_t>(b) * Hkv + hkv) * S_ * D;
  const T* vg = v + (static_cast<int64_t>(b) * Hkv + hkv) * S_ * D;
  float* s_w = s_all + warp * 16 * LDS;
  T* p_w = p_all + warp * 16 * LDP;
  float* pv_w = pv_all + warp * 16 * LDO;

  load_tile<T, D>(sq, LD, qg, T_ - q0);
  cp_async_commit();

  // Lane pair (2r, 2r+1) owns query row r of the warp's 16: lane half `part` holds columns
  // [part * 32, part * 32 + 32) of the score tile and [part * D/2, part * D/2 + D/2) of O.
  const int r = lane / 2, part = lane % 2;
  const int q_idx = q0 + warp * 16 + r;        // query index in [0, T)
  const int q_pos = S_ - T_ + q_idx;           // its key position
  float acc_o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  // The warp's 16 query rows as A fragments, read from shared memory once (at the first key tile), not
  // once per key tile and key column block.
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fq[D / 16];

  const int last_q_pos = S_ - T_ + min(q0 + BLOCK, T_) - 1;
  const int n_end = CAUSAL ? min(S_, last_q_pos + 1) : S_;
  for (int n0 = 0; n0 < n_end; n0 += BLOCK) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, D>(sk, LD, kg + static_cast<int64_t>(n0) * D, S_ - n0);
    cp_async_commit();
    load_tile<T, D>(sv, LD, vg + static_cast<int64_t>(n0) * D, S_ - n0);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K have landed; V may still be in flight
    __syncthreads();
    if (n0 == 0) {
#pragma unroll
      for (int d = 0; d < D / 16; ++d) wmma::load_matrix_sync(fq[d], sq + warp * 16 * LD + d * 16, LD);
    }

    // S_w (16 x 64) = Q_w (16 x D) K^T
#pragma unroll
    for (int j = 0; j < BLOCK / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int d = 0; d < D / 16; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sk + j * 16 * LD + d * 16, LD);
        wmma::mma_sync(acc, fq[d], fb, acc);
      }
      wmma::store_matrix_sync(s_w + j * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this lane's 32 scores of row r.
    float tile_max = -INFINITY;
    float* srow = s_w + r * LDS + part * 32;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int key = n0 + part * 32 + c;
      const bool visible = key < S_ && (!CAUSAL || key <= q_pos);
      const float s = visible ? srow[c] * scale_log2 : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float base = m_new == -INFINITY ? 0.0f : m_new;  // a fully masked row so far: keep zeros, no nan
    const float alpha = exp2f(m - base);
    float row_sum = 0.0f;
    T* prow = p_w + r * LDP + part * 32;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float p = exp2f(srow[c] - base);
      row_sum += p;
      prow[c] = from_float<T>(p);
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l = l * alpha + row_sum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] *= alpha;

    cp_async_wait<0>();  // V
    __syncthreads();

    // PV_w (16 x D) = P_w (16 x 64) V (64 x D); P's four fragments loaded once for all D / 16 columns
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp[BLOCK / 16];
#pragma unroll
    for (int kk = 0; kk < BLOCK / 16; ++kk) wmma::load_matrix_sync(fp[kk], p_w + kk * 16, LDP);
#pragma unroll
    for (int d = 0; d < D; d += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < BLOCK / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, sv + kk * 16 * LD + d, LD);
        wmma::mma_sync(acc, fp[kk], fb, acc);
      }
      wmma::store_matrix_sync(pv_w + d, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
    const float* pvrow = pv_w + r * LDO + part * (D / 2);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] += pvrow[i];
    __syncwarp();
  }

  if (q_idx < T_) {
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    T* orow = o + (static_cast<int64_t>(bh) * T_ + q_idx) * D + part * (D / 2);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) orow[i] = from_float<T>(acc_o[i] * inv_l);
    if (part == 0) lse[static_cast<int64_t>(bh) * T_ + q_idx] = l > 0.0f ? (m + log2f(l)) * kLn2 : INFINITY;
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d] (fp32), and dq_accum zeroed; one warp per row.
template <class T>
__global__ void attention_bwd_prep_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                                          float* __restrict__ dq_accum, int64_t rows, int D) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float s = 0.0f;
  for (int d = lane; d < D; d += 32) {
    s += to_float(o[row * D + d]) * to_float(dout[row * D + d]);
    dq_accum[row * D + d] = 0.0f;
  }
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

template <class T>
__global__ void attention_bwd_dq_kernel(const float* __restrict__ dq_accum, T* __restrict__ dq, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dq[i] = from_float<T>(dq_accum[i]);
}

template <class T, int D>
constexpr int bwd_smem_bytes() {
  // K, V, Q, dO tiles; per warp two fp32 16 x 64 tiles (reused as the 16 x D dQ staging tile);
  // per warp P^T (16 x 64); the block's dS^T (64 x 64); lse and delta of the query tile.
  return 4 * BLOCK * Dims<D>::LD * 2 + WARPS * 2 * 16 * LDS * 4 + WARPS * 16 * LDP * 2 + BLOCK * LDP * 2 +
         2 * BLOCK * 4;
}

template <class T, int D, bool CAUSAL>
__global__ void __launch_bounds__(THREADS) attention_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                 const T* __restrict__ v, const T* __restrict__ dout,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ delta,
                                                                 float* __restrict__ dq_accum, T* __restrict__ dk,
                                                                 T* __restrict__ dv, int Hq, int group, int T_, int S_,
                                                                 float scale) {
  constexpr int LD = Dims<D>::LD, LDO = Dims<D>::LDO;
  static_assert(2 * 16 * LDS >= 16 * LDO, "the dQ staging tile must fit in the two score tiles");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + BLOCK * LD;
  T* sq = sv + BLOCK * LD;
  T* sdo = sq + BLOCK * LD;
  float* f_all = reinterpret_cast<float*>(sdo + BLOCK * LD);
  T* pt_all = reinterpret_cast<T*>(f_all + WARPS * 2 * 16 * LDS);
  T* dst_all = pt_all + WARPS * 16 * LDP;  // dS^T of the block: 64 keys x 64 queries
  float* s_lse = reinterpret_cast<float*>(dst_all + BLOCK * LDP);
  float* s_delta = s_lse + BLOCK;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Hkv = Hq / group;
  const int bhkv = blockIdx.y, b = bhkv / Hkv, hkv = bhkv % Hkv;
  const int n0 = blockIdx.x * BLOCK;
  const float scale_log2 = scale * kLog2e;
  const T* kg = k + (static_cast<int64_t>(bhkv) * S_ + n0) * D;
  const T* vg = v + (static_cast<int64_t>(bhkv) * S_ + n0) * D;
  float* st_w = f_all + warp * 2 * 16 * LDS;  // S^T, then P^T in fp32
  float* dpt_w = st_w + 16 * LDS;             // dP^T
  T* pt_w = pt_all + warp * 16 * LDP;
  T* dst_w = dst_all + warp * 16 * LDP;

  load_tile<T, D>(sk, LD, kg, S_ - n0);
  load_tile<T, D>(sv, LD, vg, S_ - n0);
  cp_async_commit();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dk[D / 16], acc_dv[D / 16];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) {
    wmma::fill_fragment(acc_dk[i], 0.0f);
    wmma::fill_fragment(acc_dv[i], 0.0f);
  }

  // Queries that can see key n0 satisfy S - T + i >= n0.
  const int first_q = CAUSAL ? max(0, n0 - (S_ - T_)) : 0;
  const int r = lane / 2, part = lane % 2;  // lane pair owns key row r of the warp's 16
  const int key = n0 + warp * 16 + r;
  for (int hq = hkv * group; hq < (hkv + 1) * group; ++hq) {
    const int64_t bh = static_cast<int64_t>(b) * Hq + hq;
    for (int m0 = (first_q / BLOCK) * BLOCK; m0 < T_; m0 += BLOCK) {
      __syncthreads();  // the previous Q/dO tiles and dS^T are no longer read
      load_tile<T, D>(sq, LD, q + (bh * T_ + m0) * D, T_ - m0);
      load_tile<T, D>(sdo, LD, dout + (bh * T_ + m0) * D, T_ - m0);
      cp_async_commit();
      for (int i = threadIdx.x; i < BLOCK; i += THREADS) {
        const bool ok = m0 + i < T_;
        s_lse[i] = ok ? lse[bh * T_ + m0 + i] * kLog2e : INFINITY;
        s_delta[i] = ok ? delta[bh * T_ + m0 + i] : 0.0f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T_w (16 keys x 64 queries) = K_w Q^T and dP^T_w = V_w dO^T
#pragma unroll
      for (int j = 0; j < BLOCK / 16; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s, acc_dp;
        wmma::fill_fragment(acc_s, 0.0f);
        wmma::fill_fragment(acc_dp, 0.0f);
#pragma unroll
        for (int d = 0; d < D; d += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fa, sk + warp * 16 * LD + d, LD);
          wmma::load_matrix_sync(fb, sq + j * 16 * LD + d, LD);
          wmma::mma_sync(acc_s, fa, fb, acc_s);
          wmma::load_matrix_sync(fa, sv + warp * 16 * LD + d, LD);
          wmma::load_matrix_sync(fb, sdo + j * 16 * LD + d, LD);
          wmma::mma_sync(acc_dp, fa, fb, acc_dp);
        }
        wmma::store_matrix_sync(st_w + j * 16, acc_s, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(dpt_w + j * 16, acc_dp, LDS, wmma::mem_row_major);
      }
      __syncwarp();

      // P^T = exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - delta); masked entries are 0.
#pragma unroll
      for (int c = 0; c < 32; ++c) {
        const int qi = part * 32 + c, q_idx = m0 + qi;
        const bool visible = key < S_ && q_idx < T_ && (!CAUSAL || key <= S_ - T_ + q_idx);
        const float p = visible ? exp2f(st_w[r * LDS + qi] * scale_log2 - s_lse[qi]) : 0.0f;
        pt_w[r * LDP + qi] = from_float<T>(p);
        dst_w[r * LDP + qi] = from_float<T>(p * (dpt_w[r * LDS + qi] - s_delta[qi]));
      }
      __syncthreads();  // dS^T of every warp is complete (dQ below reads all 64 keys)

      // dV_w += P^T_w dO, dK_w += dS^T_w Q; each P^T / dS^T fragment loaded once for all D / 16 columns
#pragma unroll
      for (int kk = 0; kk < BLOCK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fp, fds;
        wmma::load_matrix_sync(fp, pt_w + kk, LDP);
        wmma::load_matrix_sync(fds, dst_w + kk, LDP);
#pragma unroll
        for (int d = 0; d < D / 16; ++d) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, sdo + kk * LD + d * 16, LD);
          wmma::mma_sync(acc_dv[d], fp, fb, acc_dv[d]);
          wmma::load_matrix_sync(fb, sq + kk * LD + d * 16, LD);
          wmma::mma_sync(acc_dk[d], fds, fb, acc_dk[d]);
        }
      }

      // dQ rows [warp*16, warp*16+16) of this query tile += dS (16 x 64 keys) K (64 x D) * scale.
      float* dq_w = st_w;  // the score tiles are dead now: stage 16 x D fp32 here
#pragma unroll
      for (int d = 0; d < D; d += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < BLOCK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;  // dS = (dS^T)^T
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, dst_all + kk * LDP + warp * 16, LDP);
          wmma::load_matrix_sync(fb, sk + kk * LD + d, LD);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(dq_w + d, acc, LDO, wmma::mem_row_major);
      }
      __syncwarp();
      for (int e = lane; e < 16 * D; e += 32) {
        const int row = e / D, col = e % D, q_idx = m0 + warp * 16 + row;
        if (q_idx < T_) atomicAdd(dq_accum + (bh * T_ + q_idx) * D + col, dq_w[row * LDO + col] * scale);
      }
      __syncwarp();
    }
  }

  // Write dK (scaled) and dV for this warp's 16 keys through the staging tile.
  __syncthreads();
  float* stage = f_all + warp * 2 * 16 * LDS;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    T* out = (which == 0 ? dk : dv) + (static_cast<int64_t>(bhkv) * S_ + n0 + warp * 16) * D;
    const float mul = which == 0 ? scale : 1.0f;
#pragma unroll
    for (int d = 0; d < D / 16; ++d)
      wmma::store_matrix_sync(stage + d * 16, which == 0 ? acc_dk[d] : acc_dv[d], LDO, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * D; e += 32) {
      const int row = e / D, col = e % D;
      if (n0 + warp * 16 + row < S_) out[static_cast<int64_t>(row) * D + col] = from_float<T>(stage[row * LDO + col] * mul);
    }
    __syncwarp();
  }
}

template <class T, int D, bool CAUSAL>
void launch_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int64_t B, int64_t Hq,
                int64_t Hkv, int64_t T_, int64_t S_, float scale, cudaStream_t s) {
  auto kernel = attention_fwd_kernel<T, D, CAUSAL>;
  constexpr int smem = fwd_smem_bytes<T, D>();
  allow_dynamic_smem(kernel, smem, "attention_fwd (head dim " + std::to_string(D) + ")");
  const dim3 grid(static_cast<unsigned>(ceil_div(T_, BLOCK)), static_cast<unsigned>(B * Hq));
  kernel<<<grid, THREADS, smem, s>>>(ptr<const T>(q), ptr<const T>(k), ptr<const T>(v), ptr<T>(o), ptr<float>(lse),
                                     static_cast<int>(Hq), static_cast<int>(Hq / Hkv), static_cast<int>(T_),
                                     static_cast<int>(S_), scale * kLog2e);
}

template <class T, int D, bool CAUSAL>
void launch_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t lse, uintptr_t dout, float* delta, float* dq_accum,
                uintptr_t dk, uintptr_t dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T_, int64_t S_, float scale,
                cudaStream_t s) {
  auto kernel = attention_bwd_kernel<T, D, CAUSAL>;
  constexpr int smem = bwd_smem_bytes<T, D>();
  allow_dynamic_smem(kernel, smem, "attention_bwd (head dim " + std::to_string(D) + ")");
  const dim3 grid(static_cast<unsigned>(ceil_div(S_, BLOCK)), static_cast<unsigned>(B * Hkv));
  kernel<<<grid, THREADS, smem, s>>>(ptr<const T>(q), ptr<const T>(k), ptr<const T>(v), ptr<const T>(dout),
                                     ptr<const float>(lse), delta, dq_accum, ptr<T>(dk), ptr<T>(dv),
                                     static_cast<int>(Hq), static_cast<int>(Hq / Hkv), static_cast<int>(T_),
                                     static_cast<int>(S_), scale);
}

void check_head_dim(int64_t D) {
  if (D != 64 && D != 128)
    throw std::invalid_argument("pyllm._C: attention head dim must be 64 or 128, got " + std::to_string(D));
}

}  // namespace

void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale, bool causal, int dtype,
                   uintptr_t stream) {
  check_head_dim(D);
  if (B * Hq * T == 0) return;
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_HALF(dtype, E, {
    if (D == 64)
      causal ? launch_fwd<E, 64, true>(q, k, v, o, lse, B, Hq, Hkv, T, S, scale, s)
             : launch_fwd<E, 64, false>(q, k, v, o, lse, B, Hq, Hkv, T, S, scale, s);
    else
      causal ? launch_fwd<E, 128, true>(q, k, v, o, lse, B, Hq, Hkv, T, S, scale, s)
             : launch_fwd<E, 128, false>(q, k, v, o, lse, B, Hq, Hkv, T, S, scale, s);
  });
  check_launch("attention_fwd");
}

int64_t attention_bwd_workspace(int64_t B, int64_t Hq, int64_t T, int64_t D) { return B * Hq * T * (D + 1); }

void attention_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t dout, uintptr_t dq,
                   uintptr_t dk, uintptr_t dv, uintptr_t workspace, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t S, int64_t D, float scale, bool causal, int dtype, uintptr_t stream) {
  check_head_dim(D);
  if (B * Hq * T == 0 || S == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int64_t rows = B * Hq * T;
  float* dq_accum = ptr<float>(workspace);
  float* delta = dq_accum + rows * D;
  PYLLM_DISPATCH_HALF(dtype, E, {
    attention_bwd_prep_kernel<E><<<static_cast<unsigned>(ceil_div(rows * 32, 256)), 256, 0, s>>>(
        ptr<const E>(o), ptr<const E>(dout), delta, dq_accum, rows, static_cast<int>(D));
    if (D == 64)
      causal ? launch_bwd<E, 64, true>(q, k, v, lse, dout, delta, dq_accum, dk, dv, B, Hq, Hkv, T, S, scale, s)
             : launch_bwd<E, 64, false>(q, k, v, lse, dout, delta, dq_accum, dk, dv, B, Hq, Hkv, T, S, scale, s);
    else
      causal ? launch_bwd<E, 128, true>(q, k, v, lse, dout, delta, dq_accum, dk, dv, B, Hq, Hkv, T, S, scale, s)
             : launch_bwd<E, 128, false>(q, k, v, lse, dout, delta, dq_accum, dk, dv, B, Hq, Hkv, T, S, scale, s);
    attention_bwd_dq_kernel<E><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(rows * D, 256), 65535)), 256, 0, s>>>(
        dq_accum, ptr<E>(dq), rows * D);
  });
  check_launch("attention_bwd");
}

}  // namespace cuda
}  // namespace pyllm
