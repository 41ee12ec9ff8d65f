// Row softmax and softmax cross-entropy over large vocabularies.
//
// Cross-entropy per row (see pyllm.ops.reference.cross_entropy), eps the label smoothing, z the z-loss:
//   loss = (1 - eps)(lse - x_t) + eps (lse - mean(x)) + z lse^2
//   dloss/dx_j = p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V,   p = softmax(x)
// The forward makes one pass for the max and one for sum(exp) and sum(x); only lse is saved, and the
// backward recomputes p from it, so no (rows, V) probability tensor is ever stored. Logits, y and the
// gradients may be float32 or bfloat16 (kernels.h), read and written in their own type (bfloat16
// converted in registers); losses and lse are float32.
#include <type_traits>

#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

// Sums over long rows in blocks of kBlock (vectorised, float) added up in double: the error grows with
// the block length, not with the vocabulary size.
constexpr int64_t kBlock = 1024;

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
      const float m = row_max(xr, n);
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
  typed(logits, [&](auto xp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    constexpr int L = lanes<2, T>();
    for_each_row(rows, vocab, threads, false, 0, [&](int64_t r, const RowBuffers&) {
      const T* x = xp + r * vocab;
      const float m = row_max(x, vocab);
      double sum_exp = 0.0, sum_x = 0.0;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const T* xs = x + start;
        const Vals<2> block = row_sums<2, L>(min_i64(kBlock, vocab - start), [&](int64_t i) {
          const float v = load(xs, i);
          return Vals<2>{{fast_exp(v - m), v}};
        });
        sum_exp += block.v[0];
        sum_x += block.v[1];
      }
      // a +inf logit makes lse +inf (exp(inf - inf) would make it nan), as logsumexp does
      const float lse = m == INFINITY ? m : m + static_cast<float>(log(sum_exp));
      lse_out[r] = lse;
      const int64_t t = target[r];
      if (t == ignore_index) {
        loss[r] = 0.0f;
        return;
      }
      float l = (1.0f - label_smoothing) * (lse - load(x, t));
      if (label_smoothing != 0.0f) {
        l += label_smoothing * (lse - static_cast<float>(sum_x / static_cast<double>(vocab)));
      }
      if (z_loss != 0.0f) l += z_loss * lse * lse;
      loss[r] = l;
    });
  });
}

void cross_entropy_bwd(Src logits, const int64_t* target, const float* lse_in, Src grad, int64_t grad_stride,
                       Dst dlogits, int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                       float z_loss, int threads) {
  const float smooth = label_smoothing / static_cast<float>(vocab);
  typed(logits, [&](auto xp) { typed(dlogits, [&](auto dxp) {
    for_each_row(rows, vocab, threads, false, 0, [&](int64_t r, const RowBuffers&) {
      const auto* x = xp + r * vocab;  // dlogits may be logits itself (in place): no __restrict
      auto* dx = dxp + r * vocab;
      const int64_t t = target[r];
      if (t == ignore_index) {
#pragma omp simd
        for (int64_t i = 0; i < vocab; ++i) store(dx, i, 0.0f);
        return;
      }
      const float g = src_at(grad, r * grad_stride);
      const float lse = lse_in[r];
      const float pscale = g * (1.0f + 2.0f * z_loss * lse);
      const float shift = g * smooth;
      // the target's gradient, from its float value (a bfloat16 dlogits is rounded once, as the reference's)
      const float dt = pscale * fast_exp(load(x, t) - lse) - shift - g * (1.0f - label_smoothing);
#pragma omp simd
      for (int64_t i = 0; i < vocab; ++i) store(dx, i, pscale * fast_exp(load(x, i) - lse) - shift);
      store(dx, t, dt);
    });
  }); });
}

PYLLM_CPU_NS_END
