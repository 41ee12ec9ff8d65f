// The CPU kernel interface: plain functions over raw pointers (no libtorch).
//
// Every kernel source in csrc/cpu is compiled once per instruction set (see CMakeLists.txt): into
// namespace pyllm::cpu::avx512 (AVX-512 F/DQ/BW/VL), pyllm::cpu::avx2 (AVX2 + FMA) and pyllm::cpu::base
// (the compiler's baseline flags). dispatch.cpp picks one table at run time from the CPU's features, so
// the extension never executes an instruction the machine lacks. Sizes are int64; rows are contiguous
// unless a stride is given. `threads` is the thread count to use (the Python side passes torch.get_num_threads()).
//
// The row kernels (norms, activations, softmax, cross-entropy) take their tensors as Src/Dst: float32 or
// bfloat16 per tensor, so mixed-precision callers (a bfloat16 activation added to a float32 residual
// stream under autocast) need no casts; they compute in float32 and widen/narrow one row at a time.
// Saved statistics (mean, rstd, lse) and losses are float32. The other kernels take float32 only.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pyllm {
namespace cpu {

// A tensor a kernel reads (Src) or writes (Dst): its address (null for an absent optional tensor) and
// element type, DType::kFloat32 or DType::kBFloat16.
struct Src {
  const void* p;
  DType t;
};
struct Dst {
  void* p;
  DType t;
};

// A (B, H, L, D) tensor of the attention kernels: element (b, h, l, d) at p + b * sb + h * sh + l * sl + d
// (strides in elements, d contiguous), float32 or bfloat16; e.g. the q, k and v heads viewed in place in
// the (B, T, (Hq + 2 Hkv) D) output of a fused qkv projection.
struct Heads {
  const void* p;
  DType t;
  int64_t sb, sh, sl;
};
struct HeadsOut {
  void* p;
  DType t;
  int64_t sb, sh, sl;
};

struct KernelTable {
  const char* isa;

  // LayerNorm (rms=false) / RMSNorm (rms=true) over rows of n. With residual: h = x + residual is
  // written to h_out and normalised; otherwise h = x (h_out unused). mean (LayerNorm only) and rstd
  // per row are saved for the backward.
  void (*norm_fwd)(Src x, Src residual, Src weight, Src bias, Dst y, Dst h_out, float* mean, float* rstd,
                   int64_t rows, int64_t n, float eps, bool rms, int threads);
  // dx = d norm / dh . dy (+ dh_extra, the gradient reaching h through the residual stream);
  // dweight, dbias (may be null) are overwritten with the sums over rows.
  void (*norm_bwd)(Src dy, Src h, Src weight, const float* mean, const float* rstd, Src dh_extra, Dst dx,
                   Dst dweight, Dst dbias, int64_t rows, int64_t n, bool rms, int threads);

  // y = GELU(x + bias) (tanh or exact); bias (n) may be null. Rows of n contiguous.
  void (*bias_gelu_fwd)(Src x, Src bias, Dst y, int64_t rows, int64_t n, bool tanh_approx, int threads);
  // dx = dy * GELU'(x + bias); dbias (n, may be null) = sum over rows of dx.
  void (*bias_gelu_bwd)(Src dy, Src x, Src bias, Dst dx, Dst dbias, int64_t rows, int64_t n, bool tanh_approx,
                        int threads);
  // y = SiLU(gate) * up; gate/up rows of n with row strides (elements) gate_stride/up_stride.
  void (*swiglu_fwd)(Src gate, Src up, Dst y, int64_t rows, int64_t n, int64_t gate_stride, int64_t up_stride,
                     int threads);
  // dgate, dup rows of n with row stride grad_stride: n for two tensors, 2n for the halves of one
  // (rows, 2n) gradient (dup = dgate + n), the layout of the fused [gate | up] projection.
  void (*swiglu_bwd)(Src dy, Src gate, Src up, Dst dgate, Dst dup, int64_t rows, int64_t n, int64_t gate_stride,
                     int64_t up_stride, int64_t grad_stride, int threads);

  // Row softmax (rows, n) and its backward dx = y * (dy - sum(dy * y)).
  void (*softmax_fwd)(Src x, Dst y, int64_t rows, int64_t n, int threads);
  void (*softmax_bwd)(Src dy, Src y, Dst dx, int64_t rows, int64_t n, int threads);

  // Softmax cross-entropy per row (see pyllm.ops.reference.cross_entropy): loss (rows, 0 for ignored
  // rows) and lse (rows) saved for the backward. target is int64.
  void (*cross_entropy_fwd)(Src logits, const int64_t* target, float* loss, float* lse, int64_t rows,
                            int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                            int threads);
  // dlogits = row_scale * (p (1 + 2 z lse) - (1 - eps) onehot - eps / V), 0 on ignored rows.
  // grad (rows) holds each row's upstream gradient, or grad[0] for all rows when grad_stride is 0.
  // dlogits may be logits itself (same address and dtype): each row is read before it is written.
  void (*cross_entropy_bwd)(Src logits, const int64_t* target, const float* lse, Src grad, int64_t grad_stride,
                            Dst dlogits, int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                            float z_loss, int threads);

  // Rotary embedding, "rotate half" layout. x (B, H, T, D) with element strides xs[4] (xs[3] == 1);
  // y contiguous (B, H, T, D); cos/sin (T, D/2) when cs_batch_stride is 0, else (B, T, D/2).
  // inverse=true rotates by -theta (the backward). x and y float32 or bfloat16; cos, sin float32.
  void (*rope)(Src x, const int64_t* xs, const float* cos, const float* sin, int64_t cs_batch_stride, Dst y,
               int64_t B, int64_t H, int64_t T, int64_t D, bool inverse, int threads);

  // Multi-tensor AdamW over n_tensors tensors (pointer tables, sizes in elements), in place.
  // master (may be null): fp32 weights updated instead of params; params then receive a copy.
  void (*adamw)(float* const* params, float* const* master, const float* const* grads, float* const* exp_avgs,
                float* const* exp_avg_sqs, const int64_t* sizes, int64_t n_tensors, float lr, float beta1,
                float beta2, float eps, float weight_decay, float bias_correction1, float bias_correction2,
                int threads);
  // grads *= inv_scale in place; returns true if any element was inf or nan.
  bool (*unscale_check)(float* const* grads, const int64_t* sizes, int64_t n_tensors, float inv_scale, int threads);

  // dst (cols x rows, row stride ld_dst) = src^T for src (rows x cols, row stride ld_src); float32.
  void (*transpose)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols,
                    int threads);

  // o = softmax(q k^T * scale + mask) v. q, o (B, Hq, T, D); k, v (B, Hkv, S, D), Hq % Hkv == 0; queries
  // are the last T of the S positions. The mask (see pyllm.ops.reference.attention_mask): causal, a
  // sliding window of `window` keys (0: none) and doc (B, S) document ids (null: none). lse (B, Hq, T)
  // contiguous float32 is saved for the backward. Any T and S (scratch is O(S D) per thread); computes
  // in float32 (bfloat16 heads are widened on load). Every query must see at least one key (true for
  // any T <= S).
  void (*attention_fwd)(Heads q, Heads k, Heads v, HeadsOut o, float* lse, int64_t B, int64_t Hq, int64_t Hkv,
                        int64_t T, int64_t S, int64_t D, float scale, bool causal, int64_t window,
                        const int64_t* doc, int threads);
  // dq, dk, dv (overwritten) from dout and the forward's o and lse; dk/dv summed over each kv group.
  // The outputs must not overlap the inputs (they may be three views of one tensor).
  void (*attention_bwd)(Heads q, Heads k, Heads v, Heads o, const float* lse, Heads dout, HeadsOut dq, HeadsOut dk,
                        HeadsOut dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale,
                        bool causal, int64_t window, const int64_t* doc, int threads);
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
