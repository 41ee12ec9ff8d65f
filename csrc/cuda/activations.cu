// Pointwise activations with the bias or gate fused: GELU(x + b) (tanh form as in GPT-2, or exact erf
// form) and SwiGLU = SiLU(gate) * up (Shazeer 2020), forward and backward. Memory-bound: one read of
// each input and one write, 128-bit accesses when rows are 16-byte multiples, math in fp32. The GELU
// backward reduces dbias with the same split-then-add scheme as the norms (deterministic).
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSplits = 64;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <bool kTanh>
__device__ __forceinline__ float gelu(float v) {
  if (kTanh) return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + kGeluCubic * v * v * v)));
  return 0.5f * v * (1.0f + erff(v * kInvSqrt2));
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float v) {
  if (kTanh) {
    const float t = tanhf(kSqrt2OverPi * (v + kGeluCubic * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * v * v);
  }
  return 0.5f * (1.0f + erff(v * kInvSqrt2)) + v * kInvSqrt2Pi * __expf(-0.5f * v * v);
}

inline unsigned grid_for(int64_t packs) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(packs, kThreads), 65535LL * 8));
}

// dx = dy * GELU'(x + b) (BWD) or y = GELU(x + b), over (rows, n) with W elements per thread step.
template <class T, bool kTanh, bool BWD, int W>
__global__ void __launch_bounds__(kThreads) bias_gelu_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                                              const T* __restrict__ dy, T* __restrict__ out,
                                                              int64_t total, int64_t n) {
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * W; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads * W) {
    const Pack<T, W> xv = load_pack<T, W>(x + e);
    Pack<T, W> bv, dv, o;
    if (bias) bv = load_pack<T, W>(bias + e % n);
    if (BWD) dv = load_pack<T, W>(dy + e);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float v = to_float(xv.v[k]) + (bias ? to_float(bv.v[k]) : 0.0f);
      o.v[k] = from_float<T>(BWD ? to_float(dv.v[k]) * gelu_grad<kTanh>(v) : gelu<kTanh>(v));
    }
    store_pack<T, W>(out + e, o);
  }
}

// Column sums of a (rows, n) tensor into partial[gridDim.y][n] (fp32).
template <class T>
__global__ void column_partial_sums_kernel(const T* __restrict__ a, float* __restrict__ partial, int64_t rows, int64_t n) {
  __shared__ float s[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < n)
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * 8 + threadIdx.y; r < rows; r += static_cast<int64_t>(gridDim.y) * 8)
      acc += to_float(a[r * n + col]);
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int i = 1; i < 8; ++i) acc += s[i][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * n + col] = acc;
  }
}

template <class T, bool BWD, int W>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                           const T* __restrict__ dy, T* __restrict__ out,
                                                           T* __restrict__ dup, int64_t total, int64_t n,
                                                           int64_t gate_stride, int64_t up_stride) {
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * W; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads * W) {
    const int64_t row = e / n, col = e % n;
    const Pack<T, W> g = load_pack<T, W>(gate + row * gate_stride + col), u = load_pack<T, W>(up + row * up_stride + col);
    Pack<T, W> d, o, du;
    if (BWD) d = load_pack<T, W>(dy + e);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float gv = to_float(g.v[k]), uv = to_float(u.v[k]);
      const float sig = 1.0f / (1.0f + __expf(-gv));
      if (BWD) {
        const float dv = to_float(d.v[k]);
        o.v[k] = from_float<T>(dv * uv * sig * (1.0f + gv * (1.0f - sig)));  // d silu(g) / dg
        du.v[k] = from_float<T>(dv * gv * sig);
      } else {
        o.v[k] = from_float<T>(gv * sig * uv);
      }
    }
    store_pack<T, W>(out + e, o);
    if (BWD) store_pack<T, W>(dup + e, du);
  }
}

template <class T, bool BWD>
void launch_gelu(uintptr_t x, uintptr_t bias, uintptr_t dy, uintptr_t out, int64_t rows, int64_t n, bool tanh_approx,
                 cudaStream_t s) {
  constexpr int kVec = kVecWidth<T>;
  const int64_t total = rows * n;
  const bool vec = n % kVec == 0;
  const unsigned grid = grid_for(vec ? total / kVec : total);
  const T *px = ptr<const T>(x), *pb = ptr<const T>(bias), *pd = ptr<const T>(dy);
  T* po = ptr<T>(out);
  if (tanh_approx) {
    vec ? bias_gelu_kernel<T, true, BWD, kVec><<<grid, kThreads, 0, s>>>(px, pb, pd, po, total, n)
        : bias_gelu_kernel<T, true, BWD, 1><<<grid, kThreads, 0, s>>>(px, pb, pd, po, total, n);
  } else {
    vec ? bias_gelu_kernel<T, false, BWD, kVec><<<grid, kThreads, 0, s>>>(px, pb, pd, po, total, n)
        : bias_gelu_kernel<T, false, BWD, 1><<<grid, kThreads, 0, s>>>(px, pb, pd, po, total, n);
  }
}

template <class T, bool BWD>
void launch_swiglu(uintptr_t gate, uintptr_t up, uintptr_t dy, uintptr_t out, uintptr_t dup, int64_t rows, int64_t n,
                   int64_t gs, int64_t us, cudaStream_t s) {
  constexpr int kVec = kVecWidth<T>;
  const int64_t total = rows * n;
  const bool vec = n % kVec == 0 && gs % kVec == 0 && us % kVec == 0;
  const unsigned grid = grid_for(vec ? total / kVec : total);
  if (vec)
    swiglu_kernel<T, BWD, kVec><<<grid, kThreads, 0, s>>>(ptr<const T>(gate), ptr<const T>(up), ptr<const T>(dy),
                                                         ptr<T>(out), ptr<T>(dup), total, n, gs, us);
  else
    swiglu_kernel<T, BWD, 1><<<grid, kThreads, 0, s>>>(ptr<const T>(gate), ptr<const T>(up), ptr<const T>(dy),
                                                      ptr<T>(out), ptr<T>(dup), total, n, gs, us);
}

}  // namespace

void bias_gelu_fwd(uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n, bool tanh_approx, int dtype,
                   uintptr_t stream) {
  if (rows * n == 0) return;
  PYLLM_DISPATCH_FLOAT(dtype, T, { launch_gelu<T, false>(x, bias, 0, y, rows, n, tanh_approx, as_stream(stream)); });
  check_launch("bias_gelu_fwd");
}

int64_t bias_gelu_bwd_workspace(int64_t rows, int64_t n) { return kSplits * n; }

void bias_gelu_bwd(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, uintptr_t dbias, uintptr_t workspace,
                   int64_t rows, int64_t n, bool tanh_approx, int dtype, uintptr_t stream) {
  if (n == 0) return;  // nothing to write, and a grid of 0 column tiles is an invalid launch
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    if (rows * n > 0) launch_gelu<T, true>(x, bias, dy, dx, rows, n, tanh_approx, s);
    if (dbias) {
      const dim3 grid(static_cast<unsigned>(ceil_div(n, 32)), kSplits), block(32, 8);
      column_partial_sums_kernel<T><<<grid, block, 0, s>>>(ptr<const T>(dx), ptr<float>(workspace), rows, n);
    }
  });
  if (dbias) reduce_partials(ptr<const float>(workspace), kSplits, n, dtype, dbias, s);
  check_launch("bias_gelu_bwd");
}

void swiglu_fwd(uintptr_t gate, uintptr_t up, uintptr_t y, int64_t rows, int64_t n, int64_t gate_stride,
                int64_t up_stride, int dtype, uintptr_t stream) {
  if (rows * n == 0) return;
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    launch_swiglu<T, false>(gate, up, 0, y, 0, rows, n, gate_stride, up_stride, as_stream(stream));
  });
  check_launch("swiglu_fwd");
}

void swiglu_bwd(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t rows, int64_t n,
                int64_t gate_stride, int64_t up_stride, int dtype, uintptr_t stream) {
  if (rows * n == 0) return;
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    launch_swiglu<T, true>(gate, up, dy, dgate, dup, rows, n, gate_stride, up_stride, as_stream(stream));
  });
  check_launch("swiglu_bwd");
}

}  // namespace cuda
}  // namespace pyllm
