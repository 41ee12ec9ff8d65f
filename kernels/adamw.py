"""Fused multi-tensor AdamW (Loshchilov & Hutter 2019), fp32 moments, optional fp32 master weights.

Algorithm. Per element, in fp32 registers, reading each of p, g, m, v once and writing p, m, v once:
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p = p - lr ((m / bc1) / (sqrt(v / bc2) + eps) + wd p),   bc_i = 1 - b_i^step
All tensors of a parameter group go through one launch over a chunk table (multi_tensor.py); tensors
with different (param, grad) dtypes go in separate launches, one per combination, so the element
types are compile-time constants (a model has one or two combinations). With ``master_params`` the
update goes to the fp32 masters and the rounded result is also stored into the low-precision params
in the same pass. ``lr`` and ``step`` may be Python numbers or device tensors (read on the device,
so an LR schedule or step counter on the GPU costs no sync). The bias corrections 1 - b^step are computed
before the launch in float64 (on the host for a number, by a few tensor ops on the device for a tensor):
in the kernel, 1 - exp2(step log2 b) cancels, and the GPU's approximate exp2 put bc2 ~1e-4 off at step 1
with b2 = 0.999, twice the reference's own fp32 error. With ``found_inf`` (from the loss scaler) every
store is masked off when it is set: the step is skipped without the host ever reading the flag.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import launch, multi_tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adamw_kernel(TABLE, LR, BC, FOUND, lr_value, bc1_value, bc2_value, beta1, beta2, eps,
                  weight_decay, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                  HAS_COPY: tl.constexpr, LR_FROM_PTR: tl.constexpr, BC_FROM_PTR: tl.constexpr,
                  HAS_FOUND: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    row = TABLE + tl.program_id(0).to(tl.int64) * (2 * K + 1)  # [p, g, m, v, (copy)] addresses, n, codes
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + K)
    if LR_FROM_PTR:
        lr = tl.load(LR).to(tl.float32)
    else:
        lr = lr_value
    if BC_FROM_PTR:
        bc1 = tl.load(BC)
        bc2 = tl.load(BC + 1)
    else:
        bc1 = bc1_value
        bc2 = bc2_value
    if HAS_FOUND:
        limit = tl.where(tl.load(FOUND) > 0, 0, n)  # overflowed step: touch nothing
    else:
        limit = n
    for start in range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < limit
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + g * (1.0 - beta1)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + g * g * (1.0 - beta2)
        p = p - lr * ((m / bc1) / (tl.sqrt(v / bc2) + eps) + weight_decay * p)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
        if HAS_COPY:
            c_ptr = tl.load(row + 4).to(tl.pointer_type(C_DTYPE))
            tl.store(c_ptr + offs, p.to(C_DTYPE), mask=mask)


def unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, master_params, found_inf, lr, step) -> str | None:
    for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("master_params", master_params)):
        if lst is not None and any(t.dtype != torch.float32 for t in lst):
            return f"{name} must be float32 for the Triton AdamW"
    for name, v in (("lr", lr), ("step", step)):
        if torch.is_tensor(v) and v.numel() != 1:
            return f"{name} must be a number or a 1-element tensor"
    return multi_tensor.unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, master_params)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
               master_params=None, found_inf=None) -> None:
    targets = master_params if master_params is not None else params
    groups: dict[tuple, list[int]] = {}
    for i, (t, g) in enumerate(zip(targets, grads)):
        if t.numel():
            key = (t.dtype, g.dtype, params[i].dtype if master_params is not None else None)
            groups.setdefault(key, []).append(i)
    lr_ptr, step_ptr = torch.is_tensor(lr), torch.is_tensor(step)
    if step_ptr:  # float64 on the device: a scalar base with a tensor exponent needs no host-to-device copy
        s = step.reshape(()).double()
        bc = torch.stack([1.0 - torch.pow(float(beta1), s), 1.0 - torch.pow(float(beta2), s)]).float()
        bc1 = bc2 = 0.0
    else:
        bc, bc1, bc2 = None, 1.0 - float(beta1) ** float(step), 1.0 - float(beta2) ** float(step)
    chunk = multi_tensor.chunk_size()
    for (p_dtype, g_dtype, c_dtype), idx in groups.items():
        lists = [[targets[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                 [exp_avg_sqs[i] for i in idx]]
        if master_params is not None:
            lists.append([params[i] for i in idx])
        table = multi_tensor.chunk_table(lists, chunk)
        dummy = table  # stands in for absent pointer arguments (never read)
        _adamw_kernel[(table.shape[0],)](
            table, lr if lr_ptr else dummy, bc if step_ptr else dummy,
            found_inf if found_inf is not None else dummy,
            0.0 if lr_ptr else float(lr), bc1, bc2, float(beta1), float(beta2), float(eps), float(weight_decay),
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype],
            C_DTYPE=_TL_DTYPES[c_dtype] if c_dtype is not None else tl.float32, HAS_COPY=c_dtype is not None,
            LR_FROM_PTR=lr_ptr, BC_FROM_PTR=step_ptr, HAS_FOUND=found_inf is not None, K=len(lists),
            BLOCK=min(chunk, 2048), CHUNK=chunk, num_warps=1 if launch.INTERPRET else 8)
