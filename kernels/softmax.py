"""Row softmax over the last dim, forward and backward, fp32 inside.

Algorithm. One program per row. A row that fits one block (N <= BLOCK_N) is loaded once, reduced in
registers and written: one read, one write, the memory-bound minimum. Longer rows (vocabularies)
take two sweeps: the first keeps an online running max and rescaled sum (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax"), the second writes exp(x - max) / sum.
Backward: dx = y * (dy - sum(dy * y)), from the saved output y (same one- or two-sweep structure).

Limits: any row length (chunked); output in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

MAX_SINGLE_BLOCK = 8192  # longest row kept in registers in one block; longer rows are chunked


@triton.jit
def _softmax_fwd_kernel(X, Y, stride_x, stride_y, N, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(Y + row * stride_y + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)  # per-lane running max and sum
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + row * stride_x + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # lanes that have seen only -inf keep s = 0 (shift by 0 rather than form -inf - -inf)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - row_max), axis=0)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + row * stride_x + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            y = tl.exp(x - row_max) / total
            tl.store(Y + row * stride_y + start + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(DY, Y, DX, stride_dy, stride_y, stride_dx, N, SINGLE: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < N
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(dy * y, axis=0))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + row * stride_y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + row * stride_y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + start + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)


def unsupported_reason(x: torch.Tensor) -> str | None:
    if x.dtype == torch.float64:
        return "float64 is not supported by the Triton softmax"
    return None



def _block(N: int) -> tuple[bool, int]:
    """(single-block?, BLOCK_N) for a row of N."""
    if N <= MAX_SINGLE_BLOCK:
        return True, triton.next_power_of_2(max(N, 1))
    return False, 1024 if launch.INTERPRET else 4096


def softmax_fwd(x):
    N = x.shape[-1]
    x2 = launch.rows(x)
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    single, BLOCK_N = _block(N)
    if M and N:
        _softmax_fwd_kernel[(M,)](x2, y, x2.stride(0), y.stride(0), N, SINGLE=single, BLOCK_N=BLOCK_N,
                                  num_warps=launch.num_warps_for(BLOCK_N))
    return y.view(x.shape)


def softmax_bwd(dy, y):
    N = y.shape[-1]
    y2, dy2 = launch.rows(y), launch.rows(dy)
    M = y2.shape[0]
    dx = torch.empty((M, N), device=y.device, dtype=y.dtype)
    single, BLOCK_N = _block(N)
    if M and N:
        _softmax_bwd_kernel[(M,)](dy2, y2, dx, dy2.stride(0), y2.stride(0), dx.stride(0), N, SINGLE=single,
                                  BLOCK_N=BLOCK_N, num_warps=launch.num_warps_for(BLOCK_N))
    return dx.view(y.shape)


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::softmax_triton", mutates_args=())
def _softmax_op(x: torch.Tensor) -> torch.Tensor:
    return softmax_fwd(x)


@_softmax_op.register_fake
def _(x):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


@torch.library.custom_op("pyllm::softmax_triton_bwd", mutates_args=())
def _softmax_bwd_op(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return softmax_bwd(dy, y)


@_softmax_bwd_op.register_fake
def _(dy, y):
    return torch.empty(y.shape, device=y.device, dtype=y.dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(dy, y)


_softmax_op.register_autograd(_backward, setup_context=_setup)


def softmax(x):
    """Softmax over the last dim."""
    return _softmax_op(x)
