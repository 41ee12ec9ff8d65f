// Pointwise activations with their bias/gate fused: GELU(x + b) (Hendrycks & Gimpel 2016; tanh form as
// in GPT-2, or exact erf form) and SwiGLU = SiLU(gate) * up (Shazeer 2020). The backward recomputes
// the activation from its input instead of saving it (one read instead of a stored tensor), and the
// GELU backward also reduces dbias in the same pass. Tensors may be float32 or bfloat16 (kernels.h).
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
void bias_gelu_fwd_impl(Src x, Src bias, Dst y, int64_t rows, int64_t n, int threads) {
  RowBuffers params(is_bf16(bias), 1, n);
  const float* b = bias.p ? src_row(bias, 0, n, params[0]) : nullptr;
  for_each_span(rows, n, threads, is_bf16(x) || is_bf16(y), 2, [&](int64_t r, int64_t c, int64_t len,
                                                                   const RowBuffers& buf) {
    const float* xr = src_row(x, r * n + c, len, buf[0]);
    float* yr = dst_row(y, r * n + c, buf[1]);
    if (b) {
      const float* bc = b + c;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] = gelu<kTanh>(xr[i] + bc[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] = gelu<kTanh>(xr[i]);
    }
    dst_commit(y, r * n + c, yr, len);
  });
}

template <bool kTanh>
void bias_gelu_bwd_impl(Src dy, Src x, Src bias, Dst dx, Dst dbias, int64_t rows, int64_t n, int threads) {
  const bool parallel = rows * n >= PYLLM_MIN_PARALLEL_WORK && threads > 1;
  const int nt = parallel ? threads : 1;
  RowBuffers params(is_bf16(bias), 1, n);
  const float* b = bias.p ? src_row(bias, 0, n, params[0]) : nullptr;
  const bool widen = is_bf16(dy) || is_bf16(x) || is_bf16(dx);
  float* partial = dbias.p ? static_cast<float*>(calloc(static_cast<size_t>(nt) * n, sizeof(float))) : nullptr;
#pragma omp parallel num_threads(nt) if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* db = partial ? partial + static_cast<int64_t>(tid) * n : nullptr;
    const int64_t span = span_length(n, widen);  // spans as for_each_span's (the dbias partials need tid)
    RowBuffers buf(widen, 3, span);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n; c += span) {
        const int64_t len = min_i64(span, n - c);
        const float* xr = src_row(x, r * n + c, len, buf[0]);
        const float* dyr = src_row(dy, r * n + c, len, buf[1]);
        float* dxr = dst_row(dx, r * n + c, buf[2]);
        if (b) {
          const float* bc = b + c;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) dxr[i] = dyr[i] * gelu_grad<kTanh>(xr[i] + bc[i]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) dxr[i] = dyr[i] * gelu_grad<kTanh>(xr[i]);
        }
        if (db) {
          float* dbc = db + c;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) dbc[i] += dxr[i];
        }
        dst_commit(dx, r * n + c, dxr, len);
      }
    }
  }
  if (partial) {
    write_thread_sum(dbias, partial, nt, n);
    free(partial);
  }
}

}  // namespace

void bias_gelu_fwd(Src x, Src bias, Dst y, int64_t rows, int64_t n, bool tanh_approx, int threads) {
  (tanh_approx ? bias_gelu_fwd_impl<true> : bias_gelu_fwd_impl<false>)(x, bias, y, rows, n, threads);
}

void bias_gelu_bwd(Src dy, Src x, Src bias, Dst dx, Dst dbias, int64_t rows, int64_t n, bool tanh_approx,
                   int threads) {
  (tanh_approx ? bias_gelu_bwd_impl<true> : bias_gelu_bwd_impl<false>)(dy, x, bias, dx, dbias, rows, n, threads);
}

void swiglu_fwd(Src gate, Src up, Dst y, int64_t rows, int64_t n, int64_t gate_stride, int64_t up_stride,
                int threads) {
  const bool widen = is_bf16(gate) || is_bf16(up) || is_bf16(y);
  for_each_span(rows, n, threads, widen, 3, [&](int64_t r, int64_t c, int64_t len, const RowBuffers& buf) {
    const float* g = src_row(gate, r * gate_stride + c, len, buf[0]);
    const float* u = src_row(up, r * up_stride + c, len, buf[1]);
    float* yr = dst_row(y, r * n + c, buf[2]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) yr[i] = g[i] * fast_sigmoid(g[i]) * u[i];
    dst_commit(y, r * n + c, yr, len);
  });
}

// d/dg [g s(g)] = s(g) (1 + g (1 - s(g)))
void swiglu_bwd(Src dy, Src gate, Src up, Dst dgate, Dst dup, int64_t rows, int64_t n, int64_t gate_stride,
                int64_t up_stride, int64_t grad_stride, int threads) {
  const bool widen = is_bf16(dy) || is_bf16(gate) || is_bf16(up) || is_bf16(dgate) || is_bf16(dup);
  for_each_span(rows, n, threads, widen, 5, [&](int64_t r, int64_t c, int64_t len, const RowBuffers& buf) {
    const float* g = src_row(gate, r * gate_stride + c, len, buf[0]);
    const float* u = src_row(up, r * up_stride + c, len, buf[1]);
    const float* d = src_row(dy, r * n + c, len, buf[2]);
    float* dg = dst_row(dgate, r * grad_stride + c, buf[3]);
    float* du = dst_row(dup, r * grad_stride + c, buf[4]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float s = fast_sigmoid(g[i]);
      du[i] = d[i] * g[i] * s;
      dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
    dst_commit(dgate, r * grad_stride + c, dg, len);
    dst_commit(dup, r * grad_stride + c, du, len);
  });
}

PYLLM_CPU_NS_END
