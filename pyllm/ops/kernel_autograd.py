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


def bias_gelu_fwd_fake(x, bias, tanh):
    return torch.empty_like(x)


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


def norm_bwd_fake(dy, h, weight, mean, rstd, dh_extra, has_bias, rms):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight) if has_bias else weight.new_empty(0)


def norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_residual, ctx.has_bias, ctx.rms = residual is not None, bias is not None, rms


def swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def swiglu_bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def swiglu_backward(ctx, bwd, dy):
    return bwd(dy, *ctx.saved_tensors)
