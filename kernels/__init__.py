"""pyllm.kernels: the Triton kernels, one op per file, registered as the "triton" backend of pyllm.ops
(pyllm/ops/triton_backend.py). Each file: design note -> @triton.jit kernels -> launchers -> the
torch.library custom ops (forward, backward, fake implementations, autograd) that torch.compile traces.

    attention.py      FlashAttention-2 forward/backward (causal, GQA, decode alignment, packed docs, window)
    layernorm.py      LayerNorm and RMSNorm with fused residual add
    gelu.py           bias + GELU (tanh, exact) and SwiGLU
    rope.py           rotary embedding of q and k in one launch
    softmax.py        row softmax (single block or online two-sweep)
    matmul.py         tiled matmul with grouped ordering, autotune, epilogues, persistent launch; linear
    cross_entropy.py  large-vocabulary cross-entropy and chunked linear + cross-entropy
    loss_scale.py     one-launch multi-tensor unscale + found-inf, device-side scale update
    adamw.py          fused multi-tensor AdamW (optional fp32 master weights)

Shared: launch.py (where kernels may run, autotune spaces, grid sizing), multi_tensor.py (chunk
tables of pointers for the multi-tensor kernels). tests/kernels/sm90_compile.py compiles every
kernel for Hopper without a GPU. Nothing here is imported by ``import pyllm``.
"""
