"""The "triton" backend: registers the kernels of ``pyllm.kernels`` (one file per op in kernels/).

Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them);
any other case raises ``Unsupported`` so the dispatcher falls back to the reference. Each
implementation here only checks what its kernel cannot take, then calls the kernel module's entry
point directly (no copies beyond what the kernel launcher itself needs).
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from pyllm.kernels import gelu, launch, layernorm

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
