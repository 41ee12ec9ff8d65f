// Picks the kernel table for this CPU once. Compiled with baseline flags only.
#include "kernels.h"

namespace pyllm {
namespace cpu {

namespace {

bool has_avx2_fma() {
#if defined(PYLLM_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

const KernelTable& kernels() {
#if defined(PYLLM_HAVE_AVX2_KERNELS)
  static const KernelTable table = has_avx2_fma() ? avx2::make_table() : base::make_table();
#else
  static const KernelTable table = base::make_table();
#endif
  return table;
}

}  // namespace cpu
}  // namespace pyllm
