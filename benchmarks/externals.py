"""External baselines, each adapted to the signature of the pyllm op it is compared with.

Each function returns {provider name: callable or the reason it is absent}. A library that is not
installed, or that needs a GPU this run does not have, is reported with the reason and skipped; one that
rejects a particular shape or dtype raises, and the harness records that as "skipped" with its message.
Adapters add only what the library needs to match the op (a residual add, a layout transpose) and say so.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F


def _module(name: str, device: str, gpu_only: bool = True):
    """(module, None) or (None, reason)."""
    if gpu_only and device != "cuda":
        return None, f"{name} runs on CUDA only"
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a CUDA/ABI mismatch raised at import
        return None, f"{name} not installed ({type(e).__name__}: {e})"


def liger(op: str, device: str) -> dict[str, Callable | str]:
    """Liger-Kernel's functional API (liger_kernel.transformers.functional)."""
    lk, reason = _module("liger_kernel.transformers.functional", device)
    if lk is None:
        return {"liger": reason}

    def with_residual(norm):
        # Liger's norms have no fused residual add: the add is a separate pass, as in a Liger model
        def fn(x, *args, residual=None, **kw):
            if residual is None:
                return norm(x, *args, **kw)
            s = x + residual
            return norm(s, *args, **kw), s
        return fn

    adapters = {
        "layer_norm": with_residual(lambda x, w, b=None, eps=1e-5: lk.liger_layer_norm(x, w, b, eps)),
        "rms_norm": with_residual(lambda x, w, eps=1e-6: lk.liger_rms_norm(x, w, eps, in_place=False)),
        "swiglu": lambda gate, up: lk.liger_swiglu(gate, up),
        # Liger takes cos/sin over the full head dim (the two halves repeated), (1, T, D)
        "rope": lambda q, k, cos, sin: lk.liger_rope(q, k, torch.cat((cos, cos), -1)[None],
                                                      torch.cat((sin, sin), -1)[None]),
        "cross_entropy": lambda logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
        reduction="mean": lk.liger_cross_entropy(logits, target, ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing, lse_square_scale=z_loss,
                                                 reduction=reduction),
        "linear_cross_entropy": lambda hidden, weight, target, bias=None, ignore_index=-100,
        label_smoothing=0.0, z_loss=0.0, reduction="mean": lk.liger_fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=ignore_index, lse_square_scale=z_loss,
            label_smoothing=label_smoothing, reduction=reduction),
    }
    return {"liger": adapters[op]} if op in adapters else {}


def apex(op: str, device: str) -> dict[str, Callable | str]:
    """NVIDIA Apex fused normalisation kernels."""
    if op not in ("layer_norm", "rms_norm"):
        return {}
    norm, reason = _module("apex.normalization.fused_layer_norm", device)
    if norm is None:
        return {"apex": reason}

    def fn(x, weight, bias=None, eps=1e-5, residual=None):
        s = x + residual if residual is not None else x  # Apex has no fused residual add
        if op == "layer_norm":
            out = norm.fused_layer_norm_affine(s, weight, bias, weight.shape, eps)
        else:
            out = norm.fused_rms_norm_affine(s, weight, weight.shape, eps)
        return (out, s) if residual is not None else out

    if op == "rms_norm":
        return {"apex": lambda x, weight, eps=1e-6, residual=None: fn(x, weight, None, eps, residual)}
    return {"apex": fn}


def flash_attn(device: str) -> dict[str, Callable | str]:
    """Dao-AILab flash-attn 2 (fp16/bf16 only; takes (B, T, H, D), so the adapter transposes views)."""
    fa, reason = _module("flash_attn", device)
    if fa is None:
        return {"flash-attn": reason}

    def fn(q, k, v, causal=True, softmax_scale=None, doc_ids=None, window=None):
        if doc_ids is not None or window is not None or q.shape[2] != k.shape[2]:
            raise NotImplementedError("adapter covers causal self-attention without doc_ids/window only")
        out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 softmax_scale=softmax_scale, causal=causal)
        return out.transpose(1, 2)

    return {"flash-attn": fn}


def sdpa_backends(device: str) -> dict[str, Callable | str]:
    """PyTorch SDPA with one backend forced: flash, memory-efficient, cuDNN and the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
             "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    if device != "cuda":  # CPU builds have only the flash (CPU) and math kernels
        names = {k: v for k, v in names.items() if k in ("sdpa-flash", "sdpa-math")}

    def make(backend):
        def fn(q, k, v, causal=True, softmax_scale=None, doc_ids=None, window=None):
            if doc_ids is not None or window is not None or q.shape[2] != k.shape[2]:
                raise NotImplementedError("adapter covers causal self-attention without doc_ids/window only")
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                                      enable_gqa=q.shape[1] != k.shape[1])
        return fn

    return {name: make(b) for name, b in names.items()}


def torch_adamw(device: str) -> dict[str, Callable | str]:
    """torch.optim's AdamW kernels (fused and foreach) through its functional form.

    torch.optim keeps its own step count on the device (incremented by the call); the adapter keeps one
    per parameter list so the timed call does no allocation."""
    from torch.optim.adamw import adamw as functional_adamw

    def make(fused: bool):
        steps: dict[int, list[torch.Tensor]] = {}

        def fn(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
               master_params=None, found_inf=None):
            if master_params is not None or found_inf is not None:
                raise NotImplementedError("torch.optim AdamW keeps no fp32 master weights / found_inf input")
            if id(params) not in steps:  # torch increments before use: start one below pyllm's step
                steps[id(params)] = [torch.tensor(float(step) - 1.0, device=params[0].device) for _ in params]
            functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps[id(params)], foreach=not fused,
                             fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                             weight_decay=weight_decay, eps=eps, maximize=False)
        return fn

    return {"torch AdamW fused": make(True), "torch AdamW foreach": make(False)}


def torch_amp_scaler(device: str) -> dict[str, Callable | str]:
    """The two kernels torch.amp.GradScaler runs: multi-tensor unscale + inf check, then the scale update."""

    def fn(grads, inv_scale, found_inf, scale, growth_tracker, growth_factor=2.0, backoff_factor=0.5,
           growth_interval=2000):
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        torch._amp_update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval)

    return {"torch GradScaler kernels": fn}
