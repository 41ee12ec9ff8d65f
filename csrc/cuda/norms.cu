// LayerNorm and RMSNorm forward/backward with the residual add fused (h = x + residual).
//
// One warp per row for rows up to 1024 wide, one 256-thread block per row above that; 128-bit loads
// and stores when the row width is a multiple of 16 bytes (the wrapper checks pointer alignment).
// Statistics: Welford's online mean/variance per thread, merged across threads with Chan et al.'s
// pairwise formula, so the variance does not suffer the cancellation of E[h^2] - E[h]^2.
// Backward (g = dy * w, xhat = (h - mean) * rstd):
//   LayerNorm dh = rstd (g - mean(g) - xhat mean(g xhat)),  RMSNorm dh = rstd (g - xhat mean(g xhat))
// dweight/dbias: a column kernel writes per-split partial sums, reduce_partials adds them up
// (deterministic, no atomics).
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kParamSplits = 64;  // row splits of the dweight/dbias reduction

struct Welford {
  float mean, m2, count;
};

__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.count / count;
  return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb, count};
}

__device__ __forceinline__ Welford shfl_xor(const Welford& w, int offset) {
  return {__shfl_xor_sync(0xffffffffu, w.mean, offset), __shfl_xor_sync(0xffffffffu, w.m2, offset),
          __shfl_xor_sync(0xffffffffu, w.count, offset)};
}

// Combine the statistics of the TPR threads of one row (TPR = 32: a warp; TPR = kThreads: the block).
template <int TPR>
__device__ __forceinline__ Welford row_welford(Welford w, Welford* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) w = merge(w, shfl_xor(w, o));
  // merge(a, b) and merge(b, a) may round apart, so the lanes can end a last bit apart: take lane 0's (the
  // one stored for the backward) everywhere, so every element of the row is normalised by the same values
  w = {__shfl_sync(0xffffffffu, w.mean, 0), __shfl_sync(0xffffffffu, w.m2, 0), w.count};
  if (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = w;
    __syncthreads();
    w = scratch[0];
    for (int i = 1; i < TPR / 32; ++i) w = merge(w, scratch[i]);
    __syncthreads();
  }
  return w;
}

template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = 0.0f;
    for (int i = 0; i < TPR / 32; ++i) v += scratch[i];
    __syncthreads();
  }
  return v;
}

template <class T, bool RMS, int TPR, int W>
__global__ void __launch_bounds__(kThreads) norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                                             const T* __restrict__ weight, const T* __restrict__ bias,
                                                             T* __restrict__ y, T* __restrict__ h_out,
                                                             float* __restrict__ mean_out,
                                                             float* __restrict__ rstd_out, int64_t rows, int n,
                                                             float eps) {
  __shared__ Welford scratch[kThreads / 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / TPR) + threadIdx.x / TPR;
  if (row >= rows) return;  // uniform per row group: a whole warp (TPR 32) or the whole block
  const int lane = threadIdx.x % TPR;
  const T* xr = x + row * n;
  const T* h = xr;
  if (residual) h = h_out + row * n;
  Welford acc{0.0f, 0.0f, 0.0f};
  for (int i = lane * W; i < n; i += TPR * W) {
    Pack<T, W> hv = load_pack<T, W>(xr + i);
    if (residual) {
      const Pack<T, W> rv = load_pack<T, W>(residual + row * n + i);
#pragma unroll
      for (int k = 0; k < W; ++k) hv.v[k] = from_float<T>(to_float(hv.v[k]) + to_float(rv.v[k]));
      store_pack<T, W>(h_out + row * n + i, hv);  // the new residual stream, rounded as the reference does
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float v = to_float(hv.v[k]);
      if (RMS) {
        acc.m2 += v * v;
      } else {
        acc.count += 1.0f;
        const float d = v - acc.mean;
        acc.mean += d / acc.count;
        acc.m2 += d * (v - acc.mean);
      }
    }
  }
  float mean = 0.0f, var;
  if (RMS) {
    var = row_sum<TPR>(acc.m2, reinterpret_cast<float*>(scratch)) / n;
  } else {
    acc = row_welford<TPR>(acc, scratch);
    mean = acc.mean;
    var = acc.m2 / n;
  }
  const float rstd = rsqrtf(var + eps);
  for (int i = lane * W; i < n; i += TPR * W) {
    const Pack<T, W> hv = load_pack<T, W>(h + i);
    const Pack<T, W> wv = load_pack<T, W>(weight + i);
    Pack<T, W> out;
    if (bias) {
      const Pack<T, W> bv = load_pack<T, W>(bias + i);
#pragma unroll
      for (int k = 0; k < W; ++k)
        out.v[k] = from_float<T>((to_float(hv.v[k]) - mean) * rstd * to_float(wv.v[k]) + to_float(bv.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) out.v[k] = from_float<T>((to_float(hv.v[k]) - mean) * rstd * to_float(wv.v[k]));
    }
    store_pack<T, W>(y + row * n + i, out);
  }
  if (lane == 0) {
    if (!RMS) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <class T, bool RMS, int TPR, int W>
__global__ void __launch_bounds__(kThreads) norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ h,
                                                                const T* __restrict__ weight,
                                                                const float* __restrict__ mean_in,
                                                                const float* __restrict__ rstd_in,
                                                                const T* __restrict__ dh_extra, T* __restrict__ dx,
                                                                int64_t rows, int n) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / TPR) + threadIdx.x / TPR;
  if (row >= rows) return;
  const int lane = threadIdx.x % TPR;
  const T* dyr = dy + row * n;
  const T* hr = h + row * n;
  const float mean = RMS ? 0.0f : mean_in[row];
  const float rstd = rstd_in[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int i = lane * W; i < n; i += TPR * W) {
    const Pack<T, W> dv = load_pack<T, W>(dyr + i), hv = load_pack<T, W>(hr + i), wv = load_pack<T, W>(weight + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float g = to_float(dv.v[k]) * to_float(wv.v[k]);
      sum_g += g;
      sum_gx += g * (to_float(hv.v[k]) - mean) * rstd;
    }
  }
  const float mg = RMS ? 0.0f : row_sum<TPR>(sum_g, scratch) / n;
  const float mgx = row_sum<TPR>(sum_gx, scratch) / n;
  // A LayerNorm over one element is constant in it: dx = 0 exactly (plus extra), where the formula would
  // leave the rounding of dy * w - mg (contracted to an FMA) times rstd = 1/sqrt(eps)
  const float dx_rstd = RMS || n > 1 ? rstd : 0.0f;
  for (int i = lane * W; i < n; i += TPR * W) {
    const Pack<T, W> dv = load_pack<T, W>(dyr + i), hv = load_pack<T, W>(hr + i), wv = load_pack<T, W>(weight + i);
    Pack<T, W> extra;
    if (dh_extra) extra = load_pack<T, W>(dh_extra + row * n + i);
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float xhat = (to_float(hv.v[k]) - mean) * rstd;
      float d = dx_rstd * (to_float(dv.v[k]) * to_float(wv.v[k]) - mg - xhat * mgx);
      if (dh_extra) d += to_float(extra.v[k]);
      out.v[k] = from_float<T>(d);
    }
    store_pack<T, W>(dx + row * n + i, out);
  }
}

// Block (32 columns x 8 row lanes); grid (column tiles, kParamSplits). partial: [2][splits][n] fp32.
template <class T, bool RMS>
__global__ void norm_bwd_params_kernel(const T* __restrict__ dy, const T* __restrict__ h,
                                       const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                       float* __restrict__ partial, int64_t rows, int n, bool has_bias) {
  __shared__ float sw[8][33], sb[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float acc_w = 0.0f, acc_b = 0.0f;
  if (col < n) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * 8 + threadIdx.y; r < rows; r += static_cast<int64_t>(gridDim.y) * 8) {
      const float d = to_float(dy[r * n + col]);
      const float mean = RMS ? 0.0f : mean_in[r];
      acc_w += d * (to_float(h[r * n + col]) - mean) * rstd_in[r];
      acc_b += d;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int i = 1; i < 8; ++i) {
      acc_w += sw[i][threadIdx.x];
      acc_b += sb[i][threadIdx.x];
    }
    partial[static_cast<int64_t>(blockIdx.y) * n + col] = acc_w;
    if (has_bias) partial[static_cast<int64_t>(gridDim.y + blockIdx.y) * n + col] = acc_b;
  }
}

template <class T>
__global__ void reduce_partials_kernel(const float* __restrict__ partial, int64_t parts, int64_t n, T* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.0f;
  for (int64_t p = 0; p < parts; ++p) s += partial[p * n + col];
  out[col] = from_float<T>(s);
}

template <class T, bool RMS, int TPR, int W>
void launch_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h_out,
                uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  const int64_t blocks = ceil_div(rows, kThreads / TPR);
  norm_fwd_kernel<T, RMS, TPR, W><<<blocks, kThreads, 0, stream>>>(
      ptr<const T>(x), ptr<const T>(residual), ptr<const T>(weight), ptr<const T>(bias), ptr<T>(y), ptr<T>(h_out),
      ptr<float>(mean), ptr<float>(rstd), rows, static_cast<int>(n), eps);
}

template <class T, bool RMS, int TPR, int W>
void launch_bwd_dx(uintptr_t dy, uintptr_t h, uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dh_extra,
                   uintptr_t dx, int64_t rows, int64_t n, cudaStream_t stream) {
  const int64_t blocks = ceil_div(rows, kThreads / TPR);
  norm_bwd_dx_kernel<T, RMS, TPR, W><<<blocks, kThreads, 0, stream>>>(
      ptr<const T>(dy), ptr<const T>(h), ptr<const T>(weight), ptr<const float>(mean), ptr<const float>(rstd),
      ptr<const T>(dh_extra), ptr<T>(dx), rows, static_cast<int>(n));
}

// Pick threads-per-row from the width and the vector width from divisibility, then call F.
template <class T, bool RMS, template <class, bool, int, int> class F, class... Args>
void by_shape(int64_t n, Args... args) {
  constexpr int kVec = kVecWidth<T>;
  const bool vec = n % kVec == 0;
  if (n <= 1024) {
    vec ? F<T, RMS, 32, kVec>::run(args...) : F<T, RMS, 32, 1>::run(args...);
  } else {
    vec ? F<T, RMS, kThreads, kVec>::run(args...) : F<T, RMS, kThreads, 1>::run(args...);
  }
}

template <class T, bool RMS, int TPR, int W>
struct Fwd {
  template <class... A>
  static void run(A... a) {
    launch_fwd<T, RMS, TPR, W>(a...);
  }
};
template <class T, bool RMS, int TPR, int W>
struct BwdDx {
  template <class... A>
  static void run(A... a) {
    launch_bwd_dx<T, RMS, TPR, W>(a...);
  }
};

}  // namespace

void reduce_partials(const float* partial, int64_t parts, int64_t n, int dtype, uintptr_t out, cudaStream_t stream) {
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    reduce_partials_kernel<T><<<ceil_div(n, 256), 256, 0, stream>>>(partial, parts, n, ptr<T>(out));
  });
}

void norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h_out,
              uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n, float eps, bool rms, int dtype,
              uintptr_t stream) {
  if (rows == 0 || n == 0) return;
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    if (rms)
      by_shape<T, true, Fwd>(n, x, residual, weight, bias, y, h_out, mean, rstd, rows, n, eps, s);
    else
      by_shape<T, false, Fwd>(n, x, residual, weight, bias, y, h_out, mean, rstd, rows, n, eps, s);
  });
  check_launch("norm_fwd");
}

int64_t norm_bwd_workspace(int64_t rows, int64_t n) { return 2 * kParamSplits * n; }

void norm_bwd(uintptr_t dy, uintptr_t h, uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dh_extra,
              uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t rows, int64_t n, bool rms,
              int dtype, uintptr_t stream) {
  if (n == 0) return;  // nothing to write, and a grid of 0 column tiles is an invalid launch
  const cudaStream_t s = as_stream(stream);
  float* partial = ptr<float>(workspace);
  const dim3 grid(static_cast<unsigned>(ceil_div(n, 32)), kParamSplits), block(32, 8);
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    if (rows > 0) {
      if (rms) {
        by_shape<T, true, BwdDx>(n, dy, h, weight, mean, rstd, dh_extra, dx, rows, n, s);
      } else {
        by_shape<T, false, BwdDx>(n, dy, h, weight, mean, rstd, dh_extra, dx, rows, n, s);
      }
    }
    if (rms)
      norm_bwd_params_kernel<T, true><<<grid, block, 0, s>>>(ptr<const T>(dy), ptr<const T>(h), ptr<const float>(mean),
                                                             ptr<const float>(rstd), partial, rows, static_cast<int>(n),
                                                             dbias != 0);
    else
      norm_bwd_params_kernel<T, false><<<grid, block, 0, s>>>(ptr<const T>(dy), ptr<const T>(h), ptr<const float>(mean),
                                                              ptr<const float>(rstd), partial, rows, static_cast<int>(n),
                                                              dbias != 0);
  });
  reduce_partials(partial, kParamSplits, n, dtype, dweight, s);
  if (dbias) reduce_partials(partial + kParamSplits * n, kParamSplits, n, dtype, dbias, s);
  check_launch("norm_bwd");
}

}  // namespace cuda
}  // namespace pyllm
