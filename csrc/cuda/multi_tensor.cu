// Multi-tensor apply: one launch walks many tensors (the parameters of a model) in fixed-size chunks.
// The host packs device addresses and a block -> (tensor, chunk) map into a kernel argument (the
// "pointer table", as in Apex's multi_tensor_apply) and launches again only when the table is full.
//   unscale_check: g *= inv_scale, found_inf = 1 if any g is inf/nan (the loss scaler's step)
//   adamw: fused AdamW (Loshchilov & Hutter 2019) with fp32 moments and optional fp32 master weights.
// Device-side scalars (inv_scale, lr, step, found_inf) are read in the kernel: no host synchronisation.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_table.h"

namespace pyllm {
namespace cuda {

namespace {

constexpr int kThreads = 512;
// Kernel arguments are limited to 4 KB (before CUDA 12.1 / Volta): the table plus AdamW's scalars.
static_assert(sizeof(TensorTable<5>) + 64 <= 4096, "the AdamW pointer table no longer fits a kernel argument");

template <class T>
__global__ void __launch_bounds__(kThreads) unscale_check_kernel(TensorTable<1> table, float inv_scale,
                                                                  const float* __restrict__ inv_scale_ptr,
                                                                  float* __restrict__ found_inf) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = std::min<int64_t>(kChunk, table.size[t] - start);
  T* g = static_cast<T*>(table.addr[0][t]) + start;
  const float inv = inv_scale_ptr ? *inv_scale_ptr : inv_scale;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float v = to_float(g[i]);
    bad |= !isfinite(v);
    g[i] = from_float<T>(v * inv);
  }
  if (bad) *found_inf = 1.0f;  // every writer stores the same value
}

// Lists: 0 params (P), 1 master (fp32, may be null), 2 grads (G), 3 exp_avg, 4 exp_avg_sq (fp32).
template <class P, class G>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorTable<5> table, float lr, const float* __restrict__ lr_ptr,
                                                          float beta1, float beta2, float eps, float weight_decay,
                                                          float step, const float* __restrict__ step_ptr,
                                                          const float* __restrict__ found_inf) {
  if (found_inf && *found_inf > 0.0f) return;  // overflowed gradients: skip the step
  const int t = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = std::min<int64_t>(kChunk, table.size[t] - start);
  P* p = static_cast<P*>(table.addr[0][t]) + start;
  float* master = table.addr[1][t] ? static_cast<float*>(table.addr[1][t]) + start : nullptr;
  const G* g = static_cast<const G*>(table.addr[2][t]) + start;
  float* m = static_cast<float*>(table.addr[3][t]) + start;
  float* v = static_cast<float*>(table.addr[4][t]) + start;
  if (lr_ptr) lr = *lr_ptr;
  if (step_ptr) step = *step_ptr;
  const float inv_bc1 = 1.0f / (1.0f - powf(beta1, step));
  const float inv_sqrt_bc2 = rsqrtf(1.0f - powf(beta2, step));
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const float gi = to_float(g[i]);
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = master ? master[i] : to_float(p[i]);
    const float updated = pi - lr * ((mi * inv_bc1) / (sqrtf(vi) * inv_sqrt_bc2 + eps) + weight_decay * pi);
    if (master) master[i] = updated;
    p[i] = from_float<P>(updated);
  }
}

}  // namespace

void unscale_check(uintptr_t grads_table, uintptr_t sizes, int64_t n_tensors, float inv_scale, uintptr_t inv_scale_ptr,
                   uintptr_t found_inf, int dtype, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  const int64_t* lists[1] = {ptr<const int64_t>(grads_table)};
  PYLLM_DISPATCH_FLOAT(dtype, T, {
    for_each_table<1>(lists, ptr<const int64_t>(sizes), n_tensors, [&](const TensorTable<1>& table, int blocks) {
      unscale_check_kernel<T><<<blocks, kThreads, 0, s>>>(table, inv_scale, ptr<const float>(inv_scale_ptr),
                                                           ptr<float>(found_inf));
    });
  });
  check_launch("unscale_check");
}

void adamw(uintptr_t params_table, uintptr_t master_table, uintptr_t grads_table, uintptr_t exp_avgs_table,
           uintptr_t exp_avg_sqs_table, uintptr_t sizes, int64_t n_tensors, float lr, uintptr_t lr_ptr, float beta1,
           float beta2, float eps, float weight_decay, float step, uintptr_t step_ptr, uintptr_t found_inf,
           int param_dtype, int grad_dtype, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  const int64_t* lists[5] = {ptr<const int64_t>(params_table), ptr<const int64_t>(master_table),
                             ptr<const int64_t>(grads_table), ptr<const int64_t>(exp_avgs_table),
                             ptr<const int64_t>(exp_avg_sqs_table)};
  PYLLM_DISPATCH_FLOAT(param_dtype, P, {
    PYLLM_DISPATCH_FLOAT(grad_dtype, G, {
      for_each_table<5>(lists, ptr<const int64_t>(sizes), n_tensors, [&](const TensorTable<5>& table, int blocks) {
        adamw_kernel<P, G><<<blocks, kThreads, 0, s>>>(table, lr, ptr<const float>(lr_ptr), beta1, beta2, eps,
                                                       weight_decay, step, ptr<const float>(step_ptr),
                                                       ptr<const float>(found_inf));
      });
    });
  });
  check_launch("adamw");
}

}  // namespace cuda
}  // namespace pyllm
