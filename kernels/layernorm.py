"""LayerNorm and RMSNorm, with an optional fused residual add, forward and backward.

Algorithm. Forward: each program owns whole rows (BLOCK_N >= N, a power of two; one row when N is
large, several short rows as one 2-D tile otherwise); a row is loaded once,
``h = x + residual`` is written back as the new residual stream, and the statistics are computed in
fp32 from registers (two-pass mean/variance on the register copy: no E[x^2]-E[x]^2 cancellation).
``mean`` and ``rstd`` (fp32, one per row) are saved for the backward. RMSNorm (Zhang & Sennrich
2019) is the same kernel with ``IS_RMS`` (no mean, no bias).

Backward: with ``xhat = (h - mean) * rstd`` and ``g = weight * dy``,
    LayerNorm  dx = rstd * (g - xhat * mean(g * xhat) - mean(g))
    RMSNorm    dx = rstd * (g - xhat * mean(g * xhat))
plus the gradient flowing into the new residual output. The weight/bias gradients are column sums
over all rows: instead of atomics (contended, non-deterministic) each of P programs walks a
contiguous band of rows, accumulates its partial ``sum(dy * xhat)`` / ``sum(dy)`` in fp32 registers
and stores one row of a (P, N) buffer; a second pass reduces that buffer over P. P is a few programs
per SM, so the buffer is small and the reduction is cheap, and results are bit-reproducible.

Limits: rows up to 65536 elements (one row must fit in registers/shared memory of one program);
the last dim must be contiguous (other strides are handled through a 2-D row view).

The autograd path is a pair of torch.library custom ops (forward, backward) with fake
implementations and ``register_autograd``, so torch.compile traces through them; this replaces a
``torch.autograd.Function`` (one registration, not two copies of the same glue).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

MAX_N = 65536


@triton.jit
def _layernorm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD,
                          stride_x, stride_r, stride_y, stride_h, M, N, eps,
                          IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A (BLOCK_M, BLOCK_N) tile: BLOCK_M whole rows (several short rows per program, one long row).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # The new residual stream is rounded to the input dtype, as an unfused x + residual would be.
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_low = (x + r).to(H.dtype.element_ty)
        tl.store(H + r64 * stride_h + cols[None, :], h_low, mask=mask)
        x = h_low.to(tl.float32)
    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        xhat = xc * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xhat * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_bwd_kernel(DY, DH, H, W, MEAN, RSTD, DX, DW_PART, DB_PART,
                          stride_dy, stride_dh, stride_h, stride_dx, M, N, rows_per_prog,
                          IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program pid walks rows [pid * rows_per_prog, ...) BLOCK_M at a time (rows_per_prog is a
    # multiple of BLOCK_M) and leaves its partial weight/bias gradient sums in row pid of *_PART.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        h = tl.load(H + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]) * rstd, 0.0)
        g = w * dy
        c1 = tl.sum(xhat * g, axis=1)[:, None] / N
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, axis=1)[:, None] / N) * rstd
        if HAS_DRES:
            dx += tl.load(DH + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _tile(N: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N, num_warps): about 4k elements a tile on a GPU (one row when N >= 4k;
    several short rows per program otherwise), bigger tiles in the interpreter (fewer programs)."""
    block_n = triton.next_power_of_2(N)
    per_tile = 16384 if launch.INTERPRET else 4096
    block_m = max(1, min(64 if launch.INTERPRET else 16, per_tile // block_n))
    return block_m, block_n, launch.num_warps_for(block_m * block_n)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    """Why the kernel cannot take these inputs (None if it can)."""
    if x.shape[-1] > MAX_N:
        return f"row length {x.shape[-1]} > {MAX_N}"
    if residual is not None and residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} != x dtype {x.dtype}"
    if x.dtype == torch.float64:
        return "float64 is not supported by the Triton norms"
    return None




def layernorm_fwd(x, weight, bias, residual, eps: float, rms: bool):
    """Returns (y, h, mean, rstd): h = x + residual (an empty tensor without residual), mean empty for RMS."""
    N = x.shape[-1]
    x2 = launch.rows(x)
    M = x2.shape[0]
    r2 = launch.rows(residual) if residual is not None else None
    # the reference's dtype: F.layer_norm keeps x's; RMSNorm's normed * weight promotes with the weight's
    y = torch.empty((M, N), device=x.device, dtype=launch.promoted(x, weight) if rms else x.dtype)
    h = torch.empty((M, N), device=x.device, dtype=x.dtype) if residual is not None else x.new_empty(0)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    mean = torch.empty(0 if rms else M, device=x.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, warps = _tile(N)
    if M > 0:
        _layernorm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, y,
            h if residual is not None else y, mean if not rms else rstd, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            h.stride(0) if residual is not None else 0, M, N, eps,
            IS_RMS=rms, HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=warps)
    return y.view(x.shape), (h.view(x.shape) if residual is not None else h), mean, rstd


def layernorm_bwd(dy, dh, h, weight, mean, rstd, has_bias: bool, rms: bool):
    """Gradients (dx, dweight, dbias) of layernorm_fwd; dx also is the residual's gradient. dbias is
    an empty tensor without bias. ``dh``: gradient of the new residual output, or None."""
    N = h.shape[-1]
    h2, dy2 = launch.rows(h), launch.rows(dy)
    dh2 = launch.rows(dh) if dh is not None else None
    M = h2.shape[0]
    dx = torch.empty((M, N), device=h.device, dtype=h.dtype)
    BLOCK_M, BLOCK_N, warps = _tile(N)
    # P programs, each a contiguous band of rows; ~2 per SM keeps every SM busy during the band walk.
    P = max(1, min(triton.cdiv(M, BLOCK_M), launch.num_programs_hint(h, per_sm=2)))
    rows_per_prog = triton.cdiv(triton.cdiv(M, P), BLOCK_M) * BLOCK_M
    P = max(1, triton.cdiv(M, rows_per_prog)) if M else 1
    dw_part = torch.empty((P, N), device=h.device, dtype=torch.float32)
    db_part = torch.empty((P, N) if has_bias else (0,), device=h.device, dtype=torch.float32)
    if M > 0:
        _layernorm_bwd_kernel[(P,)](
            dy2, dh2 if dh2 is not None else dy2, h2, weight, mean if not rms else rstd, rstd, dx,
            dw_part, db_part if has_bias else dw_part,
            dy2.stride(0), dh2.stride(0) if dh2 is not None else 0, h2.stride(0), dx.stride(0),
            M, N, rows_per_prog,
            IS_RMS=rms, HAS_DRES=dh is not None, HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=warps)
    else:
        dw_part.zero_()
        db_part.zero_()
    # Second pass: reduce the (P, N) partial sums over P (P is a few hundred at most).
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else dw_part.new_empty(0)
    return dx.view(h.shape), dw, db


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::layer_norm_triton", mutates_args=())
def _norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], eps: float, rms: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_fwd(x, weight, bias, residual, eps, rms)


@_norm_op.register_fake
def _(x, weight, bias, residual, eps, rms):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)  # row-major, as layernorm_fwd's
    return (x.new_empty(x.shape, dtype=launch.promoted(x, weight) if rms else x.dtype), h,
            x.new_empty(0 if rms else M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("pyllm::layer_norm_triton_bwd", mutates_args=())
def _norm_bwd_op(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                 mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool, rms: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_bwd(dy, dh, h, weight, mean, rstd, has_bias, rms)


@_norm_bwd_op.register_fake
def _(dy, dh, h, weight, mean, rstd, has_bias, rms):
    db = torch.empty_like(weight) if has_bias else weight.new_empty(0)
    return h.new_empty(h.shape), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms = inputs
    _, h, mean, rstd = output
    ctx.has_bias, ctx.has_res, ctx.rms = bias is not None, residual is not None, rms
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh = dh if ctx.has_res else None
    if dy is None:  # only the new residual stream was used downstream
        dy = torch.zeros_like(h)
    dx, dw, db = _norm_bwd_op(dy, dh, h, weight, mean, rstd, ctx.has_bias, ctx.rms)
    return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_res else None), None, None


_norm_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with ``residual`` returns (out, x + residual)."""
    y, h, _, _ = _norm_op(x, weight, bias, residual, eps, False)
    return (y, h) if residual is not None else y


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim; with ``residual`` returns (out, x + residual)."""
    y, h, _, _ = _norm_op(x, weight, None, residual, eps, True)
    return (y, h) if residual is not None else y
