// Picks the kernel table for this CPU once, from its features. Compiled with baseline flags only.
#include <stdlib.h>

#include "dispatch.h"

namespace pyllm {
namespace cpu {

namespace {

struct Features {
  bool avx2 = false, avx512 = false;
};

Features detect() {
  Features f;
#if defined(PYLLM_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
  return f;
}

bool supported(const std::string& isa) {
  for (const auto& s : supported_isas()) {
    if (s == isa) return true;
  }
  return false;
}

KernelTable make_table(const std::string& isa) {
#if defined(PYLLM_HAVE_X86_KERNELS)
  if (isa == "avx512") return avx512::make_table();
  if (isa == "avx2") return avx2::make_table();
#endif
  return base::make_table();
}

// The best supported instruction set, or PYLLM_CPU_ISA's when this CPU supports it (how an AVX2-only
// machine's numerics and speed are reproduced on a newer one; the Python cpu backend refuses a value that
// was not honoured, naming it).
KernelTable& active() {
  static KernelTable table = [] {
    const char* wanted = getenv("PYLLM_CPU_ISA");
    return make_table(wanted && supported(wanted) ? std::string(wanted) : supported_isas().back());
  }();
  return table;
}

}  // namespace

const KernelTable& kernels() { return active(); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> isas{"base"};
  const Features f = detect();
  if (f.avx2) isas.push_back("avx2");
  if (f.avx512) isas.push_back("avx512");
  return isas;
}

std::string vendor() {
#if defined(PYLLM_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

bool select_isa(const std::string& isa) {
  if (!supported(isa)) return false;
  active() = make_table(isa);
  return true;
}

}  // namespace cpu
}  // namespace pyllm
