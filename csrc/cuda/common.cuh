// Shared device helpers for csrc/cuda: dtype dispatch, conversions, 128-bit vector access, reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace pyllm {
namespace cuda {

// Dtype dispatch: run `...` with T bound to the element type of dtype code `code`. Each dtype's case is
// written once (PYLLM_DTYPE_CASE) and the two dispatchers list which cases they accept.
#define PYLLM_DTYPE_CASE(enumerator, type, T, ...) \
  case ::pyllm::DType::enumerator: {              \
    using T = type;                               \
    __VA_ARGS__;                                  \
    break;                                        \
  }
#define PYLLM_HALF_CASES(T, ...)                               \
  PYLLM_DTYPE_CASE(kFloat16, __half, T, __VA_ARGS__)           \
  PYLLM_DTYPE_CASE(kBFloat16, __nv_bfloat16, T, __VA_ARGS__)

// float, __half or __nv_bfloat16.
#define PYLLM_DISPATCH_FLOAT(code, T, ...)                                                   \
  switch (static_cast<::pyllm::DType>(code)) {                                               \
    PYLLM_DTYPE_CASE(kFloat32, float, T, __VA_ARGS__)                                        \
    PYLLM_HALF_CASES(T, __VA_ARGS__)                                                         \
    default:                                                                                 \
      throw std::invalid_argument("pyllm._C: unknown dtype code " + std::to_string(code));   \
  }

// The tensor-core kernels: __half or __nv_bfloat16 only.
#define PYLLM_DISPATCH_HALF(code, T, ...)                                                                \
  switch (static_cast<::pyllm::DType>(code)) {                                                           \
    PYLLM_HALF_CASES(T, __VA_ARGS__)                                                                     \
    default:                                                                                             \
      throw std::invalid_argument("pyllm._C: this kernel takes float16 or bfloat16, got dtype code " +   \
                                  std::to_string(code));                                                 \
  }

// Throw (-> Python RuntimeError) if the last launch failed.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("pyllm._C: ") + what + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <class T>
inline T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// W elements of T read or written as one access. W = kVecWidth<T> makes it 16 bytes, a 128-bit access
// whose address must be 16-byte aligned (the wrappers guarantee it for base pointers, the kernels pick
// that W only for widths that keep every row aligned); W = 1 is the scalar fallback.
template <class T>
constexpr int kVecWidth = 16 / sizeof(T);  // 4 floats or 8 halves

template <class T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <class T, int W>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}
template <class T, int W>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the function synchronises, so it may be reused after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Opt `kernel` in to `bytes` of dynamic shared memory (needed above 48 KB). A GPU with less (sm_86/89 allow
// 99 KB per block) gets a clear error here instead of an "invalid argument" from the launch.
template <class Kernel>
inline void allow_dynamic_smem(Kernel kernel, int bytes, const std::string& what) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not a sticky error: clear it so later launches are not blamed
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    throw std::invalid_argument("pyllm._C: " + what + " needs " + std::to_string(bytes) +
                                " bytes of shared memory per block; this GPU allows " + std::to_string(optin) +
                                " (" + cudaGetErrorString(err) + ")");
  }
}

// Sum the `parts` rows of partial[parts][n] (fp32) into out[n] (dtype T): the second stage of the
// deterministic column reductions (norm dweight/dbias, GELU dbias).
void reduce_partials(const float* partial, int64_t parts, int64_t n, int dtype, uintptr_t out, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyllm
