"""Fused bias + GELU (tanh or exact) and SwiGLU, forward and backward.

Algorithm. Pointwise over a 2-D row view (M, N) with a row stride, so the column halves of a fused
[gate | up] projection (strided views) are read in place without a copy. Each program handles a
(BLOCK_M rows, BLOCK_N columns) tile (one row of up to 4k columns for wide rows, several rows for
narrow ones); everything is computed in fp32 registers and rounded once.

    GELU exact  y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))          (Hendrycks & Gimpel 2016)
    GELU tanh   y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))    (GPT-2's gelu_new)
    SwiGLU      y = silu(g) * u = g sigmoid(g) u                      (Shazeer 2020)

Backward recomputes the activation from the saved inputs (nothing but the inputs is stored), and the
bias gradient is the column sum of dx, reduced in a second pass (no atomics). tanh is written as
1 - 2 / (exp(2u) + 1) on u clamped to [-20, 20] (exact to fp32 at both tails, no overflow).

Memory-bound: on an H100 the limit is HBM bandwidth; tiles of 1-4k elements with 4-8 warps give
16-byte vector accesses and enough bytes in flight, picked by autotune per N.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

_CONFIGS = launch.configs(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
     for m, n, w in ((1, 1024, 4), (1, 2048, 8), (1, 4096, 8), (2, 2048, 8), (4, 1024, 8), (8, 512, 4))],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=1))


@triton.jit
def _tanh(u):
    # |u| <= 20 keeps exp finite; tanh(20) is 1 to fp32 precision anyway.
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu_value(x, EXACT: tl.constexpr):
    """GELU of fp32 x (also the epilogue of kernels/matmul.py)."""
    if EXACT:
        y = 0.5 * x * (1.0 + tl.erf(x * _INV_SQRT_2))
    else:
        y = 0.5 * x * (1.0 + _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return y


@triton.autotune(configs=_CONFIGS, key=["N", "HAS_BIAS", "EXACT"])
@triton.jit
def _gelu_fwd_kernel(X, B, Y, stride_x, stride_y, M, N,
                     HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = gelu_value(x, EXACT)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["N", "HAS_BIAS", "EXACT"])
@triton.jit
def _gelu_bwd_kernel(DY, X, B, DX, stride_dy, stride_x, stride_dx, M, N,
                     HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    if EXACT:
        grad = 0.5 * (1.0 + tl.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    else:
        t = _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    tl.store(DX + rows * stride_dx + cols, (dy * grad).to(DX.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["N"])
@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["N"])
@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, M, N,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def unsupported_reason(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return "float64 is not supported by the Triton pointwise kernels"
    return None




def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def gelu_fwd(x, bias, exact: bool):
    N = x.shape[-1]
    x2 = launch.rows(x)
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=launch.promoted(x, bias))
    if M and N:
        _gelu_fwd_kernel[_grid(M, N)](x2, bias if bias is not None else x2, y, x2.stride(0), y.stride(0), M, N,
                                      HAS_BIAS=bias is not None, EXACT=exact)
    return y.view(x.shape)


def gelu_bwd(dy, x, bias, exact: bool):
    """(dx, dbias); dbias an empty tensor without bias."""
    N = x.shape[-1]
    x2, dy2 = launch.rows(x), launch.rows(dy)
    M = x2.shape[0]
    # d(x + bias) in the sum's dtype: with a bias wider than x (16-bit x, float32 bias) the bias gradient is
    # summed from it before it is rounded to x's dtype, as the reference's autograd does
    dx = torch.empty((M, N), device=x.device, dtype=launch.promoted(x, bias))
    if M and N:
        _gelu_bwd_kernel[_grid(M, N)](dy2, x2, bias if bias is not None else x2, dx, dy2.stride(0), x2.stride(0),
                                      dx.stride(0), M, N, HAS_BIAS=bias is not None, EXACT=exact)
    # Second pass: the bias gradient is the column sum of dx, accumulated in fp32.
    dbias = dx.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else dx.new_empty(0)
    return dx.to(x.dtype).view(x.shape), dbias


def swiglu_fwd(gate, up):
    N = gate.shape[-1]
    g2, u2 = launch.rows(gate), launch.rows(up)
    M = g2.shape[0]
    y = torch.empty((M, N), device=gate.device, dtype=launch.promoted(gate, up))
    if M and N:
        _swiglu_fwd_kernel[_grid(M, N)](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), M, N)
    return y.view(gate.shape)


def swiglu_bwd(dy, gate, up):
    N = gate.shape[-1]
    g2, u2, dy2 = launch.rows(gate), launch.rows(up), launch.rows(dy)
    M = g2.shape[0]
    dg = torch.empty((M, N), device=gate.device, dtype=gate.dtype)
    du = torch.empty((M, N), device=gate.device, dtype=up.dtype)
    if M and N:
        _swiglu_bwd_kernel[_grid(M, N)](dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0),
                                        dg.stride(0), du.stride(0), M, N)
    return dg.view(gate.shape), du.view(up.shape)


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::bias_gelu_triton", mutates_args=())
def _gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor], exact: bool) -> torch.Tensor:
    return gelu_fwd(x, bias, exact)


@_gelu_op.register_fake
def _(x, bias, exact):
    return x.new_empty(x.shape, dtype=launch.promoted(x, bias))


@torch.library.custom_op("pyllm::bias_gelu_triton_bwd", mutates_args=())
def _gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], exact: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_bwd(dy, x, bias, exact)


@_gelu_bwd_op.register_fake
def _(dy, x, bias, exact):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


def _gelu_setup(ctx, inputs, output):
    x, bias, exact = inputs
    ctx.exact, ctx.has_bias = exact, bias is not None
    ctx.save_for_backward(x, bias)


def _gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _gelu_bwd_op(dy, x, bias, ctx.exact)
    return dx, (dbias if ctx.has_bias else None), None


_gelu_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


@torch.library.custom_op("pyllm::swiglu_triton", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=launch.promoted(gate, up))


@torch.library.custom_op("pyllm::swiglu_triton_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dy, gate, up)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def bias_gelu(x, bias=None, approximate="tanh"):
    """GELU(x + bias); approximate "tanh" or "none" (exact)."""
    return _gelu_op(x, bias, approximate == "none")


def swiglu(gate, up):
    """silu(gate) * up."""
    return _swiglu_op(gate, up)
