// The CUDA emulator's WMMA (nvcuda::wmma, 16 x 16 x 16 tiles; found before CUDA's own <mma.h> on the
// include path). Every lane holds whole A and B tiles in fp32: loads are warp-collective (a warp barrier
// on entry and exit, as a real load must be reached by all 32 lanes); an accumulator lane computes and
// stores only its share of the tile, so a kernel that reads a stored tile without a __syncwarp() reads
// garbage. Products are exact and accumulate in fp32, as the tensor cores do to within rounding. Checked:
// 256-bit aligned tile pointers, ldm a multiple of 16 bytes, tiles inside the block's shared memory.
#pragma once
#include <type_traits>

#include "emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator models 16 x 16 x 16 tiles only");
  float v[256];  // row-major tile
};

template <class F>
inline void fill_fragment(F& f, float x) {
  for (auto& e : f.v) e = x;
}

inline float as_float(float x) { return x; }
inline float as_float(__half x) { return __half2float(x); }
inline float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
inline void check_tile(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32) emu::fail(std::string(what) + ": tile pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16) emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  emu::syncwarp();
  check_tile(p, ldm, "wmma::load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  if (!emu::in_shared(p, sizeof(T)) || !emu::in_shared(p + 15 * ldm + 15, sizeof(T))) {  // first, last element
    emu::fail("wmma::load_matrix_sync: tile outside shared memory");
  } else {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = as_float(row ? p[r * ldm + c] : p[c * ldm + r]);
  }
  emu::syncwarp();
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  // A lane computes only its share of the tile, the elements it stores (store_matrix_sync): the kernels
  // never read an accumulator element other than through a store, so the other elements may stay stale.
  for (int e = emu::lane(); e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    float s = c.v[e];
    for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
    d.v[e] = s;
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  emu::syncwarp();
  check_tile(p, ldm, "wmma::store_matrix_sync");
  if (!emu::in_shared(p, sizeof(float)) || !emu::in_shared(p + 15 * ldm + 15, sizeof(float))) {
    emu::fail("wmma::store_matrix_sync: tile outside shared memory");
    return;
  }
  for (int i = emu::lane(); i < 256; i += 32) {
    const int r = i / 16, c = i % 16;
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[i];
  }
}

}  // namespace wmma
}  // namespace nvcuda
