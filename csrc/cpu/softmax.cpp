// Row softmax and softmax cross-entropy over large vocabularies.
//
// Cross-entropy per row (see pyllm.ops.reference.cross_entropy), eps the label smoothing, z the z-loss:
//   loss = (1 - eps)(lse - x_t) + eps (lse - mean(x)) + z lse^2
//   dloss/dx_j = p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V,   p = softmax(x)
// The forward makes one pass for the max and one for sum(exp) and sum(x); only lse is saved, and the
// backward recomputes p from it, so no (rows, V) probability tensor is ever stored. Logits, y and the
// gradients may be float32 or bfloat16 (kernels.h); losses and lse are float32.
#include <type_traits>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

// Sums over long rows in blocks of kBlock (vectorised, float) added up in double: the error grows with
// the block length, not with the vocabulary size.
constexpr int64_t kBlock = 1024;

inline float row_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The max of x[0..n) in L lanes (as row_sums: a tree over the lanes, not a scalar chain per row).
template <class T>
PYLLM_INLINE float row_max_typed(const T* __restrict x, int64_t n) {
  constexpr int L = lanes<1, T>();
  float acc[L];
  for (int j = 0; j < L; ++j) acc[j] = -INFINITY;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const float v = load(x, i + j);
      acc[j] = v > acc[j] ? v : acc[j];
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const float v = load(x, i + j);
    acc[j] = v > acc[j] ? v : acc[j];
  }
#pragma GCC unroll 8
  for (int w = L / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) acc[j] = acc[j + w] > acc[j] ? acc[j + w] : acc[j];
  }
  return acc[0];
}

// e[i] = exp(x[i] - m) for i < n; returns their sum, in blocks of kBlock (each summed in lanes) added up
// in double.
template <class T>
PYLLM_INLINE double exp_and_sum(const T* __restrict x, float m, float* __restrict e, int64_t n) {
  constexpr int L = lanes<1, T>();
  double sum = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = min_i64(kBlock, n - start);
    const T* xs = x + start;
    float* es = e + start;
    sum += row_sums<1, L>(len, [&](int64_t i) { return Vals<1>{{es[i] = fast_exp_or_zero(load(xs, i) - m)}}; }).v[0];
  }
  return sum;
}

// sum(a[i] * b[i]) over i < n, in L lanes (row_sums' loop, written out: GCC left row_sums out of line
// here, a call per row, which made the backward at 3072 x 64 slower than before).
template <int L, class TA, class TB>
PYLLM_INLINE float row_dot(const TA* __restrict a, const TB* __restrict b, int64_t n) {
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) acc[j] += load(a, i + j) * load(b, i + j);
  }
  for (int j = 0; i + j < n; ++j) acc[j] += load(a, i + j) * load(b, i + j);
  return lane_tree<L>(acc);
}

}  // namespace

// Per row: the max, then e = exp(x - max) and its sum, then y = e / sum. x is read in its own type and
// converted in registers; e is written into y when y is float32, else into a float buffer (so that a
// bfloat16 y is rounded once, from the float quotient, as the reference's is).
void softmax_fwd(Src x, Dst y, int64_t rows, int64_t n, int threads) {
  typed(x, [&](auto xp) { typed(y, [&](auto yp) {
    using TY = std::remove_pointer_t<decltype(yp)>;
    constexpr bool kFloatY = std::is_same_v<TY, float>;
    for_each_row(rows, n, threads, !kFloatY, 1, [&](int64_t r, const RowBuffers& buf) {
      const auto* xr = xp + r * n;
      TY* yr = yp + r * n;
      float* e = nullptr;
      if constexpr (kFloatY) {
        e = yr;
      } else {
        e = buf[0];
      }
      const float m = row_max_typed(xr, n);
      const float inv = static_cast<float>(1.0 / exp_and_sum(xr, m, e, n));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(yr, i, e[i] * inv);
    });
  }); });
}

// dx = y * (dy - sum(dy * y)) per row, every operand read and written in its own type (no buffers).
void softmax_bwd(Src dy, Src y, Dst dx, int64_t rows, int64_t n, int threads) {
  typed(dy, [&](auto dyp) { typed(y, [&](auto yp) { typed(dx, [&](auto dxp) {
    using TDY = std::remove_const_t<std::remove_pointer_t<decltype(dyp)>>;
    using TYY = std::remove_const_t<std::remove_pointer_t<decltype(yp)>>;
    constexpr int L = lanes<1, TDY, TYY>();
    for_each_row(rows, n, threads, false, 0, [&](int64_t r, const RowBuffers&) {
      const int64_t o = r * n;
      const auto* __restrict a = dyp + o;
      const auto* __restrict b = yp + o;
      auto* __restrict out = dxp + o;
      const float dot = row_dot<L>(a, b, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(out, i, load(b, i) * (load(a, i) - dot));
    });
  }); }); });
}

void cross_entropy_fwd(Src logits, const int64_t* target, float* loss, float* lse_out, int64_t rows, int64_t vocab,
                       int64_t ignore_index, float label_smoothing, float z_loss, int threads) {
  for_each_row(rows, vocab, threads, is_bf16(logits), 1, [&](int64_t r, const RowBuffers& buf) {
    const float* x = src_row(logits, r * vocab, vocab, buf[0]);
    const float m = row_max(x, vocab);
    double sum_exp = 0.0, sum_x = 0.0;
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t end = min_i64(start + kBlock, vocab);
      float block_exp = 0.0f, block_x = 0.0f;
#pragma omp simd reduction(+ : block_exp, block_x)
      for (int64_t i = start; i < end; ++i) {
        block_exp += fast_exp(x[i] - m);
        block_x += x[i];
      }
      sum_exp += block_exp;
      sum_x += block_x;
    }
    const float lse = m + static_cast<float>(log(sum_exp));
    lse_out[r] = lse;
    const int64_t t = target[r];
    if (t == ignore_index) {
      loss[r] = 0.0f;
      return;
    }
    float l = (1.0f - label_smoothing) * (lse - x[t]);
    if (label_smoothing != 0.0f) l += label_smoothing * (lse - static_cast<float>(sum_x / static_cast<double>(vocab)));
    if (z_loss != 0.0f) l += z_loss * lse * lse;
    loss[r] = l;
  });
}

void cross_entropy_bwd(Src logits, const int64_t* target, const float* lse_in, Src grad, int64_t grad_stride,
                       Dst dlogits, int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                       float z_loss, int threads) {
  const float smooth = label_smoothing / static_cast<float>(vocab);
  const bool widen = is_bf16(logits) || is_bf16(dlogits);
  for_each_span(rows, vocab, threads, widen, 2, [&](int64_t r, int64_t c, int64_t len, const RowBuffers& buf) {
    const int64_t t = target[r];
    float* dx = dst_row(dlogits, r * vocab + c, buf[1]);
    if (t == ignore_index) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dx[i] = 0.0f;
      dst_commit(dlogits, r * vocab + c, dx, len);
      return;
    }
    const float* x = src_row(logits, r * vocab + c, len, buf[0]);
    const float g = src_at(grad, r * grad_stride);
    const float lse = lse_in[r];
    const float pscale = g * (1.0f + 2.0f * z_loss * lse);
    const float shift = g * smooth;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dx[i] = pscale * fast_exp(x[i] - lse) - shift;
    if (t >= c && t < c + len) dx[t - c] -= g * (1.0f - label_smoothing);
    dst_commit(dlogits, r * vocab + c, dx, len);
  });
}

PYLLM_CPU_NS_END
