// Attention for small heads on the CPU: o = softmax(q k^T * scale + mask) v, forward and backward.
//
// One (batch, head) at a time, its whole (T, S) score matrix in a per-thread scratch (the Python wrapper
// sends only T * S <= 512 * 512 here; larger problems go to PyTorch's flash-style SDPA). Queries are the
// last T of the S key positions (bottom-right causal alignment): query i sees keys j <= S - T + i, and
// only those columns are ever computed. The forward saves lse = log sum_j exp(s_ij) per query row; the
// backward recomputes P = exp(s - lse) (FlashAttention-2, Dao 2023, section 3.1.2):
//   dV = P^T dO,  dP = dO V^T,  Dsum_i = dO_i . O_i,  dS = P * (dP - Dsum),  dQ = scale dS K,  dK = scale dS^T Q.
// Every product is written as out[c] = sum_r a[r] M[r, c] over a row-major M, with the output columns
// held in a 16-wide register accumulator (a broadcast-FMA over rows); K and V are copied transposed,
// and P and dS transposed, so that each of the five products has that form.
#include <vector>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kVec = 16;  // floats per AVX-512 register (two AVX2 ones)

// out[c] = sum_{r < rows} a[r] * m[r * ld + c] for c < W. Rows are split into 64 / W interleaved phases
// with separate accumulators, so that four independent chains of 16-float FMAs hide the FMA latency; the phases are added at the end.
template <int64_t W>
inline void row_times_block(float* out, const float* a, const float* m, int64_t ld, int64_t rows) {
  constexpr int64_t R = 64 / W;
  float acc[R][W] = {};
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    for (int64_t ph = 0; ph < R; ++ph) {
      const float ar = a[r + ph];
      const float* mr = m + (r + ph) * ld;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) acc[ph][c] += ar * mr[c];
    }
  for (; r < rows; ++r) {
    const float ar = a[r];
    const float* mr = m + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) acc[0][c] += ar * mr[c];
  }
  for (int64_t ph = 1; ph < R; ++ph)
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) acc[0][c] += acc[ph][c];
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) out[c] = acc[0][c];
}

// out[c] = sum_{r < rows} a[r] * m[r * ld + c] for c < cols: blocks of 64, 32 and 16 columns, then a
// scalar-length tail (callers pad their scratch to multiples of 16 where they can, so it rarely runs).
inline void row_times_matrix(float* out, const float* a, const float* m, int64_t ld, int64_t rows, int64_t cols) {
  int64_t c0 = 0;
  for (; c0 + 64 <= cols; c0 += 64) row_times_block<64>(out + c0, a, m + c0, ld, rows);
  if (c0 + 32 <= cols) {
    row_times_block<32>(out + c0, a, m + c0, ld, rows);
    c0 += 32;
  }
  if (c0 + 16 <= cols) {
    row_times_block<16>(out + c0, a, m + c0, ld, rows);
    c0 += 16;
  }
  for (int64_t c = c0; c < cols; ++c) {
    float acc = 0.0f;
    for (int64_t r = 0; r < rows; ++r) acc += a[r] * m[r * ld + c];
    out[c] = acc;
  }
}

inline int64_t round_up(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

// dst (cols, ld_dst) = src (rows, cols)^T for the first rows of src (row stride ld_src).
inline void transpose(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Keys query i may see: j < visible(i).
inline int64_t visible(int64_t i, int64_t T, int64_t S, bool causal) {
  if (!causal) return S;
  const int64_t n = S - T + i + 1;
  return n < 0 ? 0 : (n > S ? S : n);
}

// First query that sees key j (the transpose of visible).
inline int64_t first_query(int64_t j, int64_t T, int64_t S, bool causal) {
  if (!causal) return 0;
  const int64_t i = j - (S - T);
  return i < 0 ? 0 : i;
}

// s[j] = scale * q . k_j for j < n (kt: K transposed, (D, Sp), zero beyond S); returns max_j s[j]. s has
// room for round_up(n) entries: whole 16-column blocks are computed.
inline float scores(float* s, const float* q, const float* kt, int64_t Sp, int64_t D, int64_t n, float scale) {
  row_times_matrix(s, q, kt, Sp, D, round_up(n));
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    m = s[j] > m ? s[j] : m;
  }
  return m;
}

}  // namespace

void attention_fwd(const float* q, const float* k, const float* v, float* o, float* lse, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale, bool causal, int threads) {
  const int64_t group = Hq / Hkv, Sp = round_up(S);
#pragma omp parallel num_threads(threads) if (B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK)
  {
    std::vector<float> kt(D * Sp), s(Sp);  // K^T (D, Sp) zero-padded, and one row of scores
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hq; ++bh) {
      const int64_t kv = (bh / Hq) * Hkv + (bh % Hq) / group;
      const float* kh = k + kv * S * D;
      const float* vh = v + kv * S * D;
      transpose(kt.data(), Sp, kh, D, S, D);
      for (int64_t i = 0; i < T; ++i) {
        const float* qi = q + (bh * T + i) * D;
        float* oi = o + (bh * T + i) * D;
        const int64_t n = visible(i, T, S, causal);
        if (n == 0) {  // no key visible: zero output, and lse = -inf marks the row for the backward
          for (int64_t d = 0; d < D; ++d) oi[d] = 0.0f;
          lse[bh * T + i] = -INFINITY;
          continue;
        }
        const float m = scores(s.data(), qi, kt.data(), Sp, D, n, scale);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          s[j] = fast_exp(s[j] - m);
          sum += s[j];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
        row_times_matrix(oi, s.data(), vh, D, n, D);
        lse[bh * T + i] = m + logf(sum);
      }
    }
  }
}

void attention_bwd(const float* q, const float* k, const float* v, const float* o, const float* lse,
                   const float* dout, float* dq, float* dk, float* dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t S, int64_t D, float scale, bool causal, int threads) {
  const int64_t group = Hq / Hkv, Sp = round_up(S);
  // One (batch, kv head) per iteration: the query heads of its group all add into its dK and dV.
#pragma omp parallel num_threads(threads) if (B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK)
  {
    // kt, vt (D, Sp) zero-padded; p, ds (T, Sp); pt, dst (S, T); row (D)
    std::vector<float> kt(D * Sp), vt(D * Sp), p(T * Sp), ds(T * Sp), pt(S * T), dst(S * T), row(D);
#pragma omp for schedule(static)
    for (int64_t bkv = 0; bkv < B * Hkv; ++bkv) {
      const float* kh = k + bkv * S * D;
      const float* vh = v + bkv * S * D;
      float* dkh = dk + bkv * S * D;
      float* dvh = dv + bkv * S * D;
      transpose(kt.data(), Sp, kh, D, S, D);
      transpose(vt.data(), Sp, vh, D, S, D);
      for (int64_t x = 0; x < S * D; ++x) dkh[x] = dvh[x] = 0.0f;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bh = (bkv / Hkv) * Hq + (bkv % Hkv) * group + g;
        const float* qh = q + bh * T * D;
        const float* oh = o + bh * T * D;
        const float* doh = dout + bh * T * D;
        float* dqh = dq + bh * T * D;
        for (int64_t i = 0; i < T; ++i) {
          const int64_t n = visible(i, T, S, causal);
          float* pi = p.data() + i * Sp;
          float* dsi = ds.data() + i * Sp;
          if (n == 0) {
            for (int64_t d = 0; d < D; ++d) dqh[i * D + d] = 0.0f;
            continue;
          }
          scores(pi, qh + i * D, kt.data(), Sp, D, n, scale);
          const float l = lse[bh * T + i];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) pi[j] = fast_exp(pi[j] - l);
          row_times_matrix(dsi, doh + i * D, vt.data(), Sp, D, round_up(n));  // dP row
          float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
          for (int64_t d = 0; d < D; ++d) dsum += doh[i * D + d] * oh[i * D + d];
          // dS scaled once here, so that dQ and dK need no further scaling
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dsi[j] = scale * pi[j] * (dsi[j] - dsum);
          row_times_matrix(dqh + i * D, dsi, kh, D, n, D);
        }
        // rows with fewer visible keys leave the rest of their (T, S) row unwritten: transpose the
        // visible part only, which is exactly the queries i >= first_query(j) of each key column j
        for (int64_t i = 0; i < T; ++i) {
          const int64_t n = visible(i, T, S, causal);
          for (int64_t j = 0; j < n; ++j) {
            pt[j * T + i] = p[i * Sp + j];
            dst[j * T + i] = ds[i * Sp + j];
          }
        }
        for (int64_t j = 0; j < S; ++j) {
          const int64_t i0 = first_query(j, T, S, causal);
          if (i0 >= T) continue;
          row_times_matrix(row.data(), pt.data() + j * T + i0, doh + i0 * D, D, T - i0, D);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dvh[j * D + d] += row[d];
          row_times_matrix(row.data(), dst.data() + j * T + i0, qh + i0 * D, D, T - i0, D);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dkh[j * D + d] += row[d];
        }
      }
    }
  }
}

PYLLM_CPU_NS_END
