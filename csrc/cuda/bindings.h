// Python bindings of the CUDA launchers (launch.h), shared by pyllm._C (bindings.cpp) and the CUDA
// emulator's module (tests/csrc/cuda_emulator), so both expose exactly the same functions.
#pragma once
#include <pybind11/pybind11.h>

#include "cuda/launch.h"

namespace pyllm {
namespace cuda {

// The launchers already take plain integers; bind them by name, releasing the GIL while they enqueue.
inline void bind_cuda(pybind11::module_& m) {
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("cuda_norm_fwd", &norm_fwd, no_gil);
  m.def("cuda_norm_bwd_workspace", &norm_bwd_workspace);
  m.def("cuda_norm_bwd", &norm_bwd, no_gil);
  m.def("cuda_bias_gelu_fwd", &bias_gelu_fwd, no_gil);
  m.def("cuda_bias_gelu_bwd_workspace", &bias_gelu_bwd_workspace);
  m.def("cuda_bias_gelu_bwd", &bias_gelu_bwd, no_gil);
  m.def("cuda_swiglu_fwd", &swiglu_fwd, no_gil);
  m.def("cuda_swiglu_bwd", &swiglu_bwd, no_gil);
  m.def("cuda_cross_entropy_fwd", &cross_entropy_fwd, no_gil);
  m.def("cuda_cross_entropy_bwd", &cross_entropy_bwd, no_gil);
  m.def("cuda_unscale_check", &unscale_check, no_gil);
  m.def("cuda_adamw", &adamw, no_gil);
  m.def("cuda_gemm", &gemm, no_gil);
  m.def("cuda_attention_fwd", &attention_fwd, no_gil);
  m.def("cuda_attention_bwd_workspace", &attention_bwd_workspace);
  m.def("cuda_attention_bwd", &attention_bwd, no_gil);
  m.attr("has_cuda") = true;
}

}  // namespace cuda
}  // namespace pyllm
