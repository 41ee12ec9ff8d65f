// Attention on the CPU: o = softmax(q k^T * scale + mask) v, forward and backward, for any T and S.
//
// Masks: queries are the last T of the S key positions (bottom-right alignment), so query i sits at
// position p = S - T + i; causal keeps keys j <= p, a sliding window keeps p - j < window, document ids
// keep keys of the query's own document. key_ranges() turns the first two (and the documents, when each
// document is one contiguous run of positions, as in packed sequences) into one range [lo, hi) of keys per
// query: only those columns are ever computed. Documents that recur in several runs are masked key by key
// inside the range instead.
//
// Forward, per (batch, head, chunk of kChunk queries), blocks of kRows queries: their scores over the
// union of their key ranges (at most S floats per row in scratch, so any S fits), the softmax of each row
// (its logsumexp lse saved for the backward), then o = P V. No online rescaling is needed: a block's rows
// are complete before P V.
// Backward (FlashAttention-2, Dao 2023, section 3.1.2), over tiles of kChunk queries x kTile keys: P =
// exp(s - lse) recomputed, then
//   dV += P^T dO,  dP = dO V^T,  Dsum_i = dO_i . O_i,  dS = P * (dP - Dsum),  dQ += scale dS K,  dK += scale dS^T Q.
// Scratch is two (kChunk, kTile) tiles whatever T and S. With at least as many (batch, kv head)s as threads
// each is one thread's work, in one pass (the query heads of a grouped-query group add into its dK and dV
// without a reduction across threads); with fewer, two passes keep every thread busy: dK/dV per (batch,
// kv head, key tile), then dQ per (batch, query head, query chunk), recomputing P and dS. Both use the same
// tiles and sum in the same order, so the thread count never changes a bit.
//
// Every product is out[q][c] (+)= sum_r a(q, r) M[r, c] over a row-major M, for a block of kRows output
// rows, with the output columns in 16-float register accumulators (broadcast-FMA over r; each load of M
// feeds kRows FMAs). a(q, r) is read through two strides, so P^T and dS^T are read in place; K and V are
// copied transposed once per (batch, kv head) for the two products that need K^T and V^T.
//
// q, k, v, o and the gradients are strided views (kernels.h: Heads), float32 or bfloat16: float32 heads are
// used in place through their row strides (Rows), bfloat16 ones are widened into float32 rows per thread
// first (and an output narrowed back), O(L D) work beside the O(T S D) of the products. (Float32 heads
// whose rows were not D apart, such as the views of a fused qkv projection, used to be gathered row by
// row too: a memmove call per row of 32-64 floats, ~9% of the nanoGPT-shape forward + backward.)
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kVec = 16;     // floats per AVX-512 register (two AVX2 ones)
constexpr int kRows = 4;         // output rows per block
constexpr int64_t kChunk = 64;   // queries per forward work item and per backward tile
constexpr int64_t kTile = 256;   // keys per backward tile
constexpr int64_t kTileLd = kTile + kVec;  // a tile row: kTile keys plus room for a 16-column overshoot

// out[q * ldo + c] (+)= sum_{r < rows} a[q * aq + r * ar] * m[r * ld + c] for q < NQ, c < W: NQ x W / 16
// independent accumulator chains (8 at NQ = 4, W = 32), enough to hide the FMA latency.
template <int NQ, int64_t W, bool kAdd>
inline void rows_times_block(float* out, int64_t ldo, const float* a, int64_t aq, int64_t ar, const float* m,
                             int64_t ld, int64_t rows) {
  float acc[NQ][W] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const float* mr = m + r * ld;
    for (int q = 0; q < NQ; ++q) {
      const float aqr = a[q * aq + r * ar];
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) acc[q][c] += aqr * mr[c];
    }
  }
  for (int q = 0; q < NQ; ++q)
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) out[q * ldo + c] = kAdd ? out[q * ldo + c] + acc[q][c] : acc[q][c];
}

// The same over cols columns: blocks of W columns, then of W / 2, then a scalar tail (callers pad their
// scratch to multiples of 16 where they can; D not a multiple of 16 takes the tail). W = 32 with AVX-512
// (8 accumulator registers at NQ = 4), 16 with AVX2 (8 registers; at 32 the accumulators took all 16 of
// its registers: attention forward + backward 22-29% slower), 32 in the baseline build (at 8 its SSE code
// was 3-6% slower).
template <int NQ, bool kAdd>
inline void rows_times_matrix(float* out, int64_t ldo, const float* a, int64_t aq, int64_t ar, const float* m,
                              int64_t ld, int64_t rows, int64_t cols) {
  constexpr int64_t W = kVecFloats == 8 ? 16 : 32;
  int64_t c0 = 0;
  for (; c0 + W <= cols; c0 += W) rows_times_block<NQ, W, kAdd>(out + c0, ldo, a, aq, ar, m + c0, ld, rows);
  for (; c0 + W / 2 <= cols; c0 += W / 2) {
    rows_times_block<NQ, W / 2, kAdd>(out + c0, ldo, a, aq, ar, m + c0, ld, rows);
  }
  for (int q = 0; q < NQ; ++q)
    for (int64_t c = c0; c < cols; ++c) {
      float acc = 0.0f;
      for (int64_t r = 0; r < rows; ++r) acc += a[q * aq + r * ar] * m[r * ld + c];
      out[q * ldo + c] = kAdd ? out[q * ldo + c] + acc : acc;
    }
}

// rows_times_matrix for nq <= kRows rows (the last block of a matrix may be short).
template <bool kAdd = false>
inline void block_times_matrix(int nq, float* out, int64_t ldo, const float* a, int64_t aq, int64_t ar,
                               const float* m, int64_t ld, int64_t rows, int64_t cols) {
  if (nq == kRows) return rows_times_matrix<kRows, kAdd>(out, ldo, a, aq, ar, m, ld, rows, cols);
  for (int q = 0; q < nq; ++q) rows_times_matrix<1, kAdd>(out + q * ldo, ldo, a + q * aq, aq, ar, m, ld, rows, cols);
}

inline int64_t round_up(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

// Columns of a transposed (D, S) head: S rounded up, plus one vector so that a block of columns starting
// anywhere below S may run 16 past S (those columns are zero and never used).
inline int64_t transposed_ld(int64_t S) { return round_up(S) + kVec; }

// dst (cols, ld_dst) = src (rows, cols; rows ld_src apart)^T, zero in the padding columns rows .. ld_dst.
inline void transpose(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols) {
  transpose_columns(src, ld_src, dst, ld_dst, rows, 0, cols);
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < ld_dst; ++r) dst[c * ld_dst + r] = 0.0f;
  }
}

// The keys each query sees: keys [lo, hi) of query (b, i), at lo[b * T + i], hi[b * T + i]. check_doc[b]:
// the range may hold keys of another document (a document in several runs), to be masked one by one.
struct KeyRanges {
  std::vector<int64_t> lo, hi;
  std::vector<char> check_doc;
};

KeyRanges key_ranges(int64_t B, int64_t T, int64_t S, bool causal, int64_t window, const int64_t* doc) {
  KeyRanges r{std::vector<int64_t>(B * T), std::vector<int64_t>(B * T), std::vector<char>(B, 0)};
  std::vector<int64_t> run_lo(doc ? S : 0), run_hi(doc ? S : 0), run_ids;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* d = doc ? doc + b * S : nullptr;
    if (d) {  // the run of equal ids around each position; is any id in two runs?
      run_ids.clear();
      for (int64_t j = 0; j < S; ++j) {
        const bool starts = j == 0 || d[j] != d[j - 1];
        run_lo[j] = starts ? j : run_lo[j - 1];
        if (starts) run_ids.push_back(d[j]);
      }
      for (int64_t j = S - 1; j >= 0; --j) run_hi[j] = (j == S - 1 || d[j] != d[j + 1]) ? j + 1 : run_hi[j + 1];
      std::sort(run_ids.begin(), run_ids.end());
      r.check_doc[b] = std::adjacent_find(run_ids.begin(), run_ids.end()) != run_ids.end();
    }
    for (int64_t i = 0; i < T; ++i) {
      const int64_t p = S - T + i;
      int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, hi = causal ? p + 1 : S;
      if (d && !r.check_doc[b]) {
        lo = std::max(lo, run_lo[p]);
        hi = std::min(hi, run_hi[p]);
      }
      r.lo[b * T + i] = lo;
      r.hi[b * T + i] = hi;
    }
  }
  return r;
}

// The union [lo, hi) of the key ranges of nq consecutive queries (empty: lo >= hi).
struct Span {
  int64_t lo, hi;
};
inline Span span_of(const int64_t* lo, const int64_t* hi, int nq) {
  Span s{lo[0], hi[0]};
  for (int r = 1; r < nq; ++r) {
    s.lo = std::min(s.lo, lo[r]);
    s.hi = std::max(s.hi, hi[r]);
  }
  return s;
}

// The softmax numerators of a score row x[0..n) in place, n a multiple of kVec (the caller pads the row with
// -inf, whose exponentials come out ~1e-38 and are zeroed afterwards): x[i] = exp(x[i] - max); returns the
// max and the sum. Whole vectors, one register of lanes per reduction: a causal row at T = 64 has 1-64
// keys, and with two registers of lanes and a tail loop most such rows ran in the scalar tail with their
// lane sums in memory (the nanoGPT-shape forward 13% slower).
struct MaxSum {
  float max, sum;
};
PYLLM_INLINE MaxSum exp_row(float* __restrict x, int64_t n) {
  float mx[kVec];
  for (int l = 0; l < kVec; ++l) mx[l] = -INFINITY;
  for (int64_t i = 0; i < n; i += kVec) {
#pragma omp simd
    for (int l = 0; l < kVec; ++l) mx[l] = x[i + l] > mx[l] ? x[i + l] : mx[l];
  }
  const float m = lane_max<kVec>(mx);
  float acc[kVec] = {};
  for (int64_t i = 0; i < n; i += kVec) {
#pragma omp simd
    for (int l = 0; l < kVec; ++l) {
      const float t = fast_exp(x[i + l] - m);
      x[i + l] = t;
      acc[l] += t;
    }
  }
  return {m, lane_tree<kVec>(acc)};
}

// Rows of P = exp(scale q k^T - lse) for keys [c0, c1) into p (p[r * ldp + j - c0]) for nq queries whose key
// ranges are lo[r], hi[r] (each row zero outside its own range, and, when doc != null, on keys of another
// document than doc_q[r]); columns up to `width` of each row are written (zeros beyond c1).
// q: query row r at q + r * ldq; kt: K^T (D, ldk) zero-padded. With lse == nullptr (the forward), [c0, c1)
// must hold every row's range: the rows are normalised here and their logsumexp written to lse_out.
inline void probabilities(float* p, int64_t ldp, int64_t width, const float* q, int64_t ldq, int64_t D,
                          const float* kt, int64_t ldk, int64_t c0, int64_t c1, const int64_t* lo, const int64_t* hi,
                          int nq, const int64_t* doc, const int64_t* doc_q, float scale, const float* lse,
                          float* lse_out) {
  block_times_matrix(nq, p, ldp, q, ldq, 1, kt + c0, ldk, D, round_up(c1 - c0));
  for (int r = 0; r < nq; ++r) {
    float* pr = p + r * ldp - c0;  // pr[j] for key j
    const int64_t a = std::max(lo[r], c0), e = std::min(hi[r], c1);
    // The exponentials over whole vectors from a: keys [e, a + round_up(e - a)) are computed too and zeroed
    // below (the row has room: ldp >= round_up(c1 - c0) + kVec, and a caller reads no column past width),
    // so a short row's tail costs no scalar loop (a causal row at T = 64 holds 1-64 keys).
    if (lse != nullptr) {
      const int64_t n = round_up(e - a);
      const float l = lse[r];
#pragma omp simd
      for (int64_t j = a; j < a + n; ++j) pr[j] = fast_exp(pr[j] * scale - l);
    } else if (a < e) {  // forward: one exp per score, the row scaled by 1 / sum; lse = m + log(sum) saved
#pragma omp simd
      for (int64_t j = a; j < e; ++j) pr[j] *= scale;
      if (doc != nullptr) {  // masked once scaled (a negative scale would turn a -inf score into +inf)
        const int64_t own = doc_q[r];
        for (int64_t j = a; j < e; ++j) pr[j] = doc[j] == own ? pr[j] : -INFINITY;
      }
      const int64_t n = round_up(e - a);
      for (int64_t j = e; j < a + n; ++j) pr[j] = -INFINITY;
      const MaxSum ms = exp_row(pr + a, n);
      const float inv = 1.0f / ms.sum;  // sum >= 1: the row's maximum contributes exp(0)
#pragma omp simd
      for (int64_t j = a; j < e; ++j) pr[j] *= inv;
      lse_out[r] = ms.max + logf(ms.sum);
    } else {
      lse_out[r] = -INFINITY;
    }
    if (doc != nullptr)  // keys of other documents: fast_exp(-inf) is ~1e-38, and the backward's exps are unmasked
      for (int64_t j = a; j < e; ++j) pr[j] = doc[j] == doc_q[r] ? pr[j] : 0.0f;
    for (int64_t j = c0; j < std::min(a, c0 + width); ++j) pr[j] = 0.0f;
    for (int64_t j = std::max(e, c0); j < c0 + width; ++j) pr[j] = 0.0f;
  }
}

// Float32 rows of a head: row l at p + l * ld.
struct Rows {
  const float* p;
  int64_t ld;
  const float* row(int64_t l) const { return p + l * ld; }
};
struct RowsOut {
  float* p;
  int64_t ld;
  float* row(int64_t l) const { return p + l * ld; }
  void zero(int64_t n, int64_t D) const {
    if (ld == D) {  // one block (a row at a time, GCC calls memset per row)
      for (int64_t x = 0; x < n * D; ++x) p[x] = 0.0f;
      return;
    }
    for (int64_t l = 0; l < n; ++l)
      for (int64_t x = 0; x < D; ++x) p[l * ld + x] = 0.0f;
  }
};

// Rows [l0, l0 + n) of head (b, h) of t: t's own memory when float32 (rows t.sl apart), else widened into
// buf (rows D apart), which then must hold n * D floats.
inline Rows rows_in(const Heads& t, int64_t b, int64_t h, int64_t l0, int64_t n, int64_t D, float* buf) {
  const int64_t base = b * t.sb + h * t.sh + l0 * t.sl;
  if (t.t == DType::kFloat32) return {static_cast<const float*>(t.p) + base, t.sl};
  for (int64_t l = 0; l < n; ++l) src_copy(Src{t.p, t.t}, base + l * t.sl, D, buf + l * D);
  return {buf, D};
}

// Where to compute rows [l0, ...) of head (b, h) of t: its memory when float32, else buf (rows D apart);
// rows_commit then narrows n rows of buf into t.
inline RowsOut rows_out(const HeadsOut& t, int64_t b, int64_t h, int64_t l0, int64_t D, float* buf) {
  if (t.t == DType::kFloat32) return {static_cast<float*>(t.p) + b * t.sb + h * t.sh + l0 * t.sl, t.sl};
  return {buf, D};
}

inline void rows_commit(const HeadsOut& t, int64_t b, int64_t h, int64_t l0, int64_t n, int64_t D, RowsOut rows) {
  if (t.t == DType::kFloat32) return;
  for (int64_t l = 0; l < n; ++l) dst_write(Dst{t.p, t.t}, b * t.sb + h * t.sh + (l0 + l) * t.sl, rows.row(l), D);
}

// A scratch block of n floats for a tensor of type t, empty when it is used in place (float32).
inline std::vector<float> rows_buffer(DType t, int64_t n) { return std::vector<float>(t == DType::kFloat32 ? 0 : n); }

// A thread's float32 view of one kv head: its K and V rows (the tensors' own memory when float32), K^T and,
// for the backward, V^T ((D, ldk), zero-padded); reloaded only when a work item needs another kv head.
struct KvHead {
  std::vector<float> kt, vt, kb, vb;
  int64_t loaded = -1;  // b * Hkv + kv
  Rows kh{nullptr, 0}, vh{nullptr, 0};

  KvHead(const Heads& k, const Heads& v, int64_t S, int64_t D, int64_t ldk, bool with_vt)
      : kt(D * ldk), vt(with_vt ? D * ldk : 0), kb(rows_buffer(k.t, S * D)), vb(rows_buffer(v.t, S * D)) {}

  void load(const Heads& k, const Heads& v, int64_t b, int64_t kv, int64_t Hkv, int64_t S, int64_t D,
            int64_t ldk) {
    if (loaded == b * Hkv + kv) return;
    kh = rows_in(k, b, kv, 0, S, D, kb.data());
    vh = rows_in(v, b, kv, 0, S, D, vb.data());
    transpose(kt.data(), ldk, kh.p, kh.ld, S, D);
    if (!vt.empty()) transpose(vt.data(), ldk, vh.p, vh.ld, S, D);
    loaded = b * Hkv + kv;
  }
};

}  // namespace

void attention_fwd(Heads q, Heads k, Heads v, HeadsOut o, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t S, int64_t D, float scale, bool causal, int64_t window, const int64_t* doc, int threads) {
  const KeyRanges ranges = key_ranges(B, T, S, causal, window, doc);
  const int64_t group = Hq / Hkv, ldk = transposed_ld(S), chunks = (T + kChunk - 1) / kChunk;
  // Work items (batch, head, chunk of queries), in that order: consecutive items share a kv head, which
  // each thread keeps (KvHead) until its next item needs another one.
#pragma omp parallel num_threads(threads) if (B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK)
  {
    KvHead kvh(k, v, S, D, ldk, false);
    std::vector<float> p(kRows * ldk);
    std::vector<float> qb = rows_buffer(q.t, kChunk * D), ob = rows_buffer(o.t, kChunk * D);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < B * Hq * chunks; ++item) {
      const int64_t bh = item / chunks, b = bh / Hq, h = bh % Hq;
      const int64_t i0 = item % chunks * kChunk, n = min_i64(kChunk, T - i0);
      kvh.load(k, v, b, h / group, Hkv, S, D, ldk);
      const Rows qh = rows_in(q, b, h, i0, n, D, qb.data());
      const RowsOut oh = rows_out(o, b, h, i0, D, ob.data());
      const int64_t* lo = ranges.lo.data() + b * T + i0;
      const int64_t* hi = ranges.hi.data() + b * T + i0;
      const int64_t* d = doc && ranges.check_doc[b] ? doc + b * S : nullptr;
      for (int64_t i = 0; i < n; i += kRows) {
        const int nq = static_cast<int>(min_i64(kRows, n - i));
        const Span s = span_of(lo + i, hi + i, nq);
        if (s.lo >= s.hi) {  // no key for these queries (not for T <= S: each query sees itself): o = 0
          RowsOut{oh.row(i), oh.ld}.zero(nq, D);
          for (int r = 0; r < nq; ++r) lse[bh * T + i0 + i + r] = -INFINITY;
          continue;
        }
        probabilities(p.data(), ldk, s.hi - s.lo, qh.row(i), qh.ld, D, kvh.kt.data(), ldk, s.lo, s.hi, lo + i,
                      hi + i, nq, d, d ? d + S - T + i0 + i : nullptr, scale, nullptr, lse + bh * T + i0 + i);
        block_times_matrix(nq, oh.row(i), oh.ld, p.data(), ldk, 1, kvh.vh.row(s.lo), kvh.vh.ld, s.hi - s.lo, D);
      }
      rows_commit(o, b, h, i0, n, D, oh);
    }
  }
}

namespace {

// What the backward of one (batch, query head) reads, as float32 rows: its q, dO, Dsum and lse over T
// queries, the key ranges of its batch (and document row, when keys are masked one by one), and its kv
// head (K rows, K^T and V^T).
struct BwdHead {
  Rows q, dout;
  const float *dsum, *lse;
  const int64_t *lo, *hi, *doc;
  Rows k;
  const float *kt, *vt;
  int64_t T, S, D, ldk;
  float scale;
};

// The key tiles of a chunk of queries whose keys span [lo, hi): [ja, jb) = [j0, j0 + kTile) clipped to the
// span, j0 a multiple of kTile. Both backward schedules use exactly these tiles (and the order of their
// sums), so they give the same bits.
inline int64_t first_tile(const Span& s) { return s.lo / kTile * kTile; }

// P and dS (scaled) of queries [i0, i0 + n) x keys [ja, jb) into the tiles p, ds (n rows of kTileLd, column
// j - ja), zero outside each query's keys; blocks[] gets each kRows-query block's key span in the tile.
void tile_p_ds(const BwdHead& hd, int64_t i0, int64_t n, int64_t ja, int64_t jb, float* p, float* ds,
               Span* blocks) {
  const int64_t D = hd.D, width = jb - ja;
  for (int64_t i = 0; i < n; i += kRows) {
    const int nq = static_cast<int>(min_i64(kRows, n - i));
    const int64_t qi = i0 + i;
    Span s = span_of(hd.lo + qi, hd.hi + qi, nq);
    s = {std::max(s.lo, ja), std::min(s.hi, jb)};
    blocks[i / kRows] = s;
    float* pi = p + i * kTileLd;
    float* dsi = ds + i * kTileLd;
    if (s.lo >= s.hi) {
      for (int r = 0; r < nq; ++r)
        for (int64_t j = 0; j < width; ++j) pi[r * kTileLd + j] = dsi[r * kTileLd + j] = 0.0f;
      continue;
    }
    probabilities(pi + (s.lo - ja), kTileLd, jb - s.lo, hd.q.row(qi), hd.q.ld, D, hd.kt, hd.ldk, s.lo, s.hi,
                  hd.lo + qi, hd.hi + qi, nq, hd.doc, hd.doc ? hd.doc + hd.S - hd.T + qi : nullptr, hd.scale,
                  hd.lse + qi, nullptr);
    for (int r = 0; r < nq; ++r)
      for (int64_t j = 0; j < s.lo - ja; ++j) pi[r * kTileLd + j] = 0.0f;
    block_times_matrix(nq, dsi + (s.lo - ja), kTileLd, hd.dout.row(qi), hd.dout.ld, 1, hd.vt + s.lo, hd.ldk, D,
                       round_up(s.hi - s.lo));  // dP
    for (int r = 0; r < nq; ++r) {
      // dS, scaled once here so that dQ and dK need no further scaling; 0 where P is
      float* dsr = dsi + r * kTileLd;
      const float* pr = pi + r * kTileLd;
      const float dsum_r = hd.dsum[qi + r];
      for (int64_t j = 0; j < s.lo - ja; ++j) dsr[j] = 0.0f;
#pragma omp simd
      for (int64_t j = s.lo - ja; j < s.hi - ja; ++j) dsr[j] = hd.scale * pr[j] * (dsr[j] - dsum_r);
      for (int64_t j = s.hi - ja; j < width; ++j) dsr[j] = 0.0f;
    }
  }
}

// dQ rows i0 .. i0 + n (dq.row(i) for query i) += dS K over each query block's span of the tile.
void tile_dq(const BwdHead& hd, int64_t i0, int64_t n, int64_t ja, const float* ds, const Span* blocks, RowsOut dq) {
  for (int64_t i = 0; i < n; i += kRows) {
    const Span s = blocks[i / kRows];
    if (s.lo >= s.hi) continue;
    block_times_matrix<true>(static_cast<int>(min_i64(kRows, n - i)), dq.row(i0 + i), dq.ld,
                             ds + i * kTileLd + (s.lo - ja), kTileLd, 1, hd.k.row(s.lo), hd.k.ld, s.hi - s.lo, hd.D);
  }
}

// dV += P^T dO and dK += dS^T Q for keys [ja, jb) (dk, dv: key j's row at .row(j - ja)), kRows keys at a
// time, over the query blocks whose spans reach them; P^T and dS^T are read in place.
void tile_dkv(const BwdHead& hd, int64_t i0, int64_t n, int64_t ja, int64_t jb, const float* p, const float* ds,
              const Span* blocks, RowsOut dk, RowsOut dv) {
  const int64_t D = hd.D;
  const int n_blocks = static_cast<int>((n + kRows - 1) / kRows);
  for (int64_t j = ja; j < jb; j += kRows) {
    const int nk = static_cast<int>(min_i64(kRows, jb - j));
    int first = -1, last = -1;
    for (int blk = 0; blk < n_blocks; ++blk)
      if (blocks[blk].lo < j + nk && blocks[blk].hi > j && blocks[blk].lo < blocks[blk].hi) {
        first = first < 0 ? blk : first;
        last = blk;
      }
    if (first < 0) continue;
    const int64_t r0 = first * kRows, r1 = min_i64((last + 1) * kRows, n);
    block_times_matrix<true>(nk, dv.row(j - ja), dv.ld, p + r0 * kTileLd + (j - ja), 1, kTileLd,
                             hd.dout.row(i0 + r0), hd.dout.ld, r1 - r0, D);
    block_times_matrix<true>(nk, dk.row(j - ja), dk.ld, ds + r0 * kTileLd + (j - ja), 1, kTileLd,
                             hd.q.row(i0 + r0), hd.q.ld, r1 - r0, D);
  }
}

// A thread's backward scratch: its kv head (KvHead, with V^T), a float32 view of one query head (q, o, dO
// rows and Dsum, reloaded only when a work item needs another head) and the P and dS tiles.
struct BwdScratch {
  KvHead kv;
  std::vector<float> qb, ob, dob, dsum, p, ds;
  int64_t q_loaded = -1;
  Rows qh{nullptr, 0}, doh{nullptr, 0};

  BwdScratch(const Heads& q, const Heads& k, const Heads& v, const Heads& o, const Heads& dout, int64_t T,
             int64_t S, int64_t D, int64_t ldk)
      : kv(k, v, S, D, ldk, true), qb(rows_buffer(q.t, T * D)), ob(rows_buffer(o.t, T * D)),
        dob(rows_buffer(dout.t, T * D)), dsum(T), p(kChunk * kTileLd), ds(kChunk * kTileLd) {}

  void load_q(const Heads& q, const Heads& o, const Heads& dout, int64_t b, int64_t h, int64_t Hq, int64_t T,
              int64_t D) {
    if (q_loaded == b * Hq + h) return;
    qh = rows_in(q, b, h, 0, T, D, qb.data());
    const Rows oh = rows_in(o, b, h, 0, T, D, ob.data());
    doh = rows_in(dout, b, h, 0, T, D, dob.data());
    for (int64_t i = 0; i < T; ++i) {
      const float *dor = doh.row(i), *orow = oh.row(i);
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < D; ++x) acc += dor[x] * orow[x];
      dsum[i] = acc;
    }
    q_loaded = b * Hq + h;
  }
};

}  // namespace

void attention_bwd(Heads q, Heads k, Heads v, Heads o, const float* lse, Heads dout, HeadsOut dq, HeadsOut dk,
                   HeadsOut dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale,
                   bool causal, int64_t window, const int64_t* doc, int threads) {
  const KeyRanges ranges = key_ranges(B, T, S, causal, window, doc);
  const int64_t group = Hq / Hkv, ldk = transposed_ld(S), chunks = (T + kChunk - 1) / kChunk;
  const int64_t tiles = (S + kTile - 1) / kTile;
  const bool parallel = B * Hq * T * S * D >= PYLLM_MIN_PARALLEL_WORK && threads > 1;
  // One work item per (batch, kv head) when there are enough of them for the threads: the query heads of
  // its group add into its dK and dV, and dQ is summed over the key tiles, all in one pass. With fewer
  // (batch, kv head)s than threads, two passes: dK/dV per (batch, kv head, key tile), then dQ per
  // (batch, query head, query chunk), recomputing P and dS (1.4x the FLOPs, all threads busy). The tiles
  // and the order of every sum are the same either way: the thread count never changes a bit.
  const bool one_pass = !parallel || B * Hkv >= threads;
  auto head = [&](const BwdScratch& sc, int64_t b, int64_t h) {
    return BwdHead{sc.qh, sc.doh, sc.dsum.data(), lse + (b * Hq + h) * T, ranges.lo.data() + b * T,
                   ranges.hi.data() + b * T, doc && ranges.check_doc[b] ? doc + b * S : nullptr, sc.kv.kh,
                   sc.kv.kt.data(), sc.kv.vt.data(), T, S, D, ldk, scale};
  };
#pragma omp parallel num_threads(threads) if (parallel)
  {
    BwdScratch sc(q, k, v, o, dout, T, S, D, ldk);
    Span blocks[kChunk / kRows];  // the key span of each block of queries in the current tile
    std::vector<float> dkb = rows_buffer(dk.t, (one_pass ? S : kTile) * D);
    std::vector<float> dvb = rows_buffer(dv.t, (one_pass ? S : kTile) * D);
    std::vector<float> dqb = rows_buffer(dq.t, (one_pass ? T : kChunk) * D);
    if (one_pass) {
#pragma omp for schedule(dynamic)
      for (int64_t bkv = 0; bkv < B * Hkv; ++bkv) {
        const int64_t b = bkv / Hkv, kv = bkv % Hkv;
        sc.kv.load(k, v, b, kv, Hkv, S, D, ldk);
        const RowsOut dkh = rows_out(dk, b, kv, 0, D, dkb.data()), dvh = rows_out(dv, b, kv, 0, D, dvb.data());
        dkh.zero(S, D);
        dvh.zero(S, D);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv * group + g;
          sc.load_q(q, o, dout, b, h, Hq, T, D);
          const BwdHead hd = head(sc, b, h);
          const RowsOut dqh = rows_out(dq, b, h, 0, D, dqb.data());
          dqh.zero(T, D);
          for (int64_t i0 = 0; i0 < T; i0 += kChunk) {
            const int64_t n = min_i64(kChunk, T - i0);
            const Span chunk = span_of(hd.lo + i0, hd.hi + i0, static_cast<int>(n));
            for (int64_t j0 = first_tile(chunk); j0 < chunk.hi; j0 += kTile) {
              const int64_t ja = std::max(j0, chunk.lo), jb = min_i64(j0 + kTile, chunk.hi);
              tile_p_ds(hd, i0, n, ja, jb, sc.p.data(), sc.ds.data(), blocks);
              tile_dq(hd, i0, n, ja, sc.ds.data(), blocks, dqh);
              tile_dkv(hd, i0, n, ja, jb, sc.p.data(), sc.ds.data(), blocks, {dkh.row(ja), dkh.ld},
                       {dvh.row(ja), dvh.ld});
            }
          }
          rows_commit(dq, b, h, 0, T, D, dqh);
        }
        rows_commit(dk, b, kv, 0, S, D, dkh);
        rows_commit(dv, b, kv, 0, S, D, dvh);
      }
    } else {
#pragma omp for schedule(dynamic)
      for (int64_t item = 0; item < B * Hkv * tiles; ++item) {  // dK, dV of one key tile
        const int64_t bkv = item / tiles, b = bkv / Hkv, kv = bkv % Hkv;
        const int64_t t0 = item % tiles * kTile, t1 = min_i64(t0 + kTile, S);
        sc.kv.load(k, v, b, kv, Hkv, S, D, ldk);
        const RowsOut dkt = rows_out(dk, b, kv, t0, D, dkb.data()), dvt = rows_out(dv, b, kv, t0, D, dvb.data());
        dkt.zero(t1 - t0, D);
        dvt.zero(t1 - t0, D);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv * group + g;
          sc.load_q(q, o, dout, b, h, Hq, T, D);
          const BwdHead hd = head(sc, b, h);
          for (int64_t i0 = 0; i0 < T; i0 += kChunk) {
            const int64_t n = min_i64(kChunk, T - i0);
            const Span chunk = span_of(hd.lo + i0, hd.hi + i0, static_cast<int>(n));
            const int64_t ja = std::max(t0, chunk.lo), jb = min_i64(t1, chunk.hi);
            if (ja >= jb) continue;
            tile_p_ds(hd, i0, n, ja, jb, sc.p.data(), sc.ds.data(), blocks);
            tile_dkv(hd, i0, n, ja, jb, sc.p.data(), sc.ds.data(), blocks, {dkt.row(ja - t0), dkt.ld},
                     {dvt.row(ja - t0), dvt.ld});
          }
        }
        rows_commit(dk, b, kv, t0, t1 - t0, D, dkt);
        rows_commit(dv, b, kv, t0, t1 - t0, D, dvt);
      }
#pragma omp for schedule(dynamic)
      for (int64_t item = 0; item < B * Hq * chunks; ++item) {  // dQ of one query chunk
        const int64_t bh = item / chunks, b = bh / Hq, h = bh % Hq;
        const int64_t i0 = item % chunks * kChunk, n = min_i64(kChunk, T - i0);
        sc.kv.load(k, v, b, h / group, Hkv, S, D, ldk);
        sc.load_q(q, o, dout, b, h, Hq, T, D);
        const BwdHead hd = head(sc, b, h);
        const RowsOut dqc = rows_out(dq, b, h, i0, D, dqb.data());  // dq rows i0 .. i0 + n: query i at row i - i0
        dqc.zero(n, D);
        const Span chunk = span_of(hd.lo + i0, hd.hi + i0, static_cast<int>(n));
        for (int64_t j0 = first_tile(chunk); j0 < chunk.hi; j0 += kTile) {
          const int64_t ja = std::max(j0, chunk.lo), jb = min_i64(j0 + kTile, chunk.hi);
          tile_p_ds(hd, i0, n, ja, jb, sc.p.data(), sc.ds.data(), blocks);
          tile_dq(hd, 0, n, ja, sc.ds.data(), blocks, dqc);
        }
        rows_commit(dq, b, h, i0, n, D, dqc);
      }
    }
  }
}

PYLLM_CPU_NS_END
