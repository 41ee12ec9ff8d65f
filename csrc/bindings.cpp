// pybind11 module pyllm._C. Every binding takes raw addresses (tensor.data_ptr(), 0 for "none"), sizes,
// dtype codes and, for CUDA, a stream: the extension never links libtorch, so one build works with any
// torch version. The Python wrappers (pyllm/ops/cpu_backend.py, cuda_backend.py) validate dtypes,
// devices, contiguity, alignment and 32-bit index limits before calling in here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/dispatch.h"
#ifdef PYLLM_WITH_CUDA
#include "cuda/bindings.h"
#endif

namespace py = pybind11;
using pyllm::cpu::kernels;

namespace {

template <class T>
T* P(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

using Addr = uintptr_t;
const auto kNoGil = py::call_guard<py::gil_scoped_release>();

// A tensor of the CPU row kernels: (address, dtype code of csrc/common/dtype.h), float32 or bfloat16.
using Arg = std::pair<Addr, int>;

pyllm::DType cpu_dtype(int code) {
  const auto t = static_cast<pyllm::DType>(code);
  if (t != pyllm::DType::kFloat32 && t != pyllm::DType::kBFloat16) {
    throw std::invalid_argument("pyllm._C: the CPU kernels take float32 (0) or bfloat16 (2), got dtype code " +
                                std::to_string(code));
  }
  return t;
}
pyllm::cpu::Src In(const Arg& a) { return {reinterpret_cast<const void*>(a.first), cpu_dtype(a.second)}; }
pyllm::cpu::Dst Out(const Arg& a) { return {reinterpret_cast<void*>(a.first), cpu_dtype(a.second)}; }

// A (B, H, L, D) tensor of the CPU attention kernels: (address, dtype code, batch, head and row strides).
using HeadsArg = std::tuple<Addr, int, int64_t, int64_t, int64_t>;

pyllm::cpu::Heads In(const HeadsArg& a) {
  return {reinterpret_cast<const void*>(std::get<0>(a)), cpu_dtype(std::get<1>(a)), std::get<2>(a), std::get<3>(a),
          std::get<4>(a)};
}
pyllm::cpu::HeadsOut Out(const HeadsArg& a) {
  return {reinterpret_cast<void*>(std::get<0>(a)), cpu_dtype(std::get<1>(a)), std::get<2>(a), std::get<3>(a),
          std::get<4>(a)};
}

void bind_cpu(py::module_& m) {
  m.def("cpu_isa", [] { return kernels().isa; }, "Instruction set of the CPU kernels in use.");
  m.def("cpu_supported_isas", &pyllm::cpu::supported_isas, "Instruction sets this CPU can run.");
  m.def("cpu_vendor", &pyllm::cpu::vendor, "Whose CPU this is: intel, amd or other.");
  m.def("cpu_select_isa", &pyllm::cpu::select_isa, "Use another supported instruction set (for tests).");
  m.def(
      "cpu_norm_fwd",
      [](Arg x, Arg res, Arg w, Arg b, Arg y, Arg h, Addr mean, Addr rstd, int64_t rows, int64_t n, float eps,
         bool rms, int threads) {
        kernels().norm_fwd(In(x), In(res), In(w), In(b), Out(y), Out(h), P<float>(mean), P<float>(rstd), rows, n, eps,
                           rms, threads);
      },
      kNoGil);
  m.def(
      "cpu_norm_bwd",
      [](Arg dy, Arg h, Arg w, Addr mean, Addr rstd, Arg dh_extra, Arg dx, Arg dw, Arg db, int64_t rows, int64_t n,
         bool rms, int threads) {
        kernels().norm_bwd(In(dy), In(h), In(w), P<const float>(mean), P<const float>(rstd), In(dh_extra), Out(dx),
                           Out(dw), Out(db), rows, n, rms, threads);
      },
      kNoGil);
  m.def(
      "cpu_bias_gelu_fwd",
      [](Arg x, Arg b, Arg y, int64_t rows, int64_t n, bool tanh_approx, int threads) {
        kernels().bias_gelu_fwd(In(x), In(b), Out(y), rows, n, tanh_approx, threads);
      },
      kNoGil);
  m.def(
      "cpu_bias_gelu_bwd",
      [](Arg dy, Arg x, Arg b, Arg dx, Arg db, int64_t rows, int64_t n, bool tanh_approx, int threads) {
        kernels().bias_gelu_bwd(In(dy), In(x), In(b), Out(dx), Out(db), rows, n, tanh_approx, threads);
      },
      kNoGil);
  m.def(
      "cpu_swiglu_fwd",
      [](Arg gate, Arg up, Arg y, int64_t rows, int64_t n, int64_t gs, int64_t us, int threads) {
        kernels().swiglu_fwd(In(gate), In(up), Out(y), rows, n, gs, us, threads);
      },
      kNoGil);
  m.def(
      "cpu_swiglu_bwd",
      [](Arg dy, Arg gate, Arg up, Arg dgate, Arg dup, int64_t rows, int64_t n, int64_t gs, int64_t us,
         int64_t grad_stride, int threads) {
        kernels().swiglu_bwd(In(dy), In(gate), In(up), Out(dgate), Out(dup), rows, n, gs, us, grad_stride, threads);
      },
      kNoGil);
  m.def(
      "cpu_softmax_fwd",
      [](Arg x, Arg y, int64_t rows, int64_t n, int threads) {
        kernels().softmax_fwd(In(x), Out(y), rows, n, threads);
      },
      kNoGil);
  m.def(
      "cpu_softmax_bwd",
      [](Arg dy, Arg y, Arg dx, int64_t rows, int64_t n, int threads) {
        kernels().softmax_bwd(In(dy), In(y), Out(dx), rows, n, threads);
      },
      kNoGil);
  m.def(
      "cpu_cross_entropy_fwd",
      [](Arg logits, Addr target, Addr loss, Addr lse, int64_t rows, int64_t vocab, int64_t ignore_index,
         float smoothing, float z_loss, int threads) {
        kernels().cross_entropy_fwd(In(logits), P<const int64_t>(target), P<float>(loss), P<float>(lse), rows, vocab,
                                    ignore_index, smoothing, z_loss, threads);
      },
      kNoGil);
  m.def(
      "cpu_cross_entropy_bwd",
      [](Arg logits, Addr target, Addr lse, Arg grad, int64_t grad_stride, Arg dlogits, int64_t rows, int64_t vocab,
         int64_t ignore_index, float smoothing, float z_loss, int threads) {
        kernels().cross_entropy_bwd(In(logits), P<const int64_t>(target), P<const float>(lse), In(grad), grad_stride,
                                    Out(dlogits), rows, vocab, ignore_index, smoothing, z_loss, threads);
      },
      kNoGil);
  m.def(
      "cpu_rope",
      [](Arg x, int64_t s0, int64_t s1, int64_t s2, Addr cos, Addr sin, int64_t cs_batch_stride, Arg y, int64_t B,
         int64_t H, int64_t T, int64_t D, bool inverse, int threads) {
        const int64_t strides[4] = {s0, s1, s2, 1};
        kernels().rope(In(x), strides, P<const float>(cos), P<const float>(sin), cs_batch_stride, Out(y), B, H, T, D,
                       inverse, threads);
      },
      kNoGil);
  m.def(
      "cpu_adamw",
      [](Addr params, Addr master, Addr grads, Addr exp_avgs, Addr exp_avg_sqs, Addr sizes, int64_t n_tensors,
         float lr, float beta1, float beta2, float eps, float wd, float bc1, float bc2, int threads) {
        kernels().adamw(P<float* const>(params), P<float* const>(master), P<const float* const>(grads),
                        P<float* const>(exp_avgs), P<float* const>(exp_avg_sqs), P<const int64_t>(sizes), n_tensors,
                        lr, beta1, beta2, eps, wd, bc1, bc2, threads);
      },
      kNoGil);
  m.def(
      "cpu_transpose",
      [](Addr src, int64_t ld_src, Addr dst, int64_t ld_dst, int64_t rows, int64_t cols, int threads) {
        kernels().transpose(P<const float>(src), ld_src, P<float>(dst), ld_dst, rows, cols, threads);
      },
      kNoGil);
  m.def(
      "cpu_unscale_check",
      [](Addr grads, Addr sizes, int64_t n_tensors, float inv_scale, int threads) {
        return kernels().unscale_check(P<float* const>(grads), P<const int64_t>(sizes), n_tensors, inv_scale,
                                       threads);
      },
      kNoGil);
  m.def(
      "cpu_attention_fwd",
      [](const HeadsArg& q, const HeadsArg& k, const HeadsArg& v, const HeadsArg& o, Addr lse, int64_t B, int64_t Hq,
         int64_t Hkv, int64_t T, int64_t S, int64_t D, float scale, bool causal, int64_t window, Addr doc,
         int threads) {
        kernels().attention_fwd(In(q), In(k), In(v), Out(o), P<float>(lse), B, Hq, Hkv, T, S, D, scale, causal,
                                window, P<const int64_t>(doc), threads);
      },
      kNoGil);
  m.def(
      "cpu_attention_bwd",
      [](const HeadsArg& q, const HeadsArg& k, const HeadsArg& v, const HeadsArg& o, Addr lse, const HeadsArg& dout,
         const HeadsArg& dq, const HeadsArg& dk, const HeadsArg& dv, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
         int64_t S, int64_t D, float scale, bool causal, int64_t window, Addr doc, int threads) {
        kernels().attention_bwd(In(q), In(k), In(v), In(o), P<const float>(lse), In(dout), Out(dq), Out(dk), Out(dv), B,
                                Hq, Hkv, T, S, D, scale, causal, window, P<const int64_t>(doc), threads);
      },
      kNoGil);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllm C++/CUDA kernels (raw-pointer interface; use pyllm.ops, not this module directly)";
  bind_cpu(m);
#ifdef PYLLM_WITH_CUDA
  pyllm::cuda::bind_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
