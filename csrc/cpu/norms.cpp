// LayerNorm and RMSNorm forward/backward over rows, with the residual add fused in (pre-norm blocks
// compute h = x + residual and norm(h) in one pass over memory instead of three).
//
// Forward per row: the residual add and the row sum in one pass, the variance around the mean in a second
// over h while it is in L1 (more accurate than E[h^2] - E[h]^2), then y = (h - mean) * rstd * w + b.
// Backward (Ba et al. 2016; g = dy * w, xhat = (h - mean) * rstd):
//   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat)),  xhat = h * rstd
// dweight/dbias are reduced per thread into private buffers, then summed.
// Every tensor but the statistics may be bfloat16 (kernels.h): rows are widened into float buffers.
#include <stdlib.h>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

inline float sum(const float* a, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

inline float sum_of_squares(const float* a, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * a[i];
  return s;
}

}  // namespace

void norm_fwd(Src x, Src residual, Src weight, Src bias, Dst y, Dst h_out, float* mean_out, float* rstd_out,
              int64_t rows, int64_t n, float eps, bool rms, int threads) {
  RowBuffers params(is_bf16(weight) || is_bf16(bias), 2, n);
  const float* w = src_row(weight, 0, n, params[0]);
  const float* b = bias.p ? src_row(bias, 0, n, params[1]) : nullptr;
  const bool widen = is_bf16(x) || is_bf16(residual) || is_bf16(y) || is_bf16(h_out);
  for_each_row(rows, n, threads, widen, 4, [&](int64_t r, const RowBuffers& buf) {
    const float* xr = src_row(x, r * n, n, buf[0]);
    float* yr = dst_row(y, r * n, buf[1]);
    // First pass: h = x + residual (written once), with sum(h) for LayerNorm or sum(h^2) for RMSNorm.
    const float* h = xr;
    float s1 = 0.0f;
    if (residual.p) {
      const float* rr = src_row(residual, r * n, n, buf[2]);
      float* hr = dst_row(h_out, r * n, buf[3]);
      if (is_bf16(h_out)) {  // normalised as stored (rounded), as the reference normalises x + residual
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) hr[i] = round_to_bf16(xr[i] + rr[i]);
        s1 = rms ? sum_of_squares(hr, n) : sum(hr, n);
        dst_commit(h_out, r * n, hr, n);
      } else if (rms) {
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
    } else {
      s1 = rms ? sum_of_squares(h, n) : sum(h, n);
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
    if (b) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (h[i] - mean) * rstd * w[i] + b[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = (h[i] - mean) * rstd * w[i];
    }
    dst_commit(y, r * n, yr, n);
    if (!rms) mean_out[r] = mean;
    rstd_out[r] = rstd;
  });
}

void norm_bwd(Src dy, Src h, Src weight, const float* mean_in, const float* rstd_in, Src dh_extra, Dst dx,
              Dst dweight, Dst dbias, int64_t rows, int64_t n, bool rms, int threads) {
  const bool parallel = rows * n >= PYLLM_MIN_PARALLEL_WORK && threads > 1;
  const int nt = parallel ? threads : 1;
  RowBuffers params(is_bf16(weight), 1, n);
  const float* w = src_row(weight, 0, n, params[0]);
  const bool widen = is_bf16(dy) || is_bf16(h) || is_bf16(dh_extra) || is_bf16(dx);
  // Per-thread partial sums of dweight (and dbias): nt x n each.
  float* partial = static_cast<float*>(calloc(static_cast<size_t>(nt) * n * (dbias.p ? 2 : 1), sizeof(float)));
#pragma omp parallel num_threads(nt) if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* dw = partial + static_cast<int64_t>(tid) * n;
    float* db = dbias.p ? partial + static_cast<int64_t>(nt + tid) * n : nullptr;
    RowBuffers buf(widen, 4, n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* dyr = src_row(dy, r * n, n, buf[0]);
      const float* hr = src_row(h, r * n, n, buf[1]);
      float* dxr = dst_row(dx, r * n, buf[2]);
      const float mean = rms ? 0.0f : mean_in[r];
      const float rstd = rstd_in[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = (hr[i] - mean) * rstd;
        const float g = dyr[i] * w[i];
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
      const float* extra = dh_extra.p ? src_row(dh_extra, r * n, n, buf[3]) : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = (hr[i] - mean) * rstd;
        float d = rstd * (dyr[i] * w[i] - mg - xhat * mgx);
        if (extra) d += extra[i];
        dxr[i] = d;
      }
      dst_commit(dx, r * n, dxr, n);
    }
  }
  write_thread_sum(dweight, partial, nt, n);
  if (dbias.p) write_thread_sum(dbias, partial + static_cast<int64_t>(nt) * n, nt, n);
  free(partial);
}

PYLLM_CPU_NS_END
