// Picks the kernel table for this CPU once, from its features. Compiled with baseline flags only.
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

KernelTable& active() {
  static KernelTable table = [] {
#if defined(PYLLM_HAVE_X86_KERNELS)
    const Features f = detect();
    return f.avx512 ? avx512::make_table() : f.avx2 ? avx2::make_table() : base::make_table();
#else
    return base::make_table();
#endif
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
  bool ok = false;
  for (const auto& s : supported_isas()) ok = ok || s == isa;
  if (!ok) return false;
#if defined(PYLLM_HAVE_X86_KERNELS)
  if (isa == "avx512") active() = avx512::make_table();
  if (isa == "avx2") active() = avx2::make_table();
#endif
  if (isa == "base") active() = base::make_table();
  return true;
}

}  // namespace cpu
}  // namespace pyllm
