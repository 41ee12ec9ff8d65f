"""Device-independent pieces of the C++/CUDA backends (cpu_backend.py, cuda_backend.py): both call
``pyllm._C`` kernels with the same argument layout, so the fake (shape-only) implementations, what each
op saves for backward and how its backward is assembled are written once here; each backend keeps only
its kernel calls and input checks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def ptr(t: Optional[Tensor]) -> int:
    """The data pointer the kernels take, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def rows_and_width(x: Tensor) -> tuple[int, int]:
    n = x.shape[-1] if x.dim() else 1
    return (x.numel() // n if n else 0), n


def attention_fwd_fake(q, k, v, scale, causal):
    # (o, lse): contiguous like the real outputs (empty_like would keep the strides of a permuted q);
    # lse is fp32 whatever the input dtype
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_bwd_fake(do, q, k, v, o, lse, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention_setup(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    # the inputs as given: under torch.compile they are FakeTensors here, whose data_ptr() raises, so the
    # backward kernel wrappers make them contiguous at run time
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.causal = scale, causal


def attention_backward(ctx, bwd, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = bwd(do, q, k, v, o, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


def bias_gelu_fwd_fake(x, bias, tanh):
    # x + bias promotes (the cpu backend takes a bfloat16 x with a float32 bias; the cuda one one dtype)
    return torch.empty_like(x, dtype=x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype))


def bias_gelu_bwd_fake(dy, x, bias, tanh):
    return torch.empty_like(x), (torch.empty_like(bias) if bias is not None else x.new_empty(0))


def bias_gelu_setup(ctx, inputs, output):
    x, bias, tanh = inputs
    ctx.save_for_backward(x, bias)
    ctx.tanh = tanh


def bias_gelu_backward(ctx, bwd, dy):
    x, bias = ctx.saved_tensors
    dx, db = bwd(dy, x, bias, ctx.tanh)
    return dx, (db if bias is not None else None), None


def cross_entropy_bwd_fake(grad, logits, target, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits)


def cross_entropy_setup(ctx, inputs, output):
    logits, target, *ctx.options = inputs
    ctx.save_for_backward(logits, target, output[1])


def cross_entropy_backward(ctx, bwd, dloss, _dlse):
    logits, target, lse = ctx.saved_tensors
    return bwd(dloss, logits, target, lse, *ctx.options), None, None, None, None


def reduce_cross_entropy(loss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The reduction of reference.cross_entropy over the kernels' fp32 per-row losses (rows,): "none" keeps
    them (fp32, like the reference), "sum", or "mean" over the rows whose target is not ignore_index."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)


def norm_bwd_fake(dy, h, weight, mean, rstd, dh_extra, has_bias, rms):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight) if has_bias else weight.new_empty(0)


def norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_residual, ctx.has_bias, ctx.rms = residual is not None, bias is not None, rms
    # mean and rstd are saved statistics that no gradient flows through. Unused outputs get None, not a
    # tensor of zeros: the final norm's residual sum is never used, and a zero (rows, n) gradient for it
    # would cost an allocation, a fill and a pass in the kernel (norm_backward handles None).
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def norm_backward(ctx, bwd, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual and dh is not None and dh.numel() else None
    dy = dy if dy is not None else torch.zeros_like(h)
    dx, dw, db = bwd(dy, h, weight, mean, rstd, dh, ctx.has_bias, ctx.rms)
    return dx, (dx if ctx.has_residual else None), dw, (db if ctx.has_bias else None), None, None


def swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def swiglu_bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def swiglu_backward(ctx, bwd, dy):
    return bwd(dy, *ctx.saved_tensors)
