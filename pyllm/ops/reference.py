"""The pure-PyTorch reference of every op: the test oracle, the benchmarks' unfused baseline and the
fallback of every other backend.

Each function computes in the input dtype the way an unfused PyTorch program would (matmuls in the
input dtype, reductions such as softmax and logsumexp in fp32), so that "the reference in dtype X"
measures the error an ordinary PyTorch user already accepts; called on fp32 (or fp64) inputs it is
the truth the kernels are judged against. Arguments are validated in ``pyllm.ops``, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upcast(x):
    """x in at least fp32: low precision goes up to fp32, fp64 stays fp64 (so fp64 gradchecks are exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------- attention


def attention_mask(T: int, S: int, device, causal: bool, doc_ids=None, window=None):
    """Boolean mask (B or 1, 1, T, S), True where query i may attend to key j.

    Queries are the last T of the S key positions (bottom-right alignment, as in a KV-cached decode):
    query i sits at position S - T + i. ``doc_ids`` (B, S) labels each key position with its document;
    a query sees only keys of its own document. ``window`` keeps keys with q_pos - k_pos < window.
    Returns None when nothing is masked.
    """
    if not causal and doc_ids is None and window is None:
        return None
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
    mask = mask[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, S - T:, None] == doc_ids[:, None, :]  # (B, T, S)
        mask = mask & same_doc[:, None]
    return mask


def attention(q, k, v, causal=True, softmax_scale=None, doc_ids=None, window=None):
    """softmax(q k^T * scale + mask) v. q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq % Hkv == 0.

    On the CPU, bf16/fp16 inputs are computed in fp32 and the output rounded back (outside autocast, which
    would cast SDPA's inputs down again): PyTorch's CPU flash-attention backward runs ~7x slower in bf16
    than in fp32 (measured at B12 T64 H4 D32 on AVX512-BF16), and attention is a few percent of a model's
    FLOPs, so this is what a PyTorch program training in bf16 on a CPU should do."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), causal, softmax_scale, doc_ids, window).to(q.dtype)
    T, S = q.shape[2], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    if causal and T == S and doc_ids is None and window is None and scale > 0:  # is_causal gives nan for <= 0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(T, S, q.device, causal, doc_ids, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attention_explicit(q, k, v, causal=True, softmax_scale=None, doc_ids=None, window=None):
    """The same op written out as the formula (no SDPA): the independent check of ``attention``."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = _upcast(q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    mask = attention_mask(q.shape[2], k.shape[2], q.device, causal, doc_ids, window)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


# ------------------------------------------------------------------------------------- normalisation


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim. With ``residual``: returns (LN(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
    # F.layer_norm takes weight and bias in x's dtype, or in float32 with a lower-precision x; any other mix
    # (a float32 x + residual with bfloat16 weights) gets them widened to the promoted dtype, which is exact
    params = weight.dtype if bias is None else torch.promote_types(weight.dtype, bias.dtype)
    dtype = torch.promote_types(x.dtype, params)
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        weight, bias = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
    out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return (out, x) if residual is not None else out


def rms_norm(x, weight, eps=1e-6, residual=None):
    """x / rms(x) * weight (Zhang & Sennrich 2019), statistics in fp32 as in Llama; same residual rule."""
    if residual is not None:
        x = x + residual
    xf = _upcast(x)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = normed * weight
    return (out, x) if residual is not None else out


# ----------------------------------------------------------------------------------------- pointwise


def bias_gelu(x, bias=None, approximate="tanh"):
    """GELU(x + bias); approximate "tanh" (GPT-2) or "none" (exact erf form)."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def swiglu(gate, up):
    """SiLU(gate) * up (Shazeer 2020), the gated MLP of Llama."""
    return F.silu(gate) * up


def rope(q, k, cos, sin):
    """Rotary embedding (Su et al. 2021), "rotate half" layout as in HF Llama checkpoints.

    q (B, Hq, T, D), k (B, Hkv, T, D); cos, sin (T, D/2) or (B, T, D/2). Returns (q_rot, k_rot).
    """
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, D/2)
    else:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2)

    def rotate(x):
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)


def softmax(x):
    """Softmax over the last dim, computed in (at least) fp32."""
    return torch.softmax(_upcast(x), dim=-1).to(x.dtype)


# -------------------------------------------------------------------------------------------- matmul


_ACTIVATIONS = {None: lambda y: y, "gelu": lambda y: F.gelu(y), "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


def matmul(a, b):
    """a @ b."""
    return a @ b


def linear(x, weight, bias=None, activation=None):
    """activation(x @ weight^T + bias); weight (N, K) as in nn.Linear; activation None|"gelu"|"gelu_tanh"."""
    return _ACTIVATIONS[activation](F.linear(x, weight, bias))


# ------------------------------------------------------------------------------------ cross-entropy


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Softmax cross-entropy over the last dim of ``logits`` (..., V) with integer ``target`` (...).

    Per row: (1 - eps) * (lse - x_t) + eps * (lse - mean(x)) + z_loss * lse^2, where eps is the label
    smoothing and the z-loss term is PaLM's (Chowdhery et al. 2022). Rows whose target is
    ``ignore_index`` contribute 0 and are not counted by "mean" (which averages over counted rows);
    "none" returns the per-row losses in the shape of ``target``. The loss is in (at least) fp32.
    """
    rows_shape = target.shape
    logits = _upcast(logits.reshape(-1, logits.shape[-1]))
    target = target.reshape(-1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, safe_target[:, None]).squeeze(1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(rows_shape)  # (...) like target, as torch's cross_entropy
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, reduction="mean"):
    """cross_entropy(hidden @ weight^T + bias, target): the unfused form that materialises all logits."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits, target, ignore_index, label_smoothing, z_loss, reduction)


# ------------------------------------------------------------------------------- optimiser & scaling


@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
               master_params=None, found_inf=None):
    """One AdamW step (Loshchilov & Hutter 2019) over lists of tensors, in place.

    ``step`` is the 1-based step count (int or 0-d tensor) used for bias correction; ``lr`` a float or
    0-d tensor. Moments are fp32. With ``master_params`` (fp32) the update is applied to them and the
    result is copied into ``params`` (low precision). With ``found_inf`` (a 1-element tensor, >0 when
    the gradients overflowed) nothing changes, decided on the device without a host sync.
    """
    step = torch.as_tensor(step, dtype=torch.float32, device=exp_avgs[0].device) if exp_avgs else step
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    targets = master_params if master_params is not None else params
    for i, (p, g, m, v) in enumerate(zip(targets, grads, exp_avgs, exp_avg_sqs)):
        g32 = g.float()
        new_m = m * beta1 + g32 * (1.0 - beta1)
        new_v = v * beta2 + g32.square() * (1.0 - beta2)
        p32 = p.float()
        update = (new_m / bc1) / ((new_v / bc2).sqrt() + eps) + weight_decay * p32
        new_p = p32 - lr * update
        if found_inf is not None:
            skip = found_inf.reshape(()) > 0
            new_m, new_v, new_p = (torch.where(skip, old, new) for old, new in ((m, new_m), (v, new_v), (p32, new_p)))
        m.copy_(new_m)
        v.copy_(new_v)
        p.copy_(new_p)
        if master_params is not None:
            params[i].copy_(new_p)


@torch.no_grad()
def unscale_and_check_(grads, inv_scale, found_inf):
    """Multiply every gradient by ``inv_scale`` in place and set ``found_inf`` (1 element) to 1 if any
    gradient holds an inf or nan. No host synchronisation."""
    for g in grads:
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(g)).any().to(found_inf.dtype).reshape(found_inf.shape)))
        g.mul_(inv_scale.to(g.dtype) if torch.is_tensor(inv_scale) else inv_scale)


@torch.no_grad()
def update_loss_scale_(scale, growth_tracker, found_inf, growth_factor=2.0, backoff_factor=0.5,
                       growth_interval=2000):
    """Dynamic loss-scale update on the device: back off on overflow, grow after ``growth_interval``
    clean steps. ``scale`` (1, fp32), ``growth_tracker`` (1, int32), ``found_inf`` (1, fp32)."""
    overflow = found_inf > 0
    tracker = torch.where(overflow, torch.zeros_like(growth_tracker), growth_tracker + 1)
    grow = tracker >= growth_interval
    scale.copy_(torch.where(overflow, scale * backoff_factor, torch.where(grow, scale * growth_factor, scale)))
    growth_tracker.copy_(torch.where(grow, torch.zeros_like(tracker), tracker))
