"""The "triton" backend: registers the kernels of ``pyllm.kernels`` (one file per op in kernels/).

Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them);
any other case raises ``Unsupported`` so the dispatcher falls back to the reference. Each
implementation here only checks what its kernel cannot take, then calls the kernel module's entry
point directly (no copies beyond what the kernel launcher itself needs).
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from pyllm.kernels import adamw as adamw_kernel
from pyllm.kernels import attention as attention_kernel
from pyllm.kernels import cross_entropy as ce_kernel
from pyllm.kernels import gelu, launch, layernorm, loss_scale
from pyllm.kernels import matmul as matmul_kernel
from pyllm.kernels import rope as rope_kernel
from pyllm.kernels import softmax as softmax_kernel

from . import reference
from .registry import Unsupported, register


def _require(reason: str | None) -> None:
    if reason is not None:
        raise Unsupported(reason)


@register("layer_norm", "triton")
def layer_norm(x, weight, bias=None, *, eps=1e-5, residual=None):
    _require(launch.runnable_reason(x, weight, bias, residual) or layernorm.unsupported_reason(x, weight, residual))
    return layernorm.layer_norm(x, weight, bias, eps, residual)


@register("rms_norm", "triton")
def rms_norm(x, weight, *, eps=1e-6, residual=None):
    _require(launch.runnable_reason(x, weight, residual) or layernorm.unsupported_reason(x, weight, residual))
    return layernorm.rms_norm(x, weight, eps, residual)


@register("bias_gelu", "triton")
def bias_gelu(x, bias=None, *, approximate="tanh"):
    _require(launch.runnable_reason(x, bias) or gelu.unsupported_reason(x, bias))
    return gelu.bias_gelu(x, bias, approximate)


@register("swiglu", "triton")
def swiglu(gate, up):
    _require(launch.runnable_reason(gate, up) or gelu.unsupported_reason(gate, up))
    return gelu.swiglu(gate, up)


@register("rope", "triton")
def rope(q, k, cos, sin):
    _require(launch.runnable_reason(q, k, cos, sin) or rope_kernel.unsupported_reason(q, k, cos, sin))
    return rope_kernel.rope(q, k, cos, sin)


@register("softmax", "triton")
def softmax(x):
    _require(launch.runnable_reason(x) or softmax_kernel.unsupported_reason(x))
    return softmax_kernel.softmax(x)


@register("cross_entropy", "triton")
def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    _require(launch.runnable_reason(logits, target) or ce_kernel.unsupported_reason(logits))
    return ce_kernel.cross_entropy(logits, target, ignore_index, label_smoothing, z_loss, reduction)


@register("unscale_and_check_", "triton")
def unscale_and_check_(grads, inv_scale, found_inf):
    _require(launch.runnable_reason(found_inf, *grads, inv_scale if torch.is_tensor(inv_scale) else None)
             or loss_scale.unsupported_reason(grads, inv_scale, found_inf))
    return loss_scale.unscale_and_check_(grads, inv_scale, found_inf)


@register("update_loss_scale_", "triton")
def update_loss_scale_(scale, growth_tracker, found_inf, *, growth_factor=2.0, backoff_factor=0.5,
                       growth_interval=2000):
    _require(launch.runnable_reason(scale, growth_tracker, found_inf))
    return loss_scale.update_loss_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                                         growth_interval)


@register("adamw_step", "triton")
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
               step, master_params=None, found_inf=None):
    _require(launch.runnable_reason(*params, *grads, *exp_avgs, *exp_avg_sqs, *(master_params or ()), found_inf)
             or adamw_kernel.unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, master_params, found_inf,
                                                lr, step))
    return adamw_kernel.adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                   weight_decay=weight_decay, step=step, master_params=master_params,
                                   found_inf=found_inf)


@register("attention", "triton")
def attention(q, k, v, *, causal=True, softmax_scale=None, doc_ids=None, window=None):
    _require(launch.runnable_reason(q, k, v, doc_ids) or attention_kernel.unsupported_reason(q, k, v, doc_ids))
    return attention_kernel.attention(q, k, v, causal, softmax_scale, doc_ids, window)


@register("matmul", "triton")
def matmul(a, b):
    _require(launch.runnable_reason(a, b) or matmul_kernel.unsupported_reason(a, b))
    return matmul_kernel.matmul(a, b)


@register("linear", "triton")
def linear(x, weight, bias=None, *, activation=None):
    _require(launch.runnable_reason(x, weight, bias) or matmul_kernel.unsupported_reason(x, weight, bias))
    return matmul_kernel.linear(x, weight, bias, activation)


@register("linear_cross_entropy", "triton")
def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         reduction="mean"):
    _require(launch.runnable_reason(hidden, weight, target, bias)
             or ce_kernel.unsupported_reason(hidden) or matmul_kernel.unsupported_reason(hidden, weight, bias))
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:  # no features or no classes: nothing to fuse (as on cpu)
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                                              reduction)
    return ce_kernel.linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                                          reduction)
