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

Limits: logits in fp16/bf16/fp32. Targets must lie in [0, V) or equal ignore_index. Raising for
another one from here would need a host sync in every step, so the kernel flags its row with a nan loss
instead (as the cuda backend's kernel; torch's own CUDA cross_entropy asserts on the device) and reads no
logit for it; on CPU tensors (the interpreter) pyllm.ops refuses such targets with a ValueError first.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch, matmul


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
    lse = tl.where(m == float("inf"), m, m + tl.log(s))  # a +inf logit: lse +inf, as logsumexp (not nan)
    t = tl.load(TGT + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(x_row + tl.where(valid & in_range, t, 0).to(tl.int64)).to(tl.float32)
    loss = lse - x_t
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)  # not 0 * inf when lse is +inf
    loss = tl.where(in_range, loss, float("nan"))  # a target outside [0, V): flagged, see Limits above
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



def cross_entropy_fwd(x2, target, ignore_index: int, label_smoothing: float, z_loss: float, loss=None, lse=None):
    """x2 (M, V), target (M,) contiguous -> (loss per row (M,) fp32, lse (M,) fp32), optionally into given
    buffers."""
    M, V = x2.shape
    loss = loss if loss is not None else torch.empty(M, device=x2.device, dtype=torch.float32)
    lse = lse if lse is not None else torch.empty(M, device=x2.device, dtype=torch.float32)
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
    return x2.new_empty(x2.shape)  # row-major, as cross_entropy_bwd allocates it


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
    x2 = launch.rows(logits)
    t = target.reshape(-1).contiguous()  # the kernels index targets as a flat array (a label column is strided)
    loss_rows, _ = _ce_op(x2, t, ignore_index, float(label_smoothing), float(z_loss))
    return _reduce(loss_rows, t, ignore_index, reduction)


# ------------------------------------------------------------------------------ linear + cross-entropy


def _chunk_rows(M: int, V: int, H: int) -> int:
    """Rows per chunk: a chunk's logits (C, V) about the size of the hidden states (M, H)."""
    return max(1, min(M, triton.next_power_of_2(triton.cdiv(M, triton.cdiv(V, H)))))


def _linear_ce_pass(h2, weight, target, bias, ignore_index, label_smoothing, z_loss, g_rows):
    """One sweep over row chunks. Returns (loss per row (M,) fp32, dh, dW fp32, db fp32); the gradients
    (for per-row upstream gradients ``g_rows``) only when g_rows is given, else empty tensors."""
    M, H = h2.shape
    V = weight.shape[0]
    loss = torch.empty(M, device=h2.device, dtype=torch.float32)
    lse = torch.empty(M, device=h2.device, dtype=torch.float32)
    grads = g_rows is not None
    # dh row-major whatever h2's strides (empty_like would copy a column-major h2's, and _scale_cast_op reads
    # its input as one flat array); distinct empties: custom-op outputs never alias
    dh = h2.new_empty(h2.shape) if grads else h2.new_empty(0)
    dw = torch.zeros((V, H), device=h2.device, dtype=torch.float32) if grads else h2.new_empty(0, dtype=torch.float32)
    db = torch.zeros(V, device=h2.device, dtype=torch.float32) if grads and bias is not None else \
        h2.new_empty(0, dtype=torch.float32)
    C = _chunk_rows(M, V, H)
    logits_buf = torch.empty((C, V), device=h2.device, dtype=h2.dtype)
    for s in range(0, M, C):
        e = min(M, s + C)
        logits = logits_buf[: e - s]
        matmul.matmul_into(logits, h2[s:e], weight.t(), bias)  # (C, H) @ (H, V) + b
        cross_entropy_fwd(logits, target[s:e], ignore_index, label_smoothing, z_loss, loss[s:e], lse[s:e])
        if grads:
            # dlogits overwrite the logits in place; then dh = dlogits W, dW += dlogits^T h (fp32)
            cross_entropy_bwd(logits, target[s:e], lse[s:e], g_rows[s:e], ignore_index, label_smoothing, z_loss,
                              out=logits)
            matmul.matmul_into(dh[s:e], logits, weight)
            matmul.matmul_into(dw, logits.t(), h2[s:e], accumulate=True)
            if bias is not None:
                db += logits.sum(0, dtype=torch.float32)
    return loss, dh, dw, db


@triton.jit
def _scale_cast_kernel(X, G, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * tl.load(G)).to(Y.dtype.element_ty), mask=offs < n)


@torch.library.custom_op("pyllm::scale_cast_triton", mutates_args=())
def _scale_cast_op(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(x * g) in ``dtype``, g a 1-element device tensor: one pass, and no second fp32 copy of the
    (V, H) weight gradient at the peak of the backward."""
    y = torch.empty(x.shape, device=x.device, dtype=dtype)
    x = x.contiguous()  # the kernel reads x as one flat array, in y's (row-major) order
    n = x.numel()
    if n:
        block = 1024 if launch.INTERPRET else 4096
        _scale_cast_kernel[(triton.cdiv(n, block),)](x, g, y, n, BLOCK=block, num_warps=1 if launch.INTERPRET else 8)
    return y


@_scale_cast_op.register_fake
def _(x, g, dtype):
    return torch.empty(x.shape, device=x.device, dtype=dtype)


def _unit_grad_rows(target, ignore_index, reduction):
    """d(reduced loss)/d(row loss) for a unit upstream gradient, on the device (no sync)."""
    if reduction == "sum":
        return torch.ones(target.shape[0], device=target.device, dtype=torch.float32)
    valid = (target != ignore_index).float()
    return valid / valid.sum().clamp(min=1)


@torch.library.custom_op("pyllm::linear_cross_entropy_triton", mutates_args=())
def _linear_ce_op(h2: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor],
                  ignore_index: int, label_smoothing: float, z_loss: float, reduction: str, need_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # "mean"/"sum" with gradients: computed now at unit scale, scaled by the upstream gradient later.
    precompute = need_grad and reduction != "none"
    g_rows = _unit_grad_rows(target, ignore_index, reduction) if precompute else None
    loss, dh, dw, db = _linear_ce_pass(h2, weight, target, bias, ignore_index, label_smoothing, z_loss, g_rows)
    return _reduce(loss, target, ignore_index, reduction), dh, dw, db


@_linear_ce_op.register_fake
def _(h2, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction, need_grad):
    M, H = h2.shape
    V = weight.shape[0]
    pre = need_grad and reduction != "none"
    loss = h2.new_empty(M if reduction == "none" else (), dtype=torch.float32)
    return (loss, h2.new_empty((M, H) if pre else 0), h2.new_empty((V, H) if pre else 0, dtype=torch.float32),
            h2.new_empty(V if pre and bias is not None else 0, dtype=torch.float32))


def _linear_ce_setup(ctx, inputs, output):
    h2, weight, target, bias, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss, ctx.reduction, _ = inputs
    ctx.has_bias = bias is not None
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.save_for_backward(h2, weight, target, bias, dh, dw, db)


def _linear_ce_backward(ctx, dloss, _ddh, _ddw, _ddb):
    if torch.is_grad_enabled():  # create_graph: the gradients below are kernel outputs, with no graph to the inputs
        raise RuntimeError("pyllm::linear_cross_entropy_triton: the backward of this kernel is not differentiable "
                           "(no double backward: create_graph=True then another grad); use backend=\"torch\" for "
                           "higher-order gradients")
    h2, weight, target, bias, dh, dw, db = ctx.saved_tensors
    if ctx.reduction == "none":  # per-row upstream gradients: recompute the chunks with them
        _, dh, dw, db = _linear_ce_pass(h2, weight, target, bias, ctx.ignore_index, ctx.label_smoothing,
                                        ctx.z_loss, dloss.float().contiguous())
    else:  # unit-scale gradients times the upstream scalar, read on the device
        g = dloss.float().reshape(1)
        dh, dw, db = (_scale_cast_op(t, g, dt) for t, dt in ((dh, h2.dtype), (dw, weight.dtype), (db, weight.dtype)))
    dbias = db.to(bias.dtype) if ctx.has_bias else None
    return dh.to(h2.dtype), dw.to(weight.dtype), None, dbias, None, None, None, None, None


_linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         reduction="mean"):
    """cross_entropy(hidden @ weight^T + bias, target) without materialising the logits."""
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    t = target.reshape(-1).contiguous()  # as in cross_entropy
    need_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    loss, _, _, _ = _linear_ce_op(h2, weight, t, bias, ignore_index, float(label_smoothing), float(z_loss), reduction,
                                  need_grad)
    return loss
