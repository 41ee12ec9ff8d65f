// Picks the kernel table for this CPU once, from its features. Compiled with baseline flags only.
#include "kernels.h"

namespace pyllm {
namespace cpu {

const KernelTable& kernels() {
#if defined(PYLLM_HAVE_X86_KERNELS)
  static const KernelTable table = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return avx512 ? avx512::make_table() : avx2 ? avx2::make_table() : base::make_table();
  }();
#else
  static const KernelTable table = base::make_table();
#endif
  return table;
}

}  // namespace cpu
}  // namespace pyllm
