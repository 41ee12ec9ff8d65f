// Row softmax and softmax cross-entropy over large vocabularies.
//
// Cross-entropy per row (see pyllm.ops.reference.cross_entropy), eps the label smoothing, z the z-loss:
//   loss = (1 - eps)(lse - x_t) + eps (lse - mean(x)) + z lse^2
//   dloss/dx_j = p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V,   p = softmax(x)
// The forward makes one pass for the max and one for sum(exp) and sum(x); only lse is saved, and the
// backward recomputes p from it, so no (rows, V) probability tensor is ever stored. Logits, y and the
// gradients may be float32 or bfloat16 (kernels.h); losses and lse are float32.
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

}  // namespace

void softmax_fwd(Src x, Dst y, int64_t rows, int64_t n, int threads) {
  for_each_row(rows, n, threads, is_bf16(x) || is_bf16(y), 2, [&](int64_t r, const RowBuffers& buf) {
    const float* xr = src_row(x, r * n, n, buf[0]);
    float* yr = dst_row(y, r * n, buf[1]);
    const float m = row_max(xr, n);
    double sum = 0.0;
    for (int64_t start = 0; start < n; start += kBlock) {
      const int64_t end = min_i64(start + kBlock, n);
      float block = 0.0f;
#pragma omp simd reduction(+ : block)
      for (int64_t i = start; i < end; ++i) {
        yr[i] = fast_exp(xr[i] - m);
        block += yr[i];
      }
      sum += block;
    }
    const float inv = static_cast<float>(1.0 / sum);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] *= inv;
    dst_commit(y, r * n, yr, n);
  });
}

void softmax_bwd(Src dy, Src y, Dst dx, int64_t rows, int64_t n, int threads) {
  const bool widen = is_bf16(dy) || is_bf16(y) || is_bf16(dx);
  for_each_row(rows, n, threads, widen, 3, [&](int64_t r, const RowBuffers& buf) {
    const float* dyr = src_row(dy, r * n, n, buf[0]);
    const float* yr = src_row(y, r * n, n, buf[1]);
    float* dxr = dst_row(dx, r * n, buf[2]);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < n; ++i) dot += dyr[i] * yr[i];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dxr[i] = yr[i] * (dyr[i] - dot);
    dst_commit(dx, r * n, dxr, n);
  });
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
