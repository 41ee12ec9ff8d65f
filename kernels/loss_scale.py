"""Dynamic loss scaling on the device: one multi-tensor launch that unscales every gradient and raises a
found-inf flag, and the scale update, with no host synchronisation (after Apex's amp scaler).

Unscale. The gradients of a whole model go through ONE launch over a chunk table (multi_tensor.py):
program i multiplies its chunk by inv_scale in place and, if any element of the chunk is inf/nan,
stores 1.0 into found_inf (every writer stores the same value, so the race is benign and the result
deterministic). Mixed gradient dtypes (fp32 / fp16 / bf16) share the launch through a dtype code per
chunk. inv_scale may be a Python float or a 1-element device tensor (read on the device).

Update. A single-program kernel: on overflow scale *= backoff and the growth tracker resets;
otherwise the tracker counts up and after ``growth_interval`` clean steps scale *= growth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, multi_tensor


@triton.jit
def _unscale_chunk(ptr, n, inv, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Returns 1 if the chunk holds an inf or nan (checked on the scaled values, before unscaling).
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad |= ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)  # nan or inf
        tl.store(ptr + offs, (g * inv).to(ptr.dtype.element_ty), mask=mask)
    return tl.max(bad, axis=0)


@triton.jit
def _unscale_kernel(TABLE, INV, FOUND, inv_value, INV_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
    row = TABLE + tl.program_id(0).to(tl.int64) * 3  # [address, n, dtype code]
    addr = tl.load(row)
    n = tl.load(row + 1)
    code = tl.load(row + 2)
    if INV_FROM_PTR:
        inv = tl.load(INV).to(tl.float32)
    else:
        inv = inv_value
    if code == 0:
        bad = _unscale_chunk(addr.to(tl.pointer_type(tl.float32)), n, inv, BLOCK, CHUNK)
    elif code == 1:
        bad = _unscale_chunk(addr.to(tl.pointer_type(tl.float16)), n, inv, BLOCK, CHUNK)
    else:
        bad = _unscale_chunk(addr.to(tl.pointer_type(tl.bfloat16)), n, inv, BLOCK, CHUNK)
    if bad != 0:
        tl.store(FOUND, 1.0)


@triton.jit
def _update_scale_kernel(SCALE, TRACKER, FOUND, growth_factor, backoff_factor, growth_interval):
    overflow = tl.load(FOUND) > 0
    scale = tl.load(SCALE)
    tracker = tl.where(overflow, 0, tl.load(TRACKER) + 1)
    grow = tracker >= growth_interval
    scale = tl.where(overflow, scale * backoff_factor, tl.where(grow, scale * growth_factor, scale))
    tl.store(SCALE, scale)
    tl.store(TRACKER, tl.where(grow, 0, tracker).to(TRACKER.dtype.element_ty))


def unsupported_reason(grads, inv_scale, found_inf) -> str | None:
    if torch.is_tensor(inv_scale) and inv_scale.numel() != 1:
        return "inv_scale must be a float or a 1-element tensor"
    return multi_tensor.unsupported_reason(grads)


def unscale_and_check_(grads: list[torch.Tensor], inv_scale, found_inf: torch.Tensor) -> None:
    """grads *= inv_scale in place, found_inf = 1 if any gradient is not finite. One launch."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return
    chunk = multi_tensor.chunk_size()
    table = multi_tensor.chunk_table([grads], chunk)
    from_ptr = torch.is_tensor(inv_scale)
    _unscale_kernel[(table.shape[0],)](
        table, inv_scale if from_ptr else found_inf, found_inf, 0.0 if from_ptr else float(inv_scale),
        INV_FROM_PTR=from_ptr, BLOCK=min(chunk, 4096), CHUNK=chunk, num_warps=1 if launch.INTERPRET else 8)


def update_loss_scale_(scale, growth_tracker, found_inf, growth_factor=2.0, backoff_factor=0.5,
                       growth_interval=2000) -> None:
    _update_scale_kernel[(1,)](scale, growth_tracker, found_inf, float(growth_factor), float(backoff_factor),
                               int(growth_interval), num_warps=1)
