"""pyllm.ops: the only door between the model and any kernel.

One function per op. Each validates its arguments (errors name the argument and what was expected),
then dispatches to a backend chosen at run time: "torch" (the reference, ``reference.py``), "triton",
"cuda" or "cpu". See ``registry.py`` for the selection rules and ``backends()`` for what is available.
Every op takes ``backend=None`` to pick a backend for one call.

Layouts: attention q (B, Hq, T, D), k/v (B, Hkv, S, D); norms, pointwise and linear ops act on the last
dim of any leading shape; cross-entropy takes logits (..., V) and integer targets (...).
"""

from __future__ import annotations

import torch

from . import reference, validate
from .validate import floats_on
from .registry import (BACKENDS, BackendError, Unsupported, backends, dispatch, ops_table, register,
                       requested_backend, use_backend)

__all__ = [
    "attention", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "rope", "softmax", "matmul", "linear",
    "cross_entropy", "linear_cross_entropy", "adamw_step", "unscale_and_check_", "update_loss_scale_",
    "backends", "ops_table", "use_backend", "register", "Unsupported", "BackendError", "BACKENDS",
    "requested_backend", "reference",
]

_INT_DTYPES = (torch.int32, torch.int64)


def attention(q, k, v, *, causal=True, softmax_scale=None, doc_ids=None, window=None, backend=None):
    """Scaled dot-product attention. q (B, Hq, T, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv
    (grouped-query). Queries are the last T of the S positions. ``doc_ids`` (B, S) integer: tokens
    attend only within their document (packed sequences). ``window``: sliding-window size (an int >= 1).

    Backend "cpu", eager mode: when q, k, v are exactly the head views of one contiguous fused projection
    (the model's ``qkv.view(B, T, H, D).transpose(1, 2).split(...)``, T == S), the kernel takes that
    projection and returns its gradient in one tensor, skipping the views' own autograd nodes. Gradients
    reach the projection (and the parameters) correctly, but not the views themselves:
    ``torch.autograd.grad(out, q)`` finds q unused, and hooks or ``retain_grad()`` on q, k, v never run.
    To differentiate with respect to the views, pass copies (``q.clone()``, ...) or use backend="torch"."""
    if not (doc_ids is None and (window is None or (type(window) is int and window >= 1)) and floats_on(q, k, v)
            and q.ndim == 4 and k.ndim == 4 and v.shape == k.shape and k.dtype == q.dtype and v.dtype == q.dtype
            and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3] and q.shape[3] and k.shape[1]
            and not q.shape[1] % k.shape[1]
            and q.shape[2] <= k.shape[2]):
        _check_attention(q, k, v, doc_ids, window)
    return dispatch("attention", q.device, backend, q, k, v, causal=causal, softmax_scale=softmax_scale,
                    doc_ids=doc_ids, window=window)


def _check_attention(q, k, v, doc_ids, window):
    validate.tensor("attention", "q", q, ndim=4)
    validate.tensor("attention", "k", k, ndim=4, like=q)
    validate.tensor("attention", "v", v, ndim=4, like=q)
    validate.same_dtype("attention", "k", k, q, "q")
    validate.same_dtype("attention", "v", v, q, "q")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"pyllm.ops.attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"(B={B}, Hkv, S, D={D}) and equal")
    if k.shape[1] == 0:
        raise ValueError(f"pyllm.ops.attention: k and v have 0 heads, need at least 1 (k {tuple(k.shape)})")
    if D == 0:
        raise ValueError("pyllm.ops.attention: head dim D=0, need at least 1 (q, k, v are (B, H, L, D))")
    if Hq % k.shape[1]:
        raise ValueError(f"pyllm.ops.attention: query heads {Hq} must be a multiple of key/value heads {k.shape[1]}")
    if T > k.shape[2]:
        raise ValueError(f"pyllm.ops.attention: q has {T} positions but k/v only {k.shape[2]}")
    if doc_ids is not None:
        validate.tensor("attention", "doc_ids", doc_ids, ndim=2, dtypes=_INT_DTYPES, like=q)
        validate.shape("attention", "doc_ids", doc_ids, (B, k.shape[2]), "(B, S): one id per key position")
    if window is not None:
        validate.integer("attention", "window", window)
        if window < 1:
            raise ValueError(f"pyllm.ops.attention: argument 'window'={window} must be >= 1")


def _check_norm(op, x, weight, bias, residual):
    if (floats_on(x, weight, bias, residual) and x.ndim and weight.shape == x.shape[-1:]
            and (bias is None or bias.shape == weight.shape) and (residual is None or residual.shape == x.shape)):
        return  # the usual call
    validate.tensor(op, "x", x, min_ndim=1)
    validate.tensor(op, "weight", weight, ndim=1, like=x)
    validate.shape(op, "weight", weight, x.shape[-1:], "(the last dim of x)")
    if bias is not None:
        validate.tensor(op, "bias", bias, ndim=1, like=x)
        validate.shape(op, "bias", bias, x.shape[-1:], "(the last dim of x)")
    if residual is not None:
        validate.tensor(op, "residual", residual, like=x)
        validate.shape(op, "residual", residual, x.shape, "(the shape of x)")


def layer_norm(x, weight, bias=None, *, eps=1e-5, residual=None, backend=None):
    """LayerNorm over the last dim. With ``residual``: returns (LN(x + residual), x + residual)."""
    _check_norm("layer_norm", x, weight, bias, residual)
    return dispatch("layer_norm", x.device, backend, x, weight, bias, eps=eps, residual=residual)


def rms_norm(x, weight, *, eps=1e-6, residual=None, backend=None):
    """RMSNorm over the last dim. With ``residual``: returns (RMSNorm(x + residual), x + residual)."""
    _check_norm("rms_norm", x, weight, None, residual)
    return dispatch("rms_norm", x.device, backend, x, weight, eps=eps, residual=residual)


def bias_gelu(x, bias=None, *, approximate="tanh", backend=None):
    """GELU(x + bias), approximate "tanh" or "none" (exact)."""
    if not (floats_on(x, bias) and x.ndim and (approximate == "tanh" or approximate == "none")
            and (bias is None or bias.shape == x.shape[-1:])):
        validate.tensor("bias_gelu", "x", x, min_ndim=1)
        validate.choice("bias_gelu", "approximate", approximate, ("tanh", "none"))
        if bias is not None:
            validate.tensor("bias_gelu", "bias", bias, ndim=1, like=x)
            validate.shape("bias_gelu", "bias", bias, x.shape[-1:], "(the last dim of x)")
    return dispatch("bias_gelu", x.device, backend, x, bias, approximate=approximate)


def swiglu(gate, up, *, backend=None):
    """SiLU(gate) * up.

    Backend "cpu", eager mode: when gate and up are exactly the two halves of one contiguous tensor (the
    model's ``fc(x).chunk(2, dim=-1)``), the kernel takes that tensor and returns its gradient in one piece,
    skipping the halves' own autograd nodes. Gradients reach that tensor (and the parameters) correctly, but
    not the halves themselves: ``torch.autograd.grad(y, gate)`` finds gate unused, and hooks or
    ``retain_grad()`` on gate, up never run. To differentiate with respect to the halves, pass copies
    (``gate.clone()``, ...) or use backend="torch"."""
    if not (floats_on(gate, up) and gate.ndim and up.shape == gate.shape):
        validate.tensor("swiglu", "gate", gate, min_ndim=1)
        validate.tensor("swiglu", "up", up, like=gate)
        validate.shape("swiglu", "up", up, gate.shape, "(the shape of gate)")
    return dispatch("swiglu", gate.device, backend, gate, up)


def rope(q, k, cos, sin, *, backend=None):
    """Rotary position embedding on q (B, Hq, T, D) and k (B, Hkv, T, D); cos, sin (T, D/2) or
    (B, T, D/2). Returns (q_rotated, k_rotated)."""
    if not (floats_on(q, k, cos, sin) and q.ndim == 4 and k.ndim == 4 and k.shape[0] == q.shape[0]
            and k.shape[2:] == q.shape[2:] and not q.shape[3] % 2 and sin.shape == cos.shape
            and (cos.shape == (q.shape[2], q.shape[3] // 2)
                 or cos.shape == (q.shape[0], q.shape[2], q.shape[3] // 2))):
        _check_rope(q, k, cos, sin)
    return dispatch("rope", q.device, backend, q, k, cos, sin)


def _check_rope(q, k, cos, sin):
    validate.tensor("rope", "q", q, ndim=4)
    validate.tensor("rope", "k", k, ndim=4, like=q)
    validate.tensor("rope", "cos", cos, ndim=(2, 3), like=q)
    validate.tensor("rope", "sin", sin, ndim=(2, 3), like=q)
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"pyllm.ops.rope: head dim {D} must be even")
    expected = (T, D // 2) if cos.dim() == 2 else (B, T, D // 2)
    validate.shape("rope", "cos", cos, expected, "(T, D/2) or (B, T, D/2)")
    validate.shape("rope", "sin", sin, cos.shape, "(the shape of cos)")
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"pyllm.ops.rope: k {tuple(k.shape)} must match q {tuple(q.shape)} except in heads")


def softmax(x, *, backend=None):
    """Softmax over the last dim (fp32 internally)."""
    if not (floats_on(x) and x.ndim):
        validate.tensor("softmax", "x", x, min_ndim=1)
    return dispatch("softmax", x.device, backend, x)


def matmul(a, b, *, backend=None):
    """a (M, K) @ b (K, N)."""
    if not (floats_on(a, b) and a.ndim == 2 and b.ndim == 2 and b.dtype == a.dtype and a.shape[1] == b.shape[0]):
        validate.tensor("matmul", "a", a, ndim=2)
        validate.tensor("matmul", "b", b, ndim=2, like=a)
        validate.same_dtype("matmul", "b", b, a, "a")
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"pyllm.ops.matmul: inner dims differ: a {tuple(a.shape)} @ b {tuple(b.shape)}")
    return dispatch("matmul", a.device, backend, a, b)


def linear(x, weight, bias=None, *, activation=None, backend=None):
    """activation(x @ weight^T + bias); weight (N, K) as in nn.Linear; activation None|"gelu"|"gelu_tanh"."""
    if not (floats_on(x, weight, bias) and x.ndim and weight.ndim == 2 and weight.shape[1] == x.shape[-1]
            and (activation is None or activation == "gelu" or activation == "gelu_tanh")
            and (bias is None or bias.shape == weight.shape[:1])
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)):
        _check_linear(x, weight, bias, activation)
    return dispatch("linear", x.device, backend, x, weight, bias, activation=activation)


def _check_linear(x, weight, bias, activation):
    validate.tensor("linear", "x", x, min_ndim=1)
    validate.tensor("linear", "weight", weight, ndim=2, like=x)
    validate.choice("linear", "activation", activation, (None, "gelu", "gelu_tanh"))
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"pyllm.ops.linear: weight {tuple(weight.shape)} must be (N, K={x.shape[-1]}), "
                         f"K the last dim of x")
    if bias is not None:
        validate.tensor("linear", "bias", bias, ndim=1, like=x)
        validate.shape("linear", "bias", bias, weight.shape[:1], "(N, the rows of weight)")
    _check_gemm_dtypes("linear", x, "x", weight, bias)


def _check_gemm_dtypes(op, x, x_name, weight, bias):
    """Outside autocast (which casts them to its dtype) a GEMM's operands must share one dtype."""
    if not torch.is_autocast_enabled(x.device.type):
        validate.same_dtype(op, "weight", weight, x, x_name)
        if bias is not None:
            validate.same_dtype(op, "bias", bias, x, x_name)


def _check_ce(op, rows_shape, vocab, target, ignore_index, label_smoothing, z_loss, reduction, like):
    if (isinstance(target, torch.Tensor) and target.dtype in _INT_DTYPES and target.device == like.device
            and target.shape == rows_shape and type(ignore_index) is int and 0.0 <= label_smoothing < 1.0
            and z_loss >= 0 and (reduction == "mean" or reduction == "sum" or reduction == "none")):
        _check_target_range(op, target, vocab, ignore_index)
        return  # the usual call
    validate.tensor(op, "target", target, dtypes=_INT_DTYPES, like=like)
    validate.integer(op, "ignore_index", ignore_index)
    if tuple(target.shape) != tuple(rows_shape):
        raise ValueError(f"pyllm.ops.{op}: argument 'target' has shape {tuple(target.shape)}, expected "
                         f"{tuple(rows_shape)} (one class index per row)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"pyllm.ops.{op}: argument 'label_smoothing'={label_smoothing} must be in [0, 1)")
    if z_loss < 0:
        raise ValueError(f"pyllm.ops.{op}: argument 'z_loss'={z_loss} must be >= 0")
    validate.choice(op, "reduction", reduction, ("mean", "sum", "none"))
    _check_target_range(op, target, vocab, ignore_index)


def _check_target_range(op, target, vocab, ignore_index):
    """Class indices outside [0, V) other than ignore_index are refused, on CPU tensors: on a GPU the check
    would be a host sync in every step, so there the kernel backends flag such a row with a nan loss
    instead (the reference asserts on the device); under torch.compile it would break the graph."""
    if target.device.type != "cpu" or not target.numel() or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(target))
    if 0 <= low and high < vocab:  # one pass decides the usual case
        return
    if bool(((target < 0) | (target >= vocab)).logical_and_(target != ignore_index).any()):
        raise ValueError(f"pyllm.ops.{op}: argument 'target' holds class indices outside [0, {vocab}) that are "
                         f"not ignore_index={ignore_index}")


def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  backend=None):
    """Softmax cross-entropy of logits (..., V) against integer target (...); see reference.cross_entropy.
    reduction "none" gives the per-row losses in the shape of ``target``. A target outside [0, V) that is not
    ``ignore_index`` is a ValueError for CPU tensors; on a GPU (no host sync) the kernels give its row a nan
    loss."""
    if not (floats_on(logits) and logits.ndim):
        validate.tensor("cross_entropy", "logits", logits, min_ndim=1)
    _check_ce("cross_entropy", logits.shape[:-1], logits.shape[-1], target, ignore_index, label_smoothing, z_loss,
              reduction, logits)
    loss = dispatch("cross_entropy", logits.device, backend, logits, target, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss  # backends may return rows flat


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, reduction="mean", backend=None):
    """cross_entropy(hidden @ weight^T + bias, target) without materialising all logits (in the kernel
    backends). hidden (..., H), weight (V, H), target (...): checked as in cross_entropy."""
    if not (floats_on(hidden, weight, bias) and hidden.ndim and weight.ndim == 2
            and weight.shape[1] == hidden.shape[-1] and (bias is None or bias.shape == weight.shape[:1])
            and weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype)):
        validate.tensor("linear_cross_entropy", "hidden", hidden, min_ndim=1)
        validate.tensor("linear_cross_entropy", "weight", weight, ndim=2, like=hidden)
        if weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"pyllm.ops.linear_cross_entropy: weight {tuple(weight.shape)} must be "
                             f"(V, H={hidden.shape[-1]})")
        if bias is not None:
            validate.tensor("linear_cross_entropy", "bias", bias, ndim=1, like=hidden)
            validate.shape("linear_cross_entropy", "bias", bias, weight.shape[:1], "(V)")
        _check_gemm_dtypes("linear_cross_entropy", hidden, "hidden", weight, bias)
    _check_ce("linear_cross_entropy", hidden.shape[:-1], weight.shape[0], target, ignore_index, label_smoothing,
              z_loss, reduction, hidden)
    loss = dispatch("linear_cross_entropy", hidden.device, backend, hidden, weight, target, bias,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                    reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1=0.9, beta2=0.95, eps=1e-8,
               weight_decay=0.0, step, master_params=None, found_inf=None, backend=None):
    """Fused AdamW over lists of tensors, in place; see reference.adamw_step."""
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("master_params", master_params)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"pyllm.ops.adamw_step: '{name}' has {len(lst)} tensors, 'params' has {n}")
    # moments and master weights are fp32 (fp64 for a float64 truth in tests), whatever the params' dtype
    wide = (torch.float32, torch.float64)
    _check_tensor_list("adamw_step", "params", params)
    states = [("grads", grads, None), ("exp_avgs", exp_avgs, wide), ("exp_avg_sqs", exp_avg_sqs, wide),
              ("master_params", master_params, wide)]
    for name, lst, dtypes in states:
        _check_tensor_list("adamw_step", name, lst or ())
        for i, (p, t) in enumerate(zip(params, lst or ())):
            if t.shape != p.shape:
                raise ValueError(f"pyllm.ops.adamw_step: {name}[{i}] shape {tuple(t.shape)} != params[{i}] "
                                 f"shape {tuple(p.shape)}")
            if dtypes is not None and t.dtype not in dtypes or not t.is_floating_point():
                raise TypeError(f"pyllm.ops.adamw_step: {name}[{i}] has dtype {str(t.dtype).removeprefix('torch.')}, "
                                f"expected {'float32' if dtypes else 'a floating-point dtype'}")
            if t.device != p.device:
                raise ValueError(f"pyllm.ops.adamw_step: {name}[{i}] is on {t.device}, params[{i}] on {p.device}")
    if found_inf is not None:
        validate.tensor("adamw_step", "found_inf", found_inf, dtypes=(torch.float32,))
        _check_one_element("adamw_step", "found_inf", found_inf)
    if n == 0:
        return None
    return dispatch("adamw_step", params[0].device, backend, params, grads, exp_avgs, exp_avg_sqs, lr=lr,
                    beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                    master_params=master_params, found_inf=found_inf)


def unscale_and_check_(grads, inv_scale, found_inf, *, backend=None):
    """grads *= inv_scale in place (one multi-tensor launch in the kernel backends); found_inf (1
    element, fp32) is set to 1 if any gradient holds inf/nan. Never synchronises with the host."""
    validate.tensor("unscale_and_check_", "found_inf", found_inf, dtypes=(torch.float32,))
    _check_one_element("unscale_and_check_", "found_inf", found_inf)
    if isinstance(inv_scale, torch.Tensor):
        _check_one_element("unscale_and_check_", "inv_scale", inv_scale)
    _check_tensor_list("unscale_and_check_", "grads", grads)
    if not grads:
        return None
    return dispatch("unscale_and_check_", found_inf.device, backend, grads, inv_scale, found_inf)


def update_loss_scale_(scale, growth_tracker, found_inf, *, growth_factor=2.0, backoff_factor=0.5,
                       growth_interval=2000, backend=None):
    """Device-side dynamic loss-scale update; see reference.update_loss_scale_."""
    op = "update_loss_scale_"
    validate.tensor(op, "scale", scale, dtypes=(torch.float32,))
    validate.tensor(op, "growth_tracker", growth_tracker, dtypes=(torch.int32, torch.int64), like=scale)
    validate.tensor(op, "found_inf", found_inf, dtypes=(torch.float32,), like=scale)
    for name, t in (("scale", scale), ("growth_tracker", growth_tracker), ("found_inf", found_inf)):
        _check_one_element(op, name, t)
    validate.integer(op, "growth_interval", growth_interval)
    return dispatch("update_loss_scale_", scale.device, backend, scale, growth_tracker, found_inf,
                    growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=growth_interval)


def _check_tensor_list(op, name, tensors):
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):  # a None (a parameter without gradient) raised AttributeError
            validate.tensor(op, f"{name}[{i}]", t)  # raises, naming the element


def _check_one_element(op, name, t):
    """The loss-scaling scalars live in one-element device tensors (the kernels read element 0 only)."""
    if t.numel() != 1:
        raise ValueError(f"pyllm.ops.{op}: argument '{name}' must have exactly one element, got shape {tuple(t.shape)}")


# The reference implements every op: register it as the "torch" backend.
for _name in ("attention", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "rope", "softmax", "matmul",
              "linear", "cross_entropy", "linear_cross_entropy", "adamw_step", "unscale_and_check_",
              "update_loss_scale_"):
    register(_name, "torch")(getattr(reference, _name))
del _name
