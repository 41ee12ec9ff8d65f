// This instruction set's kernel table (compiled once per ISA like the kernels it points to).
#include "kernels.h"
#include "vec_math.h"

PYLLM_CPU_NS_BEGIN

void norm_fwd(Src, Src, Src, Src, Dst, Dst, float*, float*, int64_t, int64_t, float, bool, int);
void norm_bwd(Src, Src, Src, const float*, const float*, Src, Dst, Dst, Dst, int64_t, int64_t, bool, int);
void bias_gelu_fwd(Src, Src, Dst, int64_t, int64_t, bool, int);
void bias_gelu_bwd(Src, Src, Src, Dst, Dst, int64_t, int64_t, bool, int);
void swiglu_fwd(Src, Src, Dst, int64_t, int64_t, int64_t, int64_t, int);
void swiglu_bwd(Src, Src, Src, Dst, Dst, int64_t, int64_t, int64_t, int64_t, int64_t, int);
void softmax_fwd(Src, Dst, int64_t, int64_t, int);
void softmax_bwd(Src, Src, Dst, int64_t, int64_t, int);
void cross_entropy_fwd(Src, const int64_t*, float*, float*, int64_t, int64_t, int64_t, float, float, int);
void cross_entropy_bwd(Src, const int64_t*, const float*, Src, int64_t, Dst, int64_t, int64_t, int64_t, float, float,
                       int);
void rope(Src, const int64_t*, const float*, const float*, int64_t, Dst, int64_t, int64_t, int64_t, int64_t, bool, int);
void adamw(float* const*, float* const*, const float* const*, float* const*, float* const*, const int64_t*, int64_t,
           float, float, float, float, float, float, float, int);
bool unscale_check(float* const*, const int64_t*, int64_t, float, int);
void transpose(const float*, int64_t, float*, int64_t, int64_t, int64_t, int);
void attention_fwd(Heads, Heads, Heads, HeadsOut, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                   bool, int64_t, const int64_t*, int);
void attention_bwd(Heads, Heads, Heads, Heads, const float*, Heads, HeadsOut, HeadsOut, HeadsOut, int64_t, int64_t,
                   int64_t, int64_t, int64_t, int64_t, float, bool, int64_t, const int64_t*, int);

#define PYLLM_STR2(x) #x
#define PYLLM_STR(x) PYLLM_STR2(x)

KernelTable make_table() {
  return KernelTable{PYLLM_STR(PYLLM_ISA), norm_fwd,    norm_bwd,    bias_gelu_fwd,     bias_gelu_bwd,
                     swiglu_fwd,           swiglu_bwd,  softmax_fwd, softmax_bwd,       cross_entropy_fwd,
                     cross_entropy_bwd,    rope,        adamw,       unscale_check,     transpose,
                     attention_fwd,        attention_bwd};
}

PYLLM_CPU_NS_END
