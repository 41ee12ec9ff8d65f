// Attention for small heads on the CPU: o = softmax(q k^T * scale + mask) v, forward and backward.
//
// One (batch, head) at a time, its whole (T, S) score matrix in a per-thread scratch (the Python wrapper
// sends only T * S <= 384 * 384 here; larger problems go to PyTorch's flash-style SDPA). Queries are the
// last T of the S key positions (bottom-right causal alignment): query i sees keys j <= S - T + i, and
// only those columns are ever computed. The forward saves lse = log sum_j exp(s_ij) per query row; the
// backward recomputes P = exp(s - lse) (FlashAttention-2, Dao 2023, section 3.1.2):
//   dV = P^T dO,  dP = dO V^T,  Dsum_i = dO_i . O_i,  dS = P * (dP - Dsum),  dQ = scale dS K,  dK = scale dS^T Q.
// Every product is written as out[q][c] = sum_r a[q][r] M[r, c] over a row-major M for a block of
// kRows output rows (query rows, or key rows in dK/dV), with the output columns in 16-float register
// accumulators (broadcast-FMA over r; each load of M feeds kRows FMAs). K and V are copied transposed,
// and P and dS transposed, so that each of the five products has that form. Within a block of query
// rows the causal row lengths differ: every row is computed to the block's longest, with P (hence dS)
// zero beyond a row's own visible keys.
//
// q, k, v, o and the gradients are strided views (kernels.h: Heads), float32 or bfloat16: a head whose
// rows are not D apart, or that is bfloat16, is gathered into a float32 (L, D) block per thread first
// (and an output head scattered back), O(L D) work beside the O(T S D) of the products; float32 heads
// with contiguous rows are used in place.
#include <vector>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kVec = 16;  // floats per AVX-512 register (two AVX2 ones)
constexpr int kRows = 4;      // output rows per block

// out[q * ldo + c] = sum_{r < rows} a[q * lda + r] * m[r * ld + c] for q < NQ, c < W: NQ x W / 16
// independent accumulator chains (8 at NQ = 4, W = 32), enough to hide the FMA latency.
template <int NQ, int64_t W>
inline void rows_times_block(float* out, int64_t ldo, const float* a, int64_t lda, const float* m, int64_t ld,
                             int64_t rows) {
  float acc[NQ][W] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const float* mr = m + r * ld;
    for (int q = 0; q < NQ; ++q) {
      const float aq = a[q * lda + r];
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) acc[q][c] += aq * mr[c];
    }
  }
  for (int q = 0; q < NQ; ++q)
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) out[q * ldo + c] = acc[q][c];
}

// The same over cols columns: blocks of 32 and 16, then a scalar tail (callers pad their scratch to
// multiples of 16 where they can; D not a multiple of 16 takes the tail).
template <int NQ>
inline void rows_times_matrix(float* out, int64_t ldo, const float* a, int64_t lda, const float* m, int64_t ld,
                              int64_t rows, int64_t cols) {
  int64_t c0 = 0;
  for (; c0 + 32 <= cols; c0 += 32) rows_times_block<NQ, 32>(out + c0, ldo, a, lda, m + c0, ld, rows);
  if (c0 + 16 <= cols) {
    rows_times_block<NQ, 16>(out + c0, ldo, a, lda, m + c0, ld, rows);
    c0 += 16;
  }
  for (int q = 0; q < NQ; ++q)
    for (int64_t c = c0; c < cols; ++c) {
      float acc = 0.0f;
      for (int64_t r = 0; r < rows; ++r) acc += a[q * lda + r] * m[r * ld + c];
      out[q * ldo + c] = acc;
    }
}

// rows_times_matrix for nq <= kRows rows (the last block of a matrix may be short).
inline void block_times_matrix(int nq, float* out, int64_t ldo, const float* a, int64_t lda, const float* m,
                               int64_t ld, int64_t rows, int64_t cols) {
  if (nq == kRows) return rows_times_matrix<kRows>(out, ldo, a, lda, m, ld, rows, cols);
  for (int q = 0; q < nq; ++q) rows_times_matrix<1>(out + q * ldo, ldo, a + q * lda, lda, m, ld, rows, cols);
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

// Rows i0 .. i0 + nq of P = exp(scale q k^T - lse) into p (row stride Sp), each computed up to n_max =
// visible(i0 + nq - 1) and zero from its own visible(i) on. kt: K transposed (D, Sp), zero beyond S.
// With lse == nullptr the rows are normalised here and their logsumexp written to lse_out (forward).
inline void probabilities(float* p, int64_t Sp, const float* q, const float* kt, int64_t D, int64_t i0, int nq,
                          int64_t T, int64_t S, bool causal, float scale, const float* lse, float* lse_out) {
  const int64_t n_max = visible(i0 + nq - 1, T, S, causal);
  block_times_matrix(nq, p, Sp, q, D, kt, Sp, D, round_up(n_max));
  for (int r = 0; r < nq; ++r) {
    float* pr = p + r * Sp;
    const int64_t n = visible(i0 + r, T, S, causal);
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      pr[j] *= scale;
      m = pr[j] > m ? pr[j] : m;
    }
    float l;
    if (lse != nullptr) {
      l = lse[r];
    } else {  // forward: the logsumexp of the row
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += fast_exp(pr[j] - m);
      l = n > 0 ? m + logf(sum) : -INFINITY;  // no key visible: P = 0, o = 0
      lse_out[r] = l;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) pr[j] = fast_exp(pr[j] - l);
    for (int64_t j = n; j < n_max; ++j) pr[j] = 0.0f;
  }
}

// Head (b, h) of t as a contiguous float32 (L, D) block: t's own memory when float32 with rows D apart,
// else gathered (and widened) into buf, which then must hold L * D floats.
inline bool in_place(DType t, int64_t sl, int64_t D) { return t == DType::kFloat32 && sl == D; }

inline const float* head_in(const Heads& t, int64_t b, int64_t h, int64_t L, int64_t D, float* buf) {
  const int64_t base = b * t.sb + h * t.sh;
  if (in_place(t.t, t.sl, D)) return static_cast<const float*>(t.p) + base;
  for (int64_t l = 0; l < L; ++l) src_copy(Src{t.p, t.t}, base + l * t.sl, D, buf + l * D);
  return buf;
}

// Where to compute head (b, h) of t: its memory when float32 with rows D apart, else buf; head_commit
// then scatters (and narrows) buf into t.
inline float* head_out(const HeadsOut& t, int64_t b, int64_t h, int64_t D, float* buf) {
  return in_place(t.t, t.sl, D) ? static_cast<float*>(t.p) + b * t.sb + h * t.sh : buf;
}

inline void head_commit(const HeadsOut& t, int64_t b, int64_t h, int64_t L, int64_t D, const float* buf) {
  if (in_place(t.t, t.sl, D)) return;
  for (int64_t l = 0; l < L; ++l) dst_write(Dst{t.p, t.t}, b * t.sb + h * t.sh + l * t.sl, buf + l * D, D);
}

// A scratch block of n floats for a head of t, empty when t is used in place.
inline std::vector<float> head_buffer(DType t, int64_t sl, int64_t D, int64_t n) {
  return std::vector<float>(in_place(t, sl, D) ? 0 : n);
}

}  // namespace

void attention_fwd(Heads q, Heads k, Heads v, HeadsOut o, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t S, int64_t D, float scale, bool causal, int threads) {
  const int64_t group = Hq / Hkv, Sp = round_up(S);
#pragma omp parallel num_threads(threads) if (B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK)
  {
    std::vector<float> kt(D * Sp), p(kRows * Sp);  // K^T (D, Sp) zero-padded, one block of P rows
    std::vector<float> qb = head_buffer(q.t, q.sl, D, T * D), ob = head_buffer(o.t, o.sl, D, T * D);
    std::vector<float> kb = head_buffer(k.t, k.sl, D, S * D), vb = head_buffer(v.t, v.sl, D, S * D);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hq; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq, kv = h / group;
      const float* qh = head_in(q, b, h, T, D, qb.data());
      const float* kh = head_in(k, b, kv, S, D, kb.data());
      const float* vh = head_in(v, b, kv, S, D, vb.data());
      float* oh = head_out(o, b, h, D, ob.data());
      transpose(kt.data(), Sp, kh, D, S, D);
      for (int64_t i = 0; i < T; i += kRows) {
        const int nq = static_cast<int>(min_i64(kRows, T - i));
        probabilities(p.data(), Sp, qh + i * D, kt.data(), D, i, nq, T, S, causal, scale, nullptr,
                      lse + bh * T + i);
        block_times_matrix(nq, oh + i * D, D, p.data(), Sp, vh, D, visible(i + nq - 1, T, S, causal), D);
      }
      head_commit(o, b, h, T, D, oh);
    }
  }
}

void attention_bwd(Heads q, Heads k, Heads v, Heads o, const float* lse, Heads dout, HeadsOut dq, HeadsOut dk,
                   HeadsOut dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale,
                   bool causal, int threads) {
  const int64_t group = Hq / Hkv, Sp = round_up(S);
  // One (batch, kv head) per iteration: the query heads of its group all add into its dK and dV.
#pragma omp parallel num_threads(threads) if (B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK)
  {
    // kt, vt (D, Sp) zero-padded; p, ds (T, Sp); pt, dst (S, T) zero where masked; rows (kRows, D)
    std::vector<float> kt(D * Sp), vt(D * Sp), p(T * Sp), ds(T * Sp), pt(S * T), dst(S * T), rows(kRows * D);
    std::vector<float> qb = head_buffer(q.t, q.sl, D, T * D), ob = head_buffer(o.t, o.sl, D, T * D);
    std::vector<float> dob = head_buffer(dout.t, dout.sl, D, T * D), dqb = head_buffer(dq.t, dq.sl, D, T * D);
    std::vector<float> kb = head_buffer(k.t, k.sl, D, S * D), vb = head_buffer(v.t, v.sl, D, S * D);
    std::vector<float> dkb = head_buffer(dk.t, dk.sl, D, S * D), dvb = head_buffer(dv.t, dv.sl, D, S * D);
#pragma omp for schedule(static)
    for (int64_t bkv = 0; bkv < B * Hkv; ++bkv) {
      const int64_t b = bkv / Hkv, kv = bkv % Hkv;
      const float* kh = head_in(k, b, kv, S, D, kb.data());
      const float* vh = head_in(v, b, kv, S, D, vb.data());
      float* dkh = head_out(dk, b, kv, D, dkb.data());
      float* dvh = head_out(dv, b, kv, D, dvb.data());
      transpose(kt.data(), Sp, kh, D, S, D);
      transpose(vt.data(), Sp, vh, D, S, D);
      for (int64_t x = 0; x < S * D; ++x) dkh[x] = dvh[x] = 0.0f;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv * group + g, bh = b * Hq + h;
        const float* qh = head_in(q, b, h, T, D, qb.data());
        const float* oh = head_in(o, b, h, T, D, ob.data());
        const float* doh = head_in(dout, b, h, T, D, dob.data());
        float* dqh = head_out(dq, b, h, D, dqb.data());
        for (int64_t i = 0; i < T; i += kRows) {
          const int nq = static_cast<int>(min_i64(kRows, T - i));
          const int64_t n_max = visible(i + nq - 1, T, S, causal);
          float* pi = p.data() + i * Sp;
          float* dsi = ds.data() + i * Sp;
          probabilities(pi, Sp, qh + i * D, kt.data(), D, i, nq, T, S, causal, scale, lse + bh * T + i, nullptr);
          block_times_matrix(nq, dsi, Sp, doh + i * D, D, vt.data(), Sp, D, round_up(n_max));  // dP rows
          for (int r = 0; r < nq; ++r) {
            const float* dor = doh + (i + r) * D;
            const float* orow = oh + (i + r) * D;
            float dsum = 0.0f;
#pragma omp simd reduction(+ : dsum)
            for (int64_t d = 0; d < D; ++d) dsum += dor[d] * orow[d];
            // dS scaled once here, so that dQ and dK need no further scaling; 0 where P is
            float* dsr = dsi + r * Sp;
            const float* pr = pi + r * Sp;
#pragma omp simd
            for (int64_t j = 0; j < n_max; ++j) dsr[j] = scale * pr[j] * (dsr[j] - dsum);
          }
          block_times_matrix(nq, dqh + i * D, D, dsi, Sp, kh, D, n_max, D);
        }
        head_commit(dq, b, h, T, D, dqh);
        // P^T and dS^T, zero where masked: a block of keys reads from its first key's first query on
        for (int64_t x = 0; x < S * T; ++x) pt[x] = dst[x] = 0.0f;
        for (int64_t i = 0; i < T; ++i) {
          const int64_t n = visible(i, T, S, causal);
          for (int64_t j = 0; j < n; ++j) {
            pt[j * T + i] = p[i * Sp + j];
            dst[j * T + i] = ds[i * Sp + j];
          }
        }
        for (int64_t j = 0; j < S; j += kRows) {
          const int nk = static_cast<int>(min_i64(kRows, S - j));
          const int64_t i0 = first_query(j, T, S, causal);
          if (i0 >= T) continue;
          block_times_matrix(nk, rows.data(), D, pt.data() + j * T + i0, T, doh + i0 * D, D, T - i0, D);
          for (int64_t x = 0; x < nk * D; ++x) dvh[j * D + x] += rows[x];
          block_times_matrix(nk, rows.data(), D, dst.data() + j * T + i0, T, qh + i0 * D, D, T - i0, D);
          for (int64_t x = 0; x < nk * D; ++x) dkh[j * D + x] += rows[x];
        }
      }
      head_commit(dk, b, kv, S, D, dkh);
      head_commit(dv, b, kv, S, D, dvh);
    }
  }
}

PYLLM_CPU_NS_END
