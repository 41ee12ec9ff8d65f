// Multi-tensor optimiser kernels: one call walks every parameter through pointer tables, split into
// fixed-size chunks that the threads share, so a model with hundreds of small tensors costs one call
// and keeps both cores busy.
//
// AdamW (Loshchilov & Hutter 2019), as in pyllm.ops.reference.adamw_step:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + wd * p)
#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

namespace {

constexpr int64_t kChunk = 16384;

// Total number of chunks, and chunk `c` -> (tensor, offset) by walking the cumulative counts.
int64_t count_chunks(const int64_t* sizes, int64_t n_tensors) {
  int64_t total = 0;
  for (int64_t i = 0; i < n_tensors; ++i) total += (sizes[i] + kChunk - 1) / kChunk;
  return total;
}

void locate_chunk(const int64_t* sizes, int64_t n_tensors, int64_t c, int64_t* tensor, int64_t* offset) {
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t k = (sizes[i] + kChunk - 1) / kChunk;
    if (c < k) {
      *tensor = i;
      *offset = c * kChunk;
      return;
    }
    c -= k;
  }
  *tensor = -1;
  *offset = 0;
}

}  // namespace

void adamw(float* const* params, float* const* master, const float* const* grads, float* const* exp_avgs,
           float* const* exp_avg_sqs, const int64_t* sizes, int64_t n_tensors, float lr, float beta1, float beta2,
           float eps, float weight_decay, float bias_correction1, float bias_correction2, int threads) {
  const int64_t chunks = count_chunks(sizes, n_tensors);
  const float inv_bc1 = 1.0f / bias_correction1;
  const float inv_sqrt_bc2 = 1.0f / sqrtf(bias_correction2);
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t ti, off;
    locate_chunk(sizes, n_tensors, c, &ti, &off);
    const int64_t len = min_i64(kChunk, sizes[ti] - off);
    float* p = (master ? master[ti] : params[ti]) + off;
    const float* g = grads[ti] + off;
    float* m = exp_avgs[ti] + off;
    float* v = exp_avg_sqs[ti] + off;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float mi = beta1 * m[i] + (1.0f - beta1) * g[i];
      const float vi = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
      m[i] = mi;
      v[i] = vi;
      p[i] -= lr * ((mi * inv_bc1) / (sqrtf(vi) * inv_sqrt_bc2 + eps) + weight_decay * p[i]);
    }
    if (master) {
      float* q = params[ti] + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) q[i] = p[i];
    }
  }
}

bool unscale_check(float* const* grads, const int64_t* sizes, int64_t n_tensors, float inv_scale, int threads) {
  const int64_t chunks = count_chunks(sizes, n_tensors);
  int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t ti, off;
    locate_chunk(sizes, n_tensors, c, &ti, &off);
    const int64_t len = min_i64(kChunk, sizes[ti] - off);
    float* g = grads[ti] + off;
    int chunk_bad = 0;
#pragma omp simd reduction(| : chunk_bad)
    for (int64_t i = 0; i < len; ++i) {
      // x - x is 0 for finite x and nan for inf/nan; the comparison is false only for nan.
      const float d = g[i] - g[i];
      chunk_bad |= !(d == 0.0f);
      g[i] *= inv_scale;
    }
    bad |= chunk_bad;
  }
  return bad != 0;
}

PYLLM_CPU_NS_END
