// The CPU kernel interface: plain functions over raw float32 pointers (no libtorch).
//
// Every kernel source in csrc/cpu is compiled once per instruction set (see CMakeLists.txt): into
// namespace pyllm::cpu::avx512 (AVX-512 F/DQ/BW/VL), pyllm::cpu::avx2 (AVX2 + FMA) and pyllm::cpu::base
// (the compiler's baseline flags). dispatch.cpp picks one table at run time from the CPU's features, so the extension never
// executes an instruction the machine lacks. Sizes are int64; rows are contiguous unless a stride is
// given. `threads` is the thread count to use (the Python side passes torch.get_num_threads()).
#pragma once
#include <cstdint>

namespace pyllm {
namespace cpu {

struct KernelTable {
  const char* isa;

  // LayerNorm (rms=false) / RMSNorm (rms=true) over rows of n. With residual: h = x + residual is
  // written to h_out and normalised; otherwise h = x (h_out unused). mean (LayerNorm only) and rstd
  // per row are saved for the backward.
  void (*norm_fwd)(const float* x, const float* residual, const float* weight, const float* bias,
                   float* y, float* h_out, float* mean, float* rstd, int64_t rows, int64_t n, float eps,
                   bool rms, int threads);
  // dx = d norm / dh . dy (+ dh_extra, the gradient reaching h through the residual stream);
  // dweight, dbias (may be null) are overwritten with the sums over rows.
  void (*norm_bwd)(const float* dy, const float* h, const float* weight, const float* mean,
                   const float* rstd, const float* dh_extra, float* dx, float* dweight, float* dbias,
                   int64_t rows, int64_t n, bool rms, int threads);

  // y = GELU(x + bias) (tanh or exact); bias (n) may be null. Rows of n contiguous.
  void (*bias_gelu_fwd)(const float* x, const float* bias, float* y, int64_t rows, int64_t n, bool tanh_approx,
                        int threads);
  // dx = dy * GELU'(x + bias); dbias (n, may be null) = sum over rows of dx.
  void (*bias_gelu_bwd)(const float* dy, const float* x, const float* bias, float* dx, float* dbias,
                        int64_t rows, int64_t n, bool tanh_approx, int threads);
  // y = SiLU(gate) * up; gate/up rows of n with row strides (elements) gate_stride/up_stride.
  void (*swiglu_fwd)(const float* gate, const float* up, float* y, int64_t rows, int64_t n, int64_t gate_stride,
                     int64_t up_stride, int threads);
  // dgate, dup rows of n with row stride grad_stride: n for two tensors, 2n for the halves of one
  // (rows, 2n) gradient (dup = dgate + n), the layout of the fused [gate | up] projection.
  void (*swiglu_bwd)(const float* dy, const float* gate, const float* up, float* dgate, float* dup,
                     int64_t rows, int64_t n, int64_t gate_stride, int64_t up_stride, int64_t grad_stride,
                     int threads);

  // Row softmax (rows, n) and its backward dx = y * (dy - sum(dy * y)).
  void (*softmax_fwd)(const float* x, float* y, int64_t rows, int64_t n, int threads);
  void (*softmax_bwd)(const float* dy, const float* y, float* dx, int64_t rows, int64_t n, int threads);

  // Softmax cross-entropy per row (see pyllm.ops.reference.cross_entropy): loss (rows, 0 for ignored
  // rows) and lse (rows) saved for the backward. target is int64.
  void (*cross_entropy_fwd)(const float* logits, const int64_t* target, float* loss, float* lse, int64_t rows,
                            int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                            int threads);
  // dlogits = row_scale * (p (1 + 2 z lse) - (1 - eps) onehot - eps / V), 0 on ignored rows.
  // grad (rows) holds each row's upstream gradient, or grad[0] for all rows when grad_stride is 0.
  void (*cross_entropy_bwd)(const float* logits, const int64_t* target, const float* lse, const float* grad,
                            int64_t grad_stride, float* dlogits, int64_t rows, int64_t vocab,
                            int64_t ignore_index, float label_smoothing, float z_loss, int threads);

  // Rotary embedding, "rotate half" layout. x (B, H, T, D) with element strides xs[4] (xs[3] == 1);
  // y contiguous (B, H, T, D); cos/sin (T, D/2) when cs_batch_stride is 0, else (B, T, D/2).
  // inverse=true rotates by -theta (the backward).
  void (*rope)(const float* x, const int64_t* xs, const float* cos, const float* sin, int64_t cs_batch_stride,
               float* y, int64_t B, int64_t H, int64_t T, int64_t D, bool inverse, int threads);

  // Multi-tensor AdamW over n_tensors tensors (pointer tables, sizes in elements), in place.
  // master (may be null): fp32 weights updated instead of params; params then receive a copy.
  void (*adamw)(float* const* params, float* const* master, const float* const* grads, float* const* exp_avgs,
                float* const* exp_avg_sqs, const int64_t* sizes, int64_t n_tensors, float lr, float beta1,
                float beta2, float eps, float weight_decay, float bias_correction1, float bias_correction2,
                int threads);
  // grads *= inv_scale in place; returns true if any element was inf or nan.
  bool (*unscale_check)(float* const* grads, const int64_t* sizes, int64_t n_tensors, float inv_scale, int threads);

  // o = softmax(q k^T * scale + causal mask) v. q, o (B, Hq, T, D); k, v (B, Hkv, S, D), Hq % Hkv == 0;
  // queries are the last T of the S positions. lse (B, Hq, T) is saved for the backward (-inf for a
  // query that sees no key). Each (b, head) holds a (T, S) score matrix in scratch: meant for small T * S.
  void (*attention_fwd)(const float* q, const float* k, const float* v, float* o, float* lse, int64_t B, int64_t Hq,
                        int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale, bool causal, int threads);
  // dq, dk, dv (overwritten) from dout and the forward's o and lse; dk/dv summed over each kv group.
  void (*attention_bwd)(const float* q, const float* k, const float* v, const float* o, const float* lse,
                        const float* dout, float* dq, float* dk, float* dv, int64_t B, int64_t Hq, int64_t Hkv,
                        int64_t T, int64_t S, int64_t D, float scale, bool causal, int threads);
};

// The table for this machine (chosen once, on first use).
const KernelTable& kernels();

#define PYLLM_CPU_DECLARE_TABLE(ns) \
  namespace ns {                    \
  KernelTable make_table();         \
  }
PYLLM_CPU_DECLARE_TABLE(avx512)
PYLLM_CPU_DECLARE_TABLE(avx2)
PYLLM_CPU_DECLARE_TABLE(base)
#undef PYLLM_CPU_DECLARE_TABLE

}  // namespace cpu
}  // namespace pyllm
