// LayerNorm and RMSNorm forward/backward over rows, with the residual add fused in (pre-norm blocks
// compute h = x + residual and norm(h) in one pass over memory instead of three).
//
// Forward per row: the residual add and the row sum in one pass, the variance around the mean in a second
// over h while it is in L1 (more accurate than E[h^2] - E[h]^2), then y = (h - mean) * rstd * w + b.
// Backward (Ba et al. 2016; g = dy * w, xhat = (h - mean) * rstd):
//   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat)),  xhat = h * rstd
// dweight/dbias are reduced per thread into private buffers, then summed.
// Every tensor but the statistics may be bfloat16 (kernels.h): the loops are templated on each operand's
// storage type and convert in registers (a float copy of h is kept only when h is stored as bfloat16).
#include <stdlib.h>

#include <type_traits>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

inline float sum(const float* a, int64_t n) {
  return row_sum(n, [&](int64_t i) { return a[i]; });
}

inline float sum_of_squares(const float* a, int64_t n) {
  return row_sum(n, [&](int64_t i) { return a[i] * a[i]; });
}

// h = x + r written to h_out, and as float (the value as stored) to hf; returns sum(h), or sum(h^2) for
// RMSNorm. hf is h_out itself when h_out is float32.
template <bool kSquares, class TX, class TR, class TH>
float add_residual(const TX* __restrict x, const TR* __restrict r, TH* __restrict h_out, float* hf, int64_t n) {
  return row_sum(n, [&](int64_t i) {
    const float v = store(h_out, i, load(x, i) + load(r, i));
    if constexpr (!std::is_same_v<TH, float>) hf[i] = v;
    return kSquares ? v * v : v;
  });
}

// Where a row of h is read as float: h_out's own memory when float32, else the buffer.
inline float* float_row(float* own, float*) { return own; }
inline float* float_row(uint16_t*, float* buf) { return buf; }

// y = (h - mean) * rstd * w (+ b).
template <class TY>
void normalize(const float* __restrict h, float mean, float rstd, const float* __restrict w,
               const float* __restrict b, TY* __restrict y, int64_t n) {
  if (b) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(y, i, (h[i] - mean) * rstd * w[i] + b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(y, i, (h[i] - mean) * rstd * w[i]);
  }
}

// One row of the backward's reductions, {sum(g), sum(g * xhat)} with g = dy * w, and the row's
// contributions to the dweight (and dbias, unless null) partial sums. Inlined by force, as norm_bwd_dx: GCC
// called them per row (16 type combinations), which made the fp32 backward at 768 x 128 ~50% slower.
template <class TDY, class TH>
PYLLM_INLINE Vals<2> norm_bwd_sums(const TDY* __restrict dy, const TH* __restrict h, const float* __restrict w,
                                   float mean, float rstd, float* __restrict dw, float* __restrict db, int64_t n) {
  const auto terms = [&](int64_t i, float d) {
    const float xhat = (load(h, i) - mean) * rstd, g = d * w[i];
    dw[i] += d * xhat;
    return Vals<2>{{g, g * xhat}};
  };
  constexpr int L = lanes<2, TDY, TH>();
  if (!db) return row_sums<2, L>(n, [&](int64_t i) { return terms(i, load(dy, i)); });
  return row_sums<2, L>(n, [&](int64_t i) {
    const float d = load(dy, i);
    db[i] += d;
    return terms(i, d);
  });
}

// dx = rstd * (dy * w - mg - xhat * mgx) (+ extra, the gradient reaching h directly, unless null).
template <class TDY, class TH, class TE, class TDX>
PYLLM_INLINE void norm_bwd_dx(const TDY* __restrict dy, const TH* __restrict h, const float* __restrict w,
                              const TE* extra, TDX* __restrict dx, float mean, float rstd, float mg, float mgx,
                              int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (load(h, i) - mean) * rstd;
    float d = rstd * (load(dy, i) * w[i] - mg - xhat * mgx);
    if (extra) d += load(extra, i);
    store(dx, i, d);
  }
}

}  // namespace

void norm_fwd(Src x, Src residual, Src weight, Src bias, Dst y, Dst h_out, float* mean_out, float* rstd_out,
              int64_t rows, int64_t n, float eps, bool rms, int threads) {
  RowBuffers params(is_bf16(weight) || is_bf16(bias), 2, n);
  const float* w = src_row(weight, 0, n, params[0]);
  const float* b = bias.p ? src_row(bias, 0, n, params[1]) : nullptr;
  // A float copy of h when it is not already float32 in memory (bfloat16 h_out, or bfloat16 x alone).
  const bool widen = residual.p ? is_bf16(h_out) : is_bf16(x);
  for_each_row(rows, n, threads, widen, 1, [&](int64_t r, const RowBuffers& buf) {
    // First pass: h = x + residual (written once), with sum(h) for LayerNorm or sum(h^2) for RMSNorm.
    const float* h = nullptr;
    float s1 = 0.0f;
    if (residual.p) {
      typed(x, [&](auto xp) { typed(residual, [&](auto rp) { typed(h_out, [&](auto hp) {
        // bf16 h is normalised as stored (rounded), as the reference normalises x + residual
        float* hf = float_row(hp + r * n, buf[0]);
        s1 = rms ? add_residual<true>(xp + r * n, rp + r * n, hp + r * n, hf, n)
                 : add_residual<false>(xp + r * n, rp + r * n, hp + r * n, hf, n);
        h = hf;
      }); }); });
    } else {
      h = src_row(x, r * n, n, buf[0]);
      s1 = rms ? sum_of_squares(h, n) : sum(h, n);
    }
    const float mean = rms ? 0.0f : s1 / static_cast<float>(n);
    // Second pass (LayerNorm, h now in L1): the variance around the mean.
    const float sq = rms ? s1 : row_sum(n, [&](int64_t i) { return (h[i] - mean) * (h[i] - mean); });
    const float rstd = 1.0f / sqrtf(sq / static_cast<float>(n) + eps);
    typed(y, [&](auto yp) { normalize(h, mean, rstd, w, b, yp + r * n, n); });
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
  // Per-thread partial sums of dweight (and dbias): nt x n each. dw[i] and db[i] are stored in the same
  // loop: the dbias block starts half a page off a 4 KiB multiple from the dweight block, so that the
  // two stores and the next loads never share their address's low 12 bits (4K aliasing).
  const int64_t db_offset = (static_cast<int64_t>(nt) * n + 1023) / 1024 * 1024 + 512;
  float* partial = static_cast<float*>(calloc(static_cast<size_t>(db_offset + nt * n), sizeof(float)));
  typed(dy, [&](auto dyp) { typed(h, [&](auto hp) { typed(dh_extra, [&](auto ep) { typed(dx, [&](auto dxp) {
#pragma omp parallel num_threads(nt) if (parallel)
    {
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      float* dw = partial + static_cast<int64_t>(tid) * n;
      float* db = dbias.p ? partial + db_offset + static_cast<int64_t>(tid) * n : nullptr;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * n;
        const float mean = rms ? 0.0f : mean_in[r];
        const float rstd = rstd_in[r];
        const Vals<2> s = norm_bwd_sums(dyp + o, hp + o, w, mean, rstd, dw, db, n);
        const float mg = rms ? 0.0f : s.v[0] / static_cast<float>(n);
        const float mgx = s.v[1] / static_cast<float>(n);
        // A LayerNorm over one element is constant in it: dx = 0 exactly (plus extra), where the formula
        // would leave the rounding of dy * w - mg times rstd = 1/sqrt(eps)
        const float dx_rstd = rms || n > 1 ? rstd : 0.0f;
        norm_bwd_dx(dyp + o, hp + o, w, ep ? ep + o : ep, dxp + o, mean, dx_rstd, mg, mgx, n);
      }
    }
  }); }); }); });
  write_thread_sum(dweight, partial, nt, n);
  if (dbias.p) write_thread_sum(dbias, partial + db_offset, nt, n);
  free(partial);
}

PYLLM_CPU_NS_END
