// The CUDA emulator's Python module: csrc/cuda's launchers, compiled as host C++ over emu.h, bound exactly
// as pyllm._C binds them (csrc/cuda/bindings.h).
#include <pybind11/pybind11.h>

#include "cuda/bindings.h"
#include "emu.h"

// emu.h's context switch: push the callee-saved registers, MXCSR and the x87 control word; swap stacks.
static_assert(sizeof(void*) == 8, "the emulator's context switch is written for x86-64");
asm(R"(
  .text
  .globl emu_switch_context
  .type emu_switch_context, @function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context, .-emu_switch_context
)");

PYBIND11_MODULE(_cuda_emulated, m) {
  m.doc() = "csrc/cuda's kernels run on the CPU by the emulator in tests/csrc/cuda_emulator (a test tool)";
  pyllm::cuda::bind_cuda(m);
  m.def("set_shared_memory_optin", [](int bytes) { return emu::optin_bytes.exchange(bytes); },
        "set the emulated GPU's per-block shared-memory limit (cudaDevAttrMaxSharedMemoryPerBlockOptin); "
        "returns the previous one");
}
