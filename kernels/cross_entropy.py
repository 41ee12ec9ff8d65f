"""Softmax cross-entropy over large vocabularies, and linear + cross-entropy fused in row chunks.

Cross-entropy. One program per row sweeps the vocabulary in BLOCK_V chunks keeping an online
max/sum (Milakov & Gimelshein 2018), so any vocabulary size works (128k and beyond) with registers
for one chunk; it saves lse = logsumexp(x) per row (fp32). Per row, with eps the label smoothing and
z the z-loss weight (PaLM, Chowdhery et al. 2022):
    loss = (1 - eps) (lse - x_t) + eps (lse - mean(x)) + z lse^2          (0 if t == ignore_index)
    dloss/dx = p (1 + 2 z lse) - (1 - eps) onehot(t) - eps / V,  p = exp(x - lse)
The kernel returns per-row losses; the reduction ("mean" over non-ignored rows, "sum", "none") is a
few torch ops on an (M,) vector, and its gradient reaches the backward kernel as one fp32 scale per
row, so the three reductions share one kernel. Traffic: forward reads the logits once, backward
reads them once and writes the gradient once.

Linear + cross-entropy (the LM head). The full (M, V) logits never exist: rows are processed in
chunks of C (sized so a chunk's logits are about as large as the hidden states, as in Liger-Kernel).
For each chunk: logits = h W^T (+ b) in the input dtype; the forward kernel gives loss and lse; the
backward kernel overwrites the chunk's logits with dlogits in place; dh = dlogits W and
dW += dlogits^T h, accumulated into an fp32 buffer by the Triton matmul's ACCUMULATE epilogue (bf16
accumulation across chunks is known to diverge). With "mean"/"sum" the upstream gradient is a scalar,
so gradients are computed during the forward with unit scale and multiplied by it in the backward
(one pass over W and h instead of two); with "none" the backward recomputes the chunks with the
per-row upstream gradients.

Limits: targets must lie in [0, V) or equal ignore_index (not checked on the device: checking would
need a host sync); logits in fp16/bf16/fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch


@triton.jit
def _cross_entropy_fwd_kernel(X, TGT, LOSS, LSE, stride_x, V, ignore_index, label_smoothing, z_loss,
                              HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")  # running max (a scalar: one exp per element)
    s = 0.0  # running sum of exp(x - m)
    sum_x = 0.0
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: keep s = 0, no nan
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(s)
    t = tl.load(TGT + row)
    valid = t != ignore_index
    x_t = tl.load(x_row + tl.where(valid, t, 0).to(tl.int64)).to(tl.float32)
    loss = lse - x_t
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    loss += z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(X, TGT, LSE, G, DX, stride_x, stride_dx, V, ignore_index, label_smoothing,
                              z_loss, BLOCK_V: tl.constexpr):
    # DX may be X itself (the fused linear + CE overwrites its logits chunk): each element is read
    # before it is written by the same program.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(TGT + row)
    g = tl.where(t != ignore_index, tl.load(G + row), 0.0)
    lse = tl.load(LSE + row)
    p_scale = g * (1.0 + 2.0 * z_loss * lse)
    uniform = g * label_smoothing / V
    hit = g * (1.0 - label_smoothing)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(X + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        dx = tl.exp(x - lse) * p_scale - uniform - tl.where(c == t, hit, 0.0)
        tl.store(DX + row * stride_dx + c, dx.to(DX.dtype.element_ty), mask=mask)


def unsupported_reason(logits: torch.Tensor) -> str | None:
    if logits.dtype == torch.float64:
        return "float64 is not supported by the Triton cross-entropy"
    return None


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 8k-element chunks with 16 warps on a GPU (16 bytes in flight per
    thread per load for bf16), small chunks in the interpreter."""
    if launch.INTERPRET:
        return min(1024, triton.next_power_of_2(V)), 1
    block = min(8192, triton.next_power_of_2(V))
    return block, max(1, min(16, block // 512))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def cross_entropy_fwd(x2, target, ignore_index: int, label_smoothing: float, z_loss: float):
    """x2 (M, V), target (M,) -> (loss per row (M,) fp32, lse (M,) fp32)."""
    M, V = x2.shape
    loss = torch.empty(M, device=x2.device, dtype=torch.float32)
    lse = torch.empty(M, device=x2.device, dtype=torch.float32)
    BLOCK_V, warps = _block_v(V)
    if M:
        _cross_entropy_fwd_kernel[(M,)](x2, target, loss, lse, x2.stride(0), V, ignore_index, label_smoothing,
                                        z_loss, HAS_SMOOTHING=label_smoothing > 0, BLOCK_V=BLOCK_V,
                                        num_warps=warps)
    return loss, lse


def cross_entropy_bwd(x2, target, lse, g_rows, ignore_index: int, label_smoothing: float, z_loss: float,
                      out: torch.Tensor | None = None):
    """dloss/dx2 with per-row upstream gradients g_rows (M,) fp32; written into ``out`` (may be x2)."""
    M, V = x2.shape
    dx = out if out is not None else torch.empty((M, V), device=x2.device, dtype=x2.dtype)
    BLOCK_V, warps = _block_v(V)
    if M:
        _cross_entropy_bwd_kernel[(M,)](x2, target, lse, g_rows, dx, x2.stride(0), dx.stride(0), V, ignore_index,
                                        label_smoothing, z_loss, BLOCK_V=BLOCK_V, num_warps=warps)
    return dx


def _reduce(loss_rows, target, ignore_index, reduction):
    """The reduction of reference.cross_entropy, on the per-row losses (differentiable torch ops)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (target != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------- cross-entropy (custom ops)


@torch.library.custom_op("pyllm::cross_entropy_triton", mutates_args=())
def _ce_op(x2: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_entropy_fwd(x2, target, ignore_index, label_smoothing, z_loss)


@_ce_op.register_fake
def _(x2, target, ignore_index, label_smoothing, z_loss):
    return x2.new_empty(x2.shape[0], dtype=torch.float32), x2.new_empty(x2.shape[0], dtype=torch.float32)


@torch.library.custom_op("pyllm::cross_entropy_triton_bwd", mutates_args=())
def _ce_bwd_op(x2: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g_rows: torch.Tensor,
               ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    return cross_entropy_bwd(x2, target, lse, g_rows, ignore_index, label_smoothing, z_loss)


@_ce_bwd_op.register_fake
def _(x2, target, lse, g_rows, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(x2)


def _ce_setup(ctx, inputs, output):
    x2, target, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = inputs
    ctx.save_for_backward(x2, target, output[1])


def _ce_backward(ctx, dloss, _dlse):
    x2, target, lse = ctx.saved_tensors
    g = dloss.float().contiguous()
    return _ce_bwd_op(x2, target, lse, g, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss), None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Cross-entropy of logits (..., V) against target (...); same result as reference.cross_entropy."""
    x2 = _rows(logits)
    t = target.reshape(-1)
    loss_rows, _ = _ce_op(x2, t, ignore_index, float(label_smoothing), float(z_loss))
    return _reduce(loss_rows, t, ignore_index, reduction)
