// Asynchronous global -> shared copies (cp.async, sm_80+) for the multi-stage pipelines of gemm.cu and
// attention.cu: a copy of 16 bytes that is zero-filled when `pred` is false (out-of-range tile edges).
// Every asm statement clobbers "memory": without it the compiler may move ordinary shared-memory loads
// and stores across the copy, commit or wait (only the __syncthreads() after a wait fenced them).
#pragma once
#include <cuda_runtime.h>

namespace pyllm {
namespace cuda {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace cuda
}  // namespace pyllm
