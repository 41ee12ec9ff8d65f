"""Rotary position embedding (Su et al. 2021, RoFormer) on q and k in one launch, "rotate half" layout.

Algorithm. For x = [x1 | x2] (two halves of the head dim) and per-position cos/sin of D/2 angles:
    out1 = x1 cos - x2 sin,     out2 = x2 cos + x1 sin.
One program per (batch, block of BLOCK_T positions) loads those positions' cos/sin once and rotates
every q head and every k head there ((BLOCK_T, BLOCK_H, D/2) tiles), so cos/sin are read once per
token, not once per head. Inputs are read through their (B, H, T) strides: q/k may be views of the fused qkv
projection, no copy. The rotation is orthogonal, so the backward is the same kernel with sin negated
(``BACKWARD``); cos/sin are treated as constants (no gradient), as they are buffers in the model: when
they require grad (learned angles) the op is declined, so the reference runs (an error in strict mode).

Always out of place, as on the op's other backends. An in-place rotation under no-grad (``rope_``,
removed) saved two output allocations but changed the caller's q and k on this backend only, and left
views made under no-grad unusable once grad mode was back on (PyTorch refuses a no-grad view whose base
was modified in place): found by fuzzing the backends with random layouts.

Limits: even head dim up to 512; the head dim must be contiguous (stride 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

MAX_HEAD_DIM = 512


@triton.jit
def _rotate_heads(X, O, sxh, sxt, soh, sot, H, t, t_ok, c, s, d, d_ok, HALF, BLOCK_H: tl.constexpr):
    # X, O point at (b, head 0, position 0, 0). t: (BLOCK_T,) positions; c, s: (BLOCK_T, 1, BLOCK_D) fp32.
    # Tiles are (BLOCK_T, BLOCK_H, BLOCK_D): positions x heads x half the head dim.
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = t_ok[:, None, None] & (h < H)[None, :, None] & d_ok[None, None, :]
        px = X + t[:, None, None].to(tl.int64) * sxt + h[None, :, None].to(tl.int64) * sxh + d[None, None, :]
        x1 = tl.load(px, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(px + HALF, mask=m, other=0.0).to(tl.float32)
        po = O + t[:, None, None].to(tl.int64) * sot + h[None, :, None].to(tl.int64) * soh + d[None, None, :]
        tl.store(po, (x1 * c - x2 * s).to(O.dtype.element_ty), mask=m)
        tl.store(po + HALF, (x2 * c + x1 * s).to(O.dtype.element_ty), mask=m)


@triton.jit
def _rope_fwd_kernel(Q, K, QO, KO, COS, SIN, T, HQ, HKV,
                     sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, scb, sct, HALF,
                     BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # positions on the grid's first axis (up to 2^31 - 1 blocks), the batch on the second (CUDA: 65535)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    t_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cs_off = b * scb + t[:, None].to(tl.int64) * sct + d[None, :]
    cs_mask = t_ok[:, None] & d_ok[None, :]
    c = tl.load(COS + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:
        s = -s  # the inverse rotation: R(theta)^T = R(-theta)
    _rotate_heads(Q + b * sqb, QO + b * sqob, sqh, sqt, sqoh, sqot, HQ, t, t_ok, c, s, d, d_ok, HALF, BLOCK_H)
    _rotate_heads(K + b * skb, KO + b * skob, skh, skt, skoh, skot, HKV, t, t_ok, c, s, d, d_ok, HALF, BLOCK_H)


def unsupported_reason(q, k, cos, sin) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.dtype == torch.float64:
        return "float64 is not supported by the Triton RoPE"
    if k.dtype != q.dtype:
        return f"k dtype {k.dtype} != q dtype {q.dtype}"
    if q.shape[0] > 65535:  # the batch is the grid's second axis (CUDA limit 65535)
        return f"batch {q.shape[0]} > 65535"
    if cos.requires_grad or sin.requires_grad:  # the kernel treats them as constants (see above)
        return "rope has no gradient for cos/sin"
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_apply(q, k, cos, sin, q_out, k_out, backward: bool = False) -> None:
    """Write the rotation of q, k (both (B, H, T, D)) into q_out, k_out (which may be q, k themselves)."""
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    cos, sin = _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    scb = cos.stride(0) if cos.dim() == 3 else 0  # (T, D/2) broadcasts over the batch
    sct = cos.stride(-2)
    BLOCK_D = triton.next_power_of_2(D // 2)
    # ~4k (GPU) / 16k (interpreter) elements a tile: all heads of a few positions, or more positions
    BLOCK_H = max(1, min(triton.next_power_of_2(max(HQ, HKV)), 4096 // BLOCK_D))
    budget = 16384 if launch.INTERPRET else 4096
    BLOCK_T = max(1, min(triton.next_power_of_2(T), budget // (BLOCK_H * BLOCK_D), 64))
    if B * T == 0:
        return
    # (position blocks, batch): a long sequence has more position blocks than CUDA's 65535 on a second axis
    _rope_fwd_kernel[(triton.cdiv(T, BLOCK_T), B)](
        q, k, q_out, k_out, cos, sin, T, HQ, HKV,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        scb, sct, D // 2, BACKWARD=backward, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=launch.num_warps_for(BLOCK_T * BLOCK_H * BLOCK_D))


def rope_fwd(q, k, cos, sin, backward: bool = False):
    q, k = _unit_last(q), _unit_last(k)
    q_out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    k_out = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    rope_apply(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::rope_triton", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_fwd(q, k, cos, sin, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, backward = inputs
    ctx.backward, ctx.q_shape, ctx.k_shape, ctx.dtype = backward, q.shape, k.shape, q.dtype
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # An unused output gets no gradient: rotate zeros for it (rare; keeps one launch for both).
    dq = dq if dq is not None else cos.new_zeros(ctx.q_shape, dtype=ctx.dtype)
    dk = dk if dk is not None else cos.new_zeros(ctx.k_shape, dtype=ctx.dtype)
    dq_in, dk_in = _rope_op(dq, dk, cos, sin, not ctx.backward)
    return dq_in, dk_in, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(q, k, cos, sin):
    """(q_rot, k_rot) out of place (differentiable)."""
    return _rope_op(q, k, cos, sin, False)
