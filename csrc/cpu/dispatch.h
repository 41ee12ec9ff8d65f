// Instruction-set selection (dispatch.cpp). Kept out of kernels.h, which the per-ISA kernel sources
// include: they must not pull in standard-library templates that could be emitted with ISA flags.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace pyllm {
namespace cpu {

// The instruction sets this machine can run ("base", then "avx2", "avx512" as supported).
std::vector<std::string> supported_isas();
// "intel", "amd" or "other": whose CPU this is (pyllm.ops.cpu_backend picks its GEMM library by it).
std::string vendor();
// Use one of them for every later call (false if unsupported): lets the tests run each variant the
// test machine can execute. Not safe while kernels run on other threads; meant for tests.
bool select_isa(const std::string& isa);

}  // namespace cpu
}  // namespace pyllm
