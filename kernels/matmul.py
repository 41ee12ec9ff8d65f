"""Tiled matmul with grouped tile ordering, autotuned tiles, fp32 accumulation and a fused epilogue
(bias, GELU exact/tanh, accumulate-into-output), in a one-tile-per-program or a persistent launch;
``linear`` (x W^T + b, activation) with its backward built on it.

Algorithm. C (M, N) = A (M, K) @ B (K, N): each tile of BLOCK_M x BLOCK_N accumulates BLOCK_K slices
of A and B in fp32 (tensor cores for fp16/bf16; exact "ieee" dots for fp32 unless torch allows
TF32). Any strides: transposed operands (W^T of nn.Linear, dZ^T in the weight gradient) are read in
place. Tiles are visited in groups of GROUP_M rows of tiles so that consecutive programs share
A-row and B-column panels in L2 (the ordering of the Triton matmul tutorial). The epilogue runs on
the fp32 accumulator before the single store: + bias, GELU, and ACCUMULATE (C = C + A B, used by the
fused linear + cross-entropy to sum the weight gradient over row chunks in an fp32 buffer).

Persistent variant: the same kernel, launched with one program per SM instead of one per tile;
every program strides over tiles (``for tile in range(pid, n_tiles, n_programs)``), which removes
the tail wave and lets the next tile's loads overlap the previous epilogue. The plain launch is the
degenerate case n_programs == n_tiles, so there is one kernel, not two copies.

Limits: offsets inside one tile are 32-bit (BLOCK x stride < 2^31); tile origins are 64-bit.

Autotune configs are Hopper-oriented (128x256x64 and 256x128x64 with 8 warps and 3 stages for large
bf16 problems, smaller tiles for skinny ones); each config list is tuned per (M, N, K). The
accumulating launch is a separate autotuner over the same kernel with ``restore_value`` so that
benchmarking configs does not add into the output repeatedly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import gelu, launch

ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}

_CONFIGS = launch.configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                              (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                              (64, 64, 64, 4, 5), (32, 64, 64, 4, 5), (64, 32, 128, 4, 4))],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=1))


@triton.jit
def _matmul_kernel_body(A, B, C, BIAS, PRE, M, N, K, M_BUCKET, sam, sak, sbk, sbn, scm, scn, spm, spn,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
                        ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_tiles = n_pid_m * n_pid_n
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        # grouped ordering: GROUP_M tile-rows are swept column by column
        group = tile // (GROUP_M * n_pid_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(n_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * n_pid_n)) % group_m
        pid_n = (tile % (GROUP_M * n_pid_n)) // group_m
        # 64-bit tile origins as scalars; 32-bit offsets inside the tile (half the registers of
        # 64-bit pointer tensors, which made the 128x256 tile spill)
        m_start = (pid_m * BLOCK_M).to(tl.int64)
        n_start = (pid_n * BLOCK_N).to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = (pid_m * BLOCK_M + rm) < M
        n_ok = (pid_n * BLOCK_N + rn) < N
        a_ptr = A + m_start * sam + (rm[:, None] * sam + offs_k[None, :] * sak)
        b_ptr = B + n_start * sbn + (offs_k[:, None] * sbk + rn[None, :] * sbn)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k + k0 < K
            a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptr += BLOCK_K * sak
            b_ptr += BLOCK_K * sbk
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + n_start + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:  # the pre-activation, kept for the activation's backward
            tl.store(PRE + m_start * spm + n_start * spn + (rm[:, None] * spm + rn[None, :] * spn),
                     acc.to(PRE.dtype.element_ty), mask=mask)
        if ACTIVATION == 1:
            acc = gelu.gelu_value(acc, True)
        elif ACTIVATION == 2:
            acc = gelu.gelu_value(acc, False)
        c_ptr = C + m_start * scm + n_start * scn + (rm[:, None] * scm + rn[None, :] * scn)
        if ACCUMULATE:
            acc += tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=mask)


# M (tokens) varies between calls (prefill lengths, batch sizes): tune per power of two of it, not per
# value; N and K are weight dims, fixed per layer.
_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "STORE_PRE"]
_matmul_kernel = triton.autotune(configs=_CONFIGS, key=_KEY)(_matmul_kernel_body)
_matmul_acc_kernel = triton.autotune(configs=_CONFIGS, key=_KEY, restore_value=["C"])(_matmul_kernel_body)


def unsupported_reason(a, b, bias=None) -> str | None:
    """Why the kernel cannot take these operands (None if it can): both dot operands must share one
    dtype (e.g. bf16 activations with fp32 weights outside autocast go to the reference)."""
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return "float64 is not supported by the Triton matmul"
    if a.dtype != b.dtype:
        return f"operand dtypes differ ({a.dtype} and {b.dtype})"
    return None


def _precision(dtype: torch.dtype):
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not launch.INTERPRET else "ieee"


def matmul_into(c, a, b, bias=None, activation: int = 0, pre=None, accumulate: bool = False,
                persistent: bool = False):
    """c = act(a @ b + bias) (or c += a @ b with ``accumulate``); ``pre`` receives a @ b + bias.
    a (M, K), b (K, N), c (M, N): any strides; c may be fp32 while a, b are 16-bit."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c  # (K == 0 needs no case: the K loop is empty and the epilogue sees a zero accumulator)
    kernel = _matmul_acc_kernel if accumulate else _matmul_kernel
    n_prog = launch.num_programs_hint(a, per_sm=1) if persistent else None

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, n_prog) if n_prog else tiles,)

    kernel[grid](a, b, c, bias if bias is not None else c, pre if pre is not None else c, M, N, K,
                 triton.next_power_of_2(M),
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                 pre.stride(0) if pre is not None else 0, pre.stride(1) if pre is not None else 0,
                 HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_PRE=pre is not None,
                 ACCUMULATE=accumulate, PRECISION=_precision(a.dtype))
    return c


def mm(a, b, persistent: bool = False):
    """a @ b in a's dtype."""
    c = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    return matmul_into(c, a, b, persistent=persistent)


# ------------------------------------------------------------------------------- autograd (custom ops)


@torch.library.custom_op("pyllm::matmul_triton", mutates_args=())
def _matmul_op(a: torch.Tensor, b: torch.Tensor, persistent: bool) -> torch.Tensor:
    return mm(a, b, persistent)


@_matmul_op.register_fake
def _(a, b, persistent):
    return a.new_empty((a.shape[0], b.shape[1]))


def _matmul_setup(ctx, inputs, output):
    a, b, ctx.persistent = inputs
    ctx.save_for_backward(a, b)


def _matmul_backward(ctx, dc):
    a, b = ctx.saved_tensors
    return _matmul_op(dc, b.t(), ctx.persistent), _matmul_op(a.t(), dc, ctx.persistent), None


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


@torch.library.custom_op("pyllm::linear_triton", mutates_args=())
def _linear_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: int,
               save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = x2.shape[0], weight.shape[0]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    pre = torch.empty((M, N), device=x2.device, dtype=x2.dtype) if activation and save_pre else x2.new_empty(0)
    matmul_into(y, x2, weight.t(), bias, activation, pre if pre.numel() else None)
    return y, pre


@_linear_op.register_fake
def _(x2, weight, bias, activation, save_pre):
    M, N = x2.shape[0], weight.shape[0]
    return x2.new_empty((M, N)), (x2.new_empty((M, N)) if activation and save_pre else x2.new_empty(0))


@torch.library.custom_op("pyllm::linear_triton_bwd", mutates_args=())
def _linear_bwd_op(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, has_bias: bool,
                   activation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dz = dy if activation == 0 else gelu.gelu_bwd(dy, pre, None, exact=activation == 1)[0]
    dx = mm(dz, weight)  # (M, N) @ (N, K)
    dw = mm(dz.t(), x2)  # (N, M) @ (M, K), dz read transposed in place
    db = dz.sum(0, dtype=torch.float32).to(weight.dtype) if has_bias else dz.new_empty(0)
    return dx, dw, db


@_linear_bwd_op.register_fake
def _(dy, x2, weight, pre, has_bias, activation):
    return torch.empty_like(x2), torch.empty_like(weight), (weight.new_empty(weight.shape[0]) if has_bias
                                                            else weight.new_empty(0))


def _linear_setup(ctx, inputs, output):
    x2, weight, bias, ctx.activation, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x2, weight, output[1])


def _linear_backward(ctx, dy, _dpre):
    x2, weight, pre = ctx.saved_tensors
    dx, dw, db = _linear_bwd_op(dy.contiguous(), x2, weight, pre, ctx.has_bias, ctx.activation)
    return dx, dw, (db if ctx.has_bias else None), None, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def matmul(a, b, persistent: bool = False):
    """a (M, K) @ b (K, N)."""
    return _matmul_op(a, b, persistent)


def linear(x, weight, bias=None, activation=None):
    """activation(x @ weight^T + bias) for x (..., K), weight (N, K)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    y, _ = _linear_op(x2, weight, bias, ACTIVATIONS[activation], save_pre)
    return y.view(*x.shape[:-1], weight.shape[0])
