// Rotary position embedding (Su et al. 2021), "rotate half" layout as in HF Llama: with x = [x1 | x2]
// (halves of the head dim), y = [x1 c - x2 s | x2 c + x1 s]. The backward is the rotation by -theta.
// Reads q/k through their strides (they arrive as views of the fused qkv projection) and writes a
// contiguous result, so the transpose-copy the attention needs anyway happens here for free. x and y may
// be bfloat16 (cos and sin are float32).
#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

void rope(Src x, const int64_t* xs, const float* cos, const float* sin, int64_t cs_batch_stride, Dst y, int64_t B,
          int64_t H, int64_t T, int64_t D, bool inverse, int threads) {
  const int64_t half = D / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  for_each_row(B * H * T, D, threads, is_bf16(x) || is_bf16(y), 2, [&](int64_t row, const RowBuffers& buf) {
    const int64_t t = row % T;
    const int64_t h = (row / T) % H;
    const int64_t b = row / (T * H);
    const float* xr = src_row(x, b * xs[0] + h * xs[1] + t * xs[2], D, buf[0]);
    const float* c = cos + b * cs_batch_stride + t * half;
    const float* s = sin + b * cs_batch_stride + t * half;
    float* yr = dst_row(y, row * D, buf[1]);
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = xr[i], x2 = xr[i + half];
      const float si = sign * s[i];
      yr[i] = x1 * c[i] - x2 * si;
      yr[i + half] = x2 * c[i] + x1 * si;
    }
    dst_commit(y, row * D, yr, D);
  });
}

PYLLM_CPU_NS_END
