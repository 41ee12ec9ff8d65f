// LayerNorm and RMSNorm forward/backward over rows, with the residual add fused in (pre-norm blocks
// compute h = x + residual and norm(h) in one pass over memory instead of three).
//
// Forward per row: the residual add and the row sum in one pass, the variance around the mean in a second
// over h while it is in L1 (more accurate than E[h^2] - E[h]^2), then y = (h - mean) * rstd * w + b.
// Backward (Ba et al. 2016; g = dy * w, xhat = (h - mean) * rstd):
//   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat)),  xhat = h * rstd
// dweight/dbias are reduced per thread into private buffers, then summed.
#include <stdlib.h>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

void norm_fwd(const float* x, const float* residual, const float* weight, const float* bias, float* y,
              float* h_out, float* mean_out, float* rstd_out, int64_t rows, int64_t n, float eps, bool rms,
              int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PYLLM_MIN_PARALLEL_WORK)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    // First pass: h = x + residual (written once), with sum(h) for LayerNorm or sum(h^2) for RMSNorm.
    const float* h = xr;
    float s1 = 0.0f;
    if (residual) {
      const float* rr = residual + r * n;
      float* hr = h_out + r * n;
      if (rms) {
#pragma omp simd reduction(+ : s1)
        for (int64_t i = 0; i < n; ++i) {
          hr[i] = xr[i] + rr[i];
          s1 += hr[i] * hr[i];
        }
      } else {
#pragma omp simd reduction(+ : s1)
        for (int64_t i = 0; i < n; ++i) {
          hr[i] = xr[i] + rr[i];
          s1 += hr[i];
        }
      }
      h = hr;
    } else if (rms) {
#pragma omp simd reduction(+ : s1)
      for (int64_t i = 0; i < n; ++i) s1 += h[i] * h[i];
    } else {
#pragma omp simd reduction(+ : s1)
      for (int64_t i = 0; i < n; ++i) s1 += h[i];
    }
    const float mean = rms ? 0.0f : s1 / static_cast<float>(n);
    // Second pass (LayerNorm, h now in L1): the variance around the mean.
    float sq = s1;
    if (!rms) {
      sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < n; ++i) {
        const float d = h[i] - mean;
        sq += d * d;
      }
    }
    const float rstd = 1.0f / sqrtf(sq / static_cast<float>(n) + eps);
    if (bias) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (h[i] - mean) * rstd * weight[i] + bias[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (h[i] - mean) * rstd * weight[i];
    }
    if (!rms) mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

void norm_bwd(const float* dy, const float* h, const float* weight, const float* mean_in, const float* rstd_in,
              const float* dh_extra, float* dx, float* dweight, float* dbias, int64_t rows, int64_t n, bool rms,
              int threads) {
  const bool parallel = rows * n >= PYLLM_MIN_PARALLEL_WORK && threads > 1;
  const int nt = parallel ? threads : 1;
  // Per-thread partial sums of dweight (and dbias): nt x n each.
  float* partial = static_cast<float*>(calloc(static_cast<size_t>(nt) * n * (dbias ? 2 : 1), sizeof(float)));
#pragma omp parallel num_threads(nt) if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* dw = partial + static_cast<int64_t>(tid) * n;
    float* db = dbias ? partial + static_cast<int64_t>(nt + tid) * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* dyr = dy + r * n;
      const float* hr = h + r * n;
      float* dxr = dx + r * n;
      const float mean = rms ? 0.0f : mean_in[r];
      const float rstd = rstd_in[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = (hr[i] - mean) * rstd;
        const float g = dyr[i] * weight[i];
        sum_g += g;
        sum_gx += g * xhat;
        dw[i] += dyr[i] * xhat;
      }
      if (db) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) db[i] += dyr[i];
      }
      const float mg = rms ? 0.0f : sum_g / static_cast<float>(n);
      const float mgx = sum_gx / static_cast<float>(n);
      const float* extra = dh_extra ? dh_extra + r * n : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = (hr[i] - mean) * rstd;
        float d = rstd * (dyr[i] * weight[i] - mg - xhat * mgx);
        if (extra) d += extra[i];
        dxr[i] = d;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    float sw = 0.0f, sb = 0.0f;
    for (int t = 0; t < nt; ++t) {
      sw += partial[static_cast<int64_t>(t) * n + i];
      if (dbias) sb += partial[static_cast<int64_t>(nt + t) * n + i];
    }
    dweight[i] = sw;
    if (dbias) dbias[i] = sb;
  }
  free(partial);
}

PYLLM_CPU_NS_END
