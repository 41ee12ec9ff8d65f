// Pointwise activations with their bias/gate fused: GELU(x + b) (Hendrycks & Gimpel 2016; tanh form as
// in GPT-2, or exact erf form) and SwiGLU = SiLU(gate) * up (Shazeer 2020). The backward recomputes
// the activation from its input instead of saving it (one read instead of a stored tensor), and the
// GELU backward also reduces dbias in the same pass.
#include <stdlib.h>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <bool kTanh>
inline float gelu(float v) {
  if (kTanh) return 0.5f * v * (1.0f + fast_tanh(kSqrt2OverPi * (v + kGeluCubic * v * v * v)));
  return 0.5f * v * (1.0f + fast_erf(v * kInvSqrt2));
}

template <bool kTanh>
inline float gelu_grad(float v) {
  if (kTanh) {
    const float t = fast_tanh(kSqrt2OverPi * (v + kGeluCubic * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * v * v);
  }
  return 0.5f * (1.0f + fast_erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * fast_exp(-0.5f * v * v);
}

template <bool kTanh>
void bias_gelu_fwd_impl(const float* x, const float* bias, float* y, int64_t rows, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    if (bias) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = gelu<kTanh>(xr[i] + bias[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = gelu<kTanh>(xr[i]);
    }
  }
}

template <bool kTanh>
void bias_gelu_bwd_impl(const float* dy, const float* x, const float* bias, float* dx, float* dbias, int64_t rows,
                        int64_t n, int threads) {
  const bool parallel = rows * n >= PYLLM_MIN_PARALLEL_WORK && threads > 1;
  const int nt = parallel ? threads : 1;
  float* partial = dbias ? static_cast<float*>(calloc(static_cast<size_t>(nt) * n, sizeof(float))) : nullptr;
#pragma omp parallel num_threads(nt) if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* db = partial ? partial + static_cast<int64_t>(tid) * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * n;
      const float* dyr = dy + r * n;
      float* dxr = dx + r * n;
      if (bias) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxr[i] = dyr[i] * gelu_grad<kTanh>(xr[i] + bias[i]);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxr[i] = dyr[i] * gelu_grad<kTanh>(xr[i]);
      }
      if (db) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) db[i] += dxr[i];
      }
    }
  }
  if (dbias) {
    for (int64_t i = 0; i < n; ++i) {
      float s = 0.0f;
      for (int t = 0; t < nt; ++t) s += partial[static_cast<int64_t>(t) * n + i];
      dbias[i] = s;
    }
    free(partial);
  }
}

}  // namespace

void bias_gelu_fwd(const float* x, const float* bias, float* y, int64_t rows, int64_t n, bool tanh_approx,
                   int threads) {
  (tanh_approx ? bias_gelu_fwd_impl<true> : bias_gelu_fwd_impl<false>)(x, bias, y, rows, n, threads);
}

void bias_gelu_bwd(const float* dy, const float* x, const float* bias, float* dx, float* dbias, int64_t rows,
                   int64_t n, bool tanh_approx, int threads) {
  (tanh_approx ? bias_gelu_bwd_impl<true> : bias_gelu_bwd_impl<false>)(dy, x, bias, dx, dbias, rows, n, threads);
}

void swiglu_fwd(const float* gate, const float* up, float* y, int64_t rows, int64_t n, int64_t gate_stride,
                int64_t up_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * gate_stride;
    const float* u = up + r * up_stride;
    float* yr = y + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] = g[i] * fast_sigmoid(g[i]) * u[i];
  }
}

// d/dg [g s(g)] = s(g) (1 + g (1 - s(g)))
void swiglu_bwd(const float* dy, const float* gate, const float* up, float* dgate, float* dup, int64_t rows,
                int64_t n, int64_t gate_stride, int64_t up_stride, int64_t grad_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * gate_stride;
    const float* u = up + r * up_stride;
    const float* d = dy + r * n;
    float* dg = dgate + r * grad_stride;
    float* du = dup + r * grad_stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float s = fast_sigmoid(g[i]);
      du[i] = d[i] * g[i] * s;
      dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
  }
}

PYLLM_CPU_NS_END
