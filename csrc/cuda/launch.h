// Host launchers of the CUDA kernels (csrc/cuda/*.cu), called by bindings.cpp. Plain C++ types only:
// device addresses as uintptr_t (0 = absent), sizes as int64_t, dtype codes (common/dtype.h) and the
// CUDA stream as uintptr_t. Every launcher is asynchronous on `stream` and never synchronises with the
// host; launch errors throw std::runtime_error. The Python wrappers (pyllm/ops/cuda_backend.py) have
// already checked devices (the current one), dtypes, contiguity, 16-byte alignment of every base
// address and the 32-bit limits stated per launcher below.
#pragma once
#include <cstdint>

namespace pyllm {
namespace cuda {

// ---- LayerNorm / RMSNorm (norms.cu). Row statistics mean/rstd are fp32 (rows). With residual,
// h = x + residual is written to h_out and normalised. dweight/dbias reduce through `workspace`
// (norm_bwd_workspace floats, fp32). Limits: n <= 2^31 - 1 - 2048 (int index plus one loop stride),
// ceil(rows / 8) <= 2^31 - 1 (grid x).
void norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h_out,
              uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t n, float eps, bool rms, int dtype,
              uintptr_t stream);
int64_t norm_bwd_workspace(int64_t rows, int64_t n);
void norm_bwd(uintptr_t dy, uintptr_t h, uintptr_t weight, uintptr_t mean, uintptr_t rstd, uintptr_t dh_extra,
              uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t rows, int64_t n, bool rms,
              int dtype, uintptr_t stream);

// ---- bias + GELU, SwiGLU (activations.cu). gate/up rows have element strides gate_stride/up_stride.
void bias_gelu_fwd(uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n, bool tanh_approx, int dtype,
                   uintptr_t stream);
int64_t bias_gelu_bwd_workspace(int64_t rows, int64_t n);
void bias_gelu_bwd(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, uintptr_t dbias, uintptr_t workspace,
                   int64_t rows, int64_t n, bool tanh_approx, int dtype, uintptr_t stream);
void swiglu_fwd(uintptr_t gate, uintptr_t up, uintptr_t y, int64_t rows, int64_t n, int64_t gate_stride,
                int64_t up_stride, int dtype, uintptr_t stream);
void swiglu_bwd(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t rows, int64_t n,
                int64_t gate_stride, int64_t up_stride, int dtype, uintptr_t stream);

// ---- softmax cross-entropy (cross_entropy.cu): logits (rows, vocab) in dtype, target int64, loss and
// lse fp32 (rows), one block per row: rows <= 2^31 - 1 (grid x). grad fp32: one value per row, or
// grad[0] for every row when grad_stride is 0.
void cross_entropy_fwd(uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t rows,
                       int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss, int dtype,
                       uintptr_t stream);
void cross_entropy_bwd(uintptr_t logits, uintptr_t target, uintptr_t lse, uintptr_t grad, int64_t grad_stride,
                       uintptr_t dlogits, int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                       float z_loss, int dtype, uintptr_t stream);

// ---- multi-tensor apply (multi_tensor.cu). *_table are HOST arrays (int64) of device addresses, sizes a
// host array of element counts. Scalars that live on the device (inv_scale, lr, step) are read there
// when their address is non-zero, so a training step never waits for the host.
void unscale_check(uintptr_t grads_table, uintptr_t sizes, int64_t n_tensors, float inv_scale,
                   uintptr_t inv_scale_ptr, uintptr_t found_inf, int dtype, uintptr_t stream);
void adamw(uintptr_t params_table, uintptr_t master_table, uintptr_t grads_table, uintptr_t exp_avgs_table,
           uintptr_t exp_avg_sqs_table, uintptr_t sizes, int64_t n_tensors, float lr, uintptr_t lr_ptr, float beta1,
           float beta2, float eps, float weight_decay, float step, uintptr_t step_ptr, uintptr_t found_inf,
           int param_dtype, int grad_dtype, uintptr_t stream);

// ---- tensor-core GEMM (gemm.cu): c (M, N) = act(a (M, K) @ B + bias), fp32 accumulate. B is (N, K)
// (an nn.Linear weight, b_is_nk) or (K, N). activation: 0 none, 1 exact GELU, 2 tanh GELU.
// Requires K % 8 == 0 and, for (K, N) B, N % 8 == 0 (16-byte rows for cp.async).
void gemm(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t c, int64_t M, int64_t N, int64_t K, bool b_is_nk,
          int activation, int dtype, uintptr_t stream);

// ---- FlashAttention-2 (attention.cu): q (B, Hq, T, D), k/v (B, Hkv, S, D), o like q, lse fp32
// (B, Hq, T). Queries are the last T of S positions. D in {64, 128}.
void attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale, bool causal, int dtype,
                   uintptr_t stream);
// workspace: attention_bwd_workspace floats (fp32 dq accumulator and the row terms delta = rowsum(dO * O)).
int64_t attention_bwd_workspace(int64_t B, int64_t Hq, int64_t T, int64_t D);
void attention_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t dout, uintptr_t dq,
                   uintptr_t dk, uintptr_t dv, uintptr_t workspace, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                   int64_t S, int64_t D, float scale, bool causal, int dtype, uintptr_t stream);

}  // namespace cuda
}  // namespace pyllm
