// Softmax cross-entropy over large vocabularies (one block per row), forward and backward.
//
// Per row (see pyllm.ops.reference.cross_entropy), eps the label smoothing, z the z-loss:
//   loss = (1 - eps)(lse - x_t) + eps (lse - mean(x)) + z lse^2
//   dloss/dx_j = p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V
// The forward reads the row once: each thread keeps an online (max, sum of exp) pair (Milakov &
// Gimelshein 2018) and the sum of x, merged across the block. Only lse (fp32) is saved; the backward
// recomputes p from it and writes dlogits in the logits' dtype, so no fp32 (rows, V) tensor is stored.
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kThreads = 512;

template <class T, int W>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                                           float* __restrict__ loss, float* __restrict__ lse_out,
                                                           int64_t vocab, int64_t ignore_index, float smoothing,
                                                           float z_loss) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  float m = -INFINITY, s = 0.0f, sum_x = 0.0f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * W; i < vocab; i += static_cast<int64_t>(kThreads) * W) {
    const Pack<T, W> p = load_pack<T, W>(x + i);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float v = to_float(p.v[k]);
      sum_x += v;
      if (v > m) {
        s = s * __expf(m - v) + 1.0f;
        m = v;
      } else if (v != -INFINITY) {  // a masked logit adds nothing; with m = -inf too, exp(v - m) is nan
        s += __expf(v - m);
      }
    }
  }
  const float row_max = block_max(m, scratch);
  const float total = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - row_max), scratch);
  const float total_x = block_sum(sum_x, scratch);
  if (threadIdx.x != 0) return;
  // a +inf logit makes lse +inf (exp(inf - inf) would make it nan), as logsumexp does
  const float lse = row_max == INFINITY ? row_max : row_max + logf(total);
  lse_out[row] = lse;
  const int64_t t = target[row];
  if (t == ignore_index) {
    loss[row] = 0.0f;
    return;
  }
  if (t < 0 || t >= vocab) {  // checking on the host would cost a sync: flag the row with nan instead
    loss[row] = NAN;
    return;
  }
  float l = (1.0f - smoothing) * (lse - to_float(x[t]));
  if (smoothing != 0.0f) l += smoothing * (lse - total_x / static_cast<float>(vocab));
  if (z_loss != 0.0f) l += z_loss * lse * lse;
  loss[row] = l;
}

template <class T, int W>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                                           const float* __restrict__ lse_in, const float* __restrict__ grad,
                                                           int64_t grad_stride, T* __restrict__ dlogits, int64_t vocab,
                                                           int64_t ignore_index, float smoothing, float z_loss) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* dx = dlogits + row * vocab;
  const int64_t t = target[row];
  const bool ignored = t == ignore_index;
  const float g = ignored ? 0.0f : grad[row * grad_stride];
  const float lse = lse_in[row];
  const float pscale = g * (1.0f + 2.0f * z_loss * lse);
  const float shift = g * smoothing / static_cast<float>(vocab);
  const float hit = g * (1.0f - smoothing);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * W; i < vocab; i += static_cast<int64_t>(kThreads) * W) {
    const Pack<T, W> p = load_pack<T, W>(x + i);
    Pack<T, W> o;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float d = ignored ? 0.0f : pscale * __expf(to_float(p.v[k]) - lse) - shift;
      if (i + k == t) d -= hit;
      o.v[k] = from_float<T>(d);
    }
    store_pack<T, W>(dx + i, o);
  }
}

}  // namespace

void cross_entropy_fwd(uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t rows,
                       int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss, int dtype,
                       uintptr_t stream) {
  if (rows == 0) return;
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = kVecWidth<T>;
    if (vocab % kVec == 0)
      ce_fwd_kernel<T, kVec><<<rows, kThreads, 0, s>>>(ptr<const T>(logits), ptr<const int64_t>(target), ptr<float>(loss),
                                                       ptr<float>(lse), vocab, ignore_index, label_smoothing, z_loss);
    else
      ce_fwd_kernel<T, 1><<<rows, kThreads, 0, s>>>(ptr<const T>(logits), ptr<const int64_t>(target), ptr<float>(loss),
                                                    ptr<float>(lse), vocab, ignore_index, label_smoothing, z_loss);
  });
  check_launch("cross_entropy_fwd");
}

void cross_entropy_bwd(uintptr_t logits, uintptr_t target, uintptr_t lse, uintptr_t grad, int64_t grad_stride,
                       uintptr_t dlogits, int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                       float z_loss, int dtype, uintptr_t stream) {
  if (rows == 0) return;
  const cudaStream_t s = as_stream(stream);
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    constexpr int kVec = kVecWidth<T>;
    if (vocab % kVec == 0)
      ce_bwd_kernel<T, kVec><<<rows, kThreads, 0, s>>>(ptr<const T>(logits), ptr<const int64_t>(target),
                                                       ptr<const float>(lse), ptr<const float>(grad), grad_stride,
                                                       ptr<T>(dlogits), vocab, ignore_index, label_smoothing, z_loss);
    else
      ce_bwd_kernel<T, 1><<<rows, kThreads, 0, s>>>(ptr<const T>(logits), ptr<const int64_t>(target),
                                                    ptr<const float>(lse), ptr<const float>(grad), grad_stride,
                                                    ptr<T>(dlogits), vocab, ignore_index, label_smoothing, z_loss);
  });
  check_launch("cross_entropy_bwd");
}

}  // namespace cuda
}  // namespace pyllm
