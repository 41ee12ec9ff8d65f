// dtype codes shared by the bindings and the Python wrappers (pyllm/ops/cuda_backend.py: _DTYPE_CODES).
#pragma once

namespace pyllm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace pyllm
