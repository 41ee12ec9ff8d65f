// The CUDA emulator's cp.async (replaces csrc/cuda/pipeline.cuh, found first on the include path): a copy
// lands in shared memory only when a cp.async.wait_group covers its group (emu.h), so a wait that is one
// group too weak reads the garbage shared memory starts with.
#pragma once
#include "emu.h"

namespace pyllm {
namespace cuda {

inline void cp_async16(void* smem, const void* gmem, bool pred) { emu::cp_async16(smem, gmem, pred); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}

}  // namespace cuda
}  // namespace pyllm
