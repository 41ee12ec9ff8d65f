"""The "cpu" backend: the C++ kernels of ``pyllm._C`` (csrc/cpu) for float32 (and bfloat16) CPU tensors.

Each op is a ``torch.library`` custom op (``pyllm::<op>_cpu`` and its backward ``pyllm::<op>_bwd_cpu``)
with a fake implementation, so ``torch.compile`` traces over it, and with its autograd formula
registered; in eager mode the same implementations run through an autograd.Function (autograd_op.py).
The fakes and save/backward rules shared with the cuda backend live in kernel_autograd.py.
The public wrappers (``@register(op, "cpu")``) raise ``Unsupported`` before any work for tensors the
kernels do not take (not on the CPU, or a dtype the kernel lacks), so the dispatcher falls back to the
reference. The row ops (norms, bias_gelu, swiglu, softmax, cross_entropy) take float32 and bfloat16 in
any mix, compute in float32 and give the output dtypes of the reference (torch's type promotion: a
bfloat16 activation plus a float32 residual gives float32), which is what a CPU bf16 autocast run feeds
them; attention and rope take float32 or bfloat16 q, k, v (rope's cos/sin widened to float32);
linear_cross_entropy runs its GEMMs in bfloat16 under bf16 autocast or on bfloat16 inputs; AdamW and
loss scaling take float32 only. The kernels index with int64, so there is no 32-bit size limit here;
they read unaligned memory, so alignment is not required; inputs are made contiguous (a no-op for the
model's tensors) except where a kernel reads strides itself (swiglu's chunked halves, rope's q/k views,
attention's heads).

Attention takes every mask of the reference (causal, document ids, sliding window) at any T and S
(csrc/cpu/attention.cpp: O(S D) scratch per thread in the forward, fixed 64 x 256 tiles in the
backward). It reads q, k, v through their strides (no copies of the model's head views) and, when they
are the head views of one fused qkv projection, returns that projection's gradient in one tensor (see
_fused_qkv; SwiGLU likewise for the halves of one projection, _fused_projection): the views themselves are
then not in the autograd graph (no gradient, hook or retain_grad on them; see pyllm.ops.attention).
linear (and linear_cross_entropy's GEMMs) in float32 run through oneDNN where the CPU is not Intel's and has
AVX2 or AVX-512 (PyTorch's MKL runs its generic AVX2 code there), else through MKL: see "linear (GEMMs)" below.
Not here, so the reference runs: matmul and the loss-scale update (a few scalars).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import _C  # an ImportError here marks the backend unavailable

# PYLLM_CPU_ISA=base|avx2|avx512 picks the kernels' instruction set (csrc/cpu/dispatch.cpp reads it; with
# base the fp32 GEMMs also take MKL, see _use_onednn); one this CPU cannot run is refused here.
_ISA_WANTED = os.environ.get("PYLLM_CPU_ISA")
if _ISA_WANTED and _C.cpu_isa() != _ISA_WANTED:
    raise ValueError(f"PYLLM_CPU_ISA={_ISA_WANTED!r}: this CPU runs the {', '.join(_C.cpu_supported_isas())} kernels")

from . import reference
from .autograd_op import kernel_op
from .kernel_autograd import (
    ptr,
    rows_and_width,
    bias_gelu_fwd_fake,
    bias_gelu_bwd_fake,
    bias_gelu_setup,
    bias_gelu_backward,
    cross_entropy_bwd_fake,
    cross_entropy_setup,
    cross_entropy_backward,
    norm_bwd_fake,
    norm_backward,
    norm_setup,
    reduce_cross_entropy,
    swiglu_fwd_fake,
    swiglu_bwd_fake,
    swiglu_setup,
    swiglu_backward,
)
from .registry import Unsupported, register

_F32 = torch.float32
_CODES = {torch.float32: 0, torch.bfloat16: 2}  # dtype codes of csrc/common/dtype.h: what the row kernels take


def _threads() -> int:
    return torch.get_num_threads()


def _t(t: Optional[Tensor]) -> tuple[int, int]:
    """A tensor as the row kernels take it: (address, dtype code); (0, 0) for an absent optional tensor."""
    return (0, 0) if t is None else (t.data_ptr(), _CODES[t.dtype])


def _require_rows_cpu(op: str, **tensors: Optional[Tensor]) -> None:
    """Raise Unsupported (-> fallback to the reference) unless every given tensor is float32 or bfloat16 on
    the CPU (the row kernels' dtypes)."""
    for name, t in tensors.items():
        if t is None or (t.dtype in _CODES and t.is_cpu):
            continue
        if t.device.type != "cpu":
            raise Unsupported(f"cpu backend: argument '{name}' of {op} is on {t.device}, needs the CPU")
        raise Unsupported(f"cpu backend: argument '{name}' of {op} is {t.dtype}, the C++ CPU kernels take float32 "
                          f"or bfloat16")


def _promote(a: Tensor, b: Optional[Tensor]) -> torch.dtype:
    return a.dtype if b is None or b.dtype is a.dtype else torch.promote_types(a.dtype, b.dtype)


def _require_f32_cpu(op: str, **tensors: Optional[Tensor]) -> None:
    """Raise Unsupported (-> fallback to the reference) unless every given tensor is float32 on the CPU."""
    for name, t in tensors.items():
        if t is None or (t.dtype is _F32 and t.is_cpu):  # the common case, without building a device object
            continue
        if t.device.type != "cpu":
            raise Unsupported(f"cpu backend: argument '{name}' of {op} is on {t.device}, needs the CPU")
        if t.dtype != _F32:
            raise Unsupported(f"cpu backend: argument '{name}' of {op} is {t.dtype}, the C++ CPU kernels take float32")


def _row_stride(t: Tensor) -> Optional[int]:
    """The row stride of ``t`` seen as (rows, last dim) if its last dim is contiguous and the leading dims
    collapse into one (true for the chunks of a fused projection), else None."""
    if t.dim() == 0:
        return 1
    if t.dim() == 1:  # one row: its elements must be adjacent (x[:, 0] of a matrix is not)
        return t.shape[0] if t.shape[0] <= 1 or t.stride(0) == 1 else None
    if t.stride(-1) != 1:
        return None
    for i in range(t.dim() - 2):
        if t.shape[i] != 1 and t.stride(i) != t.stride(i + 1) * t.shape[i + 1]:
            return None
    return t.stride(-2)


# ------------------------------------------------------------------------------ LayerNorm / RMSNorm


def _norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
          rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, mean, rstd): h = x + residual (empty without residual), statistics per row."""
    x, weight = x.contiguous(), weight.contiguous()
    residual = residual.contiguous() if residual is not None else None
    bias = bias.contiguous() if bias is not None else None
    rows, n = rows_and_width(x)
    h_dtype, y_dtype = _norm_dtypes(x, residual, weight, rms)
    y = torch.empty_like(x, dtype=y_dtype)
    h = torch.empty_like(x, dtype=h_dtype) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=_F32)
    rstd = x.new_empty(rows, dtype=_F32)
    _C.cpu_norm_fwd(_t(x), _t(residual), _t(weight), _t(bias), _t(y), _t(h) if residual is not None else (0, 0),
                    mean.data_ptr(), rstd.data_ptr(), rows, n, eps, rms, _threads())
    return y, h, mean, rstd


def _norm_dtypes(x: Tensor, residual: Optional[Tensor], weight: Tensor, rms: bool) -> tuple[torch.dtype, torch.dtype]:
    """The reference's dtypes of h = x + residual and of the output: LayerNorm keeps h's, RMSNorm's
    ``normed * weight`` promotes with the weight's."""
    h_dtype = _promote(x, residual)
    return h_dtype, (torch.promote_types(h_dtype, weight.dtype) if rms else h_dtype)


def _norm_fwd_fake(x, residual, weight, bias, eps, rms):
    rows = rows_and_width(x)[0]
    h_dtype, y_dtype = _norm_dtypes(x, residual, weight, rms)
    return (torch.empty_like(x, dtype=y_dtype),
            torch.empty_like(x, dtype=h_dtype) if residual is not None else x.new_empty(0),
            x.new_empty(0 if rms else rows, dtype=_F32), x.new_empty(rows, dtype=_F32))


def _norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dh_extra: Optional[Tensor],
              has_bias: bool, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dbias is empty without bias. dh_extra: gradient reaching h directly."""
    dy, h, weight = dy.contiguous(), h.contiguous(), weight.contiguous()
    dh_extra = dh_extra.contiguous() if dh_extra is not None else None
    rows, n = rows_and_width(h)
    dx = torch.empty_like(h)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else weight.new_empty(0)
    _C.cpu_norm_bwd(_t(dy), _t(h), _t(weight), ptr(mean if not rms else None), rstd.data_ptr(), _t(dh_extra),
                    _t(dx), _t(dw), _t(db if has_bias else None), rows, n, rms, _threads())
    return dx, dw, db


_norm = kernel_op("pyllm::norm_cpu", _norm_fwd, _norm_fwd_fake, norm_setup, norm_backward,
                  bwd_name="pyllm::norm_bwd_cpu", bwd=_norm_bwd, bwd_fake=norm_bwd_fake)


@register("layer_norm", "cpu")
def layer_norm(x, weight, bias=None, *, eps=1e-5, residual=None):
    _require_rows_cpu("layer_norm", x=x, weight=weight, bias=bias, residual=residual)
    y, h, _, _ = _norm(x, residual, weight, bias, float(eps), False)
    return (y, h) if residual is not None else y


@register("rms_norm", "cpu")
def rms_norm(x, weight, *, eps=1e-6, residual=None):
    _require_rows_cpu("rms_norm", x=x, weight=weight, residual=residual)
    y, h, _, _ = _norm(x, residual, weight, None, float(eps), True)
    return (y, h) if residual is not None else y


# --------------------------------------------------------------------------------- bias + GELU


def _bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], tanh: bool) -> Tensor:
    x = x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    rows, n = rows_and_width(x)
    y = torch.empty_like(x, dtype=_promote(x, bias))
    _C.cpu_bias_gelu_fwd(_t(x), _t(bias), _t(y), rows, n, tanh, _threads())
    return y


def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], tanh: bool) -> tuple[Tensor, Tensor]:
    """Returns (dx, dbias); dbias is empty without bias."""
    dy, x = dy.contiguous(), x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    rows, n = rows_and_width(x)
    dx = torch.empty_like(x)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    _C.cpu_bias_gelu_bwd(_t(dy), _t(x), _t(bias), _t(dx), _t(db if bias is not None else None), rows, n, tanh,
                         _threads())
    return dx, db


_bias_gelu = kernel_op("pyllm::bias_gelu_cpu", _bias_gelu_fwd, bias_gelu_fwd_fake, bias_gelu_setup,
                       bias_gelu_backward, bwd_name="pyllm::bias_gelu_bwd_cpu", bwd=_bias_gelu_bwd,
                       bwd_fake=bias_gelu_bwd_fake)


@register("bias_gelu", "cpu")
def bias_gelu(x, bias=None, *, approximate="tanh"):
    _require_rows_cpu("bias_gelu", x=x, bias=bias)
    return _bias_gelu(x, bias, approximate == "tanh")


# -------------------------------------------------------------------------------------- SwiGLU


def _strided_rows(t: Tensor) -> tuple[Tensor, int]:
    stride = _row_stride(t)
    return (t, stride) if stride is not None else (t.contiguous(), t.shape[-1])


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    (gate, gs), (up, us) = _strided_rows(gate), _strided_rows(up)
    rows, n = rows_and_width(gate)
    y = gate.new_empty(gate.shape, dtype=_promote(gate, up))
    _C.cpu_swiglu_fwd(_t(gate), _t(up), _t(y), rows, n, gs, us, _threads())
    return y


def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    (gate, gs), (up, us) = _strided_rows(gate), _strided_rows(up)
    dy = dy.contiguous()
    rows, n = rows_and_width(gate)
    dgate, dup = gate.new_empty(gate.shape), up.new_empty(up.shape)
    _C.cpu_swiglu_bwd(_t(dy), _t(gate), _t(up), _t(dgate), _t(dup), rows, n, gs, us, n, _threads())
    return dgate, dup


_swiglu = kernel_op("pyllm::swiglu_cpu", _swiglu_fwd, swiglu_fwd_fake, swiglu_setup, swiglu_backward,
                    bwd_name="pyllm::swiglu_bwd_cpu", bwd=_swiglu_bwd, bwd_fake=swiglu_bwd_fake)


# The model's MLP computes gate, up = fc(x).chunk(2, dim=-1). Given those two views, autograd would
# receive dgate and dup separately and concatenate them into the projection's gradient (a copy of
# 2 x rows x n floats, as costly as the SwiGLU backward itself). When gate and up are exactly the two
# halves of one contiguous (..., 2n) tensor, the op below takes that tensor instead and its backward
# writes dgate and dup straight into the halves of one (..., 2n) gradient: no split, no concatenation.
# The price: the halves' own autograd nodes are left out of the graph, so a gradient with respect to a
# half (torch.autograd.grad(y, gate)), or a hook or retain_grad() on one, never arrives; gradients to the
# tensor they split, and on to the parameters, are exact. No check at call time can tell whether a view
# will be differentiated against later, so the limitation is documented (pyllm.ops.swiglu, attention)
# instead: copies of the views (gate.clone()) or backend="torch" opt out.


def _shared_base(*views: Tensor) -> Optional[Tensor]:
    """The contiguous tensor that all ``views`` are views of, when autograd connects them to it, else None.
    (Views made under no_grad of a tensor that requires grad are not connected: no gradient may reach it.)"""
    base = views[0]._base
    if base is None or any(t._base is not base for t in views) or not base.is_contiguous():
        return None
    if any(t.requires_grad for t in views) and any(t.grad_fn is None for t in views):
        return None
    return base


def _fused_projection(gate: Tensor, up: Tensor) -> Optional[Tensor]:
    """The contiguous (..., 2n) tensor whose last-dim halves are exactly ``gate`` and ``up``, or None."""
    base = _shared_base(gate, up)
    if base is None or gate.shape != up.shape:
        return None
    n = gate.shape[-1]
    if base.numel() != 2 * gate.numel() or _row_stride(gate) != 2 * n or _row_stride(up) != 2 * n:
        return None
    start = base.data_ptr()
    if gate.data_ptr() != start or up.data_ptr() != start + base.element_size() * n:
        return None
    shape = gate.shape[:-1] + (2 * n,)
    return base if base.shape == shape else base.view(shape)


def _swiglu_fused_fwd(gate_up: Tensor) -> Tensor:
    """gate_up (..., 2n) = [gate | up] -> SiLU(gate) * up (..., n)."""
    rows, n2 = rows_and_width(gate_up)
    n = n2 // 2
    y = gate_up.new_empty(gate_up.shape[:-1] + (n,))
    gate, up = _t(gate_up), (gate_up.data_ptr() + gate_up.element_size() * n, _CODES[gate_up.dtype])
    _C.cpu_swiglu_fwd(gate, up, _t(y), rows, n, n2, n2, _threads())
    return y


def _swiglu_fused_fwd_fake(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


def _swiglu_fused_bwd(dy: Tensor, gate_up: Tensor) -> Tensor:
    """The gradient of gate_up (..., 2n): [dgate | dup]."""
    dy = dy.contiguous()
    rows, n2 = rows_and_width(gate_up)
    n = n2 // 2
    d = torch.empty_like(gate_up)
    half = gate_up.element_size() * n  # bytes from the gate half of a row to its up half
    code = _CODES[gate_up.dtype]
    _C.cpu_swiglu_bwd(_t(dy), _t(gate_up), (gate_up.data_ptr() + half, code), _t(d), (d.data_ptr() + half, code),
                      rows, n, n2, n2, n2, _threads())
    return d


def _swiglu_fused_bwd_fake(dy, gate_up):
    return torch.empty_like(gate_up)


def _swiglu_fused_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_fused_backward(ctx, bwd, dy):
    return bwd(dy, *ctx.saved_tensors)


_swiglu_fused = kernel_op("pyllm::swiglu_fused_cpu", _swiglu_fused_fwd, _swiglu_fused_fwd_fake, _swiglu_fused_setup,
                          _swiglu_fused_backward, bwd_name="pyllm::swiglu_fused_bwd_cpu", bwd=_swiglu_fused_bwd,
                          bwd_fake=_swiglu_fused_bwd_fake)


@register("swiglu", "cpu")
def swiglu(gate, up):
    _require_rows_cpu("swiglu", gate=gate, up=up)
    if not torch.compiler.is_compiling():  # dynamo cannot trace ._base; compiled graphs fuse the split themselves
        gate_up = _fused_projection(gate, up)
        if gate_up is not None:
            return _swiglu_fused(gate_up)
    return _swiglu(gate, up)


# ------------------------------------------------------------------------------------- softmax


def _softmax_fwd(x: Tensor) -> Tensor:
    x = x.contiguous()
    rows, n = rows_and_width(x)
    y = torch.empty_like(x)
    _C.cpu_softmax_fwd(_t(x), _t(y), rows, n, _threads())
    return y


def _softmax_fwd_fake(x):
    return torch.empty_like(x)


def _softmax_bwd(dy: Tensor, y: Tensor) -> Tensor:
    dy, y = dy.contiguous(), y.contiguous()
    rows, n = rows_and_width(y)
    dx = torch.empty_like(y)
    _C.cpu_softmax_bwd(_t(dy), _t(y), _t(dx), rows, n, _threads())
    return dx


def _softmax_bwd_fake(dy, y):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, bwd, dy):
    return bwd(dy, *ctx.saved_tensors)


_softmax = kernel_op("pyllm::softmax_cpu", _softmax_fwd, _softmax_fwd_fake, _softmax_setup, _softmax_backward,
                     bwd_name="pyllm::softmax_bwd_cpu", bwd=_softmax_bwd, bwd_fake=_softmax_bwd_fake)


@register("softmax", "cpu")
def softmax(x):
    _require_rows_cpu("softmax", x=x)
    return _softmax(x)


# ------------------------------------------------------------------------------- cross-entropy


def _count_targets(op: str, target: Tensor, vocab: int, ignore_index: int) -> int:
    """The number of rows that count (target != ignore_index). The kernels index logits by target, so
    out-of-range classes are refused here (inside the custom op: torch.compile sees no data-dependent
    branch). One min/max pass decides the common case (no ignored rows, all in range)."""
    if not target.numel():
        return 0
    low, high = (int(v) for v in torch.aminmax(target))
    if 0 <= low and high < vocab and not 0 <= ignore_index < vocab:
        return target.numel()
    valid = target != ignore_index
    if bool(((target < 0) | (target >= vocab)).logical_and_(valid).any()):
        raise ValueError(f"pyllm.ops.{op}: argument 'target' holds class indices outside [0, {vocab}) that are "
                         f"not ignore_index={ignore_index}")
    return int(valid.sum())


def _cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                       z_loss: float) -> tuple[Tensor, Tensor]:
    """logits (rows, V), target (rows,) int64 -> (loss per row, lse per row)."""
    logits, target = logits.contiguous(), target.contiguous()
    rows, vocab = logits.shape
    _count_targets("cross_entropy", target, vocab, ignore_index)
    loss, lse = logits.new_empty(rows, dtype=_F32), logits.new_empty(rows, dtype=_F32)
    _C.cpu_cross_entropy_fwd(_t(logits), target.data_ptr(), loss.data_ptr(), lse.data_ptr(), rows, vocab,
                             ignore_index, label_smoothing, z_loss, _threads())
    return loss, lse


def _cross_entropy_fwd_fake(logits, target, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape[0], dtype=_F32), logits.new_empty(logits.shape[0], dtype=_F32)


def _cross_entropy_bwd(grad: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float) -> Tensor:
    # A gradient broadcast from a sum/mean arrives expanded (stride 0): read its one value per row.
    grad_stride = 0 if grad.dim() == 1 and grad.stride(0) == 0 else 1
    grad = grad if grad_stride == 0 else grad.contiguous()
    logits, target = logits.contiguous(), target.contiguous()  # the saved target may be a strided view
    rows, vocab = logits.shape
    dlogits = torch.empty_like(logits)
    _C.cpu_cross_entropy_bwd(_t(logits), target.data_ptr(), lse.data_ptr(), _t(grad), grad_stride, _t(dlogits),
                             rows, vocab, ignore_index, label_smoothing, z_loss, _threads())
    return dlogits


_cross_entropy = kernel_op("pyllm::cross_entropy_cpu", _cross_entropy_fwd, _cross_entropy_fwd_fake,
                           cross_entropy_setup, cross_entropy_backward, bwd_name="pyllm::cross_entropy_bwd_cpu",
                           bwd=_cross_entropy_bwd, bwd_fake=cross_entropy_bwd_fake)


@register("cross_entropy", "cpu")
def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    _require_rows_cpu("cross_entropy", logits=logits)
    if target.device.type != "cpu":
        raise Unsupported(f"cpu backend: argument 'target' of cross_entropy is on {target.device}")
    vocab = logits.shape[-1]
    logits2d, target1d = logits.reshape(-1, vocab), target.reshape(-1).long()
    loss, _ = _cross_entropy(logits2d, target1d, int(ignore_index), float(label_smoothing), float(z_loss))
    return reduce_cross_entropy(loss, target1d, ignore_index, reduction)


# ------------------------------------------------------------------------------- linear (GEMMs)

# PyTorch's float32 CPU GEMMs (F.linear, torch.mm) call MKL, which runs its AVX2 code on CPUs that are not
# Intel's; oneDNN, also inside PyTorch, runs AVX-512 on any vendor. On this project's 2-core AMD EPYC
# (AVX-512 with full-width FMA units: ~240 GFLOP/s fp32 per core in a register-only FMA loop) MKL reached
# 93-104 GFLOP/s and oneDNN 175-239 on the forward, dX and dW GEMMs of the small models (one thread).
# With AVX2 only (run as such a CPU runs it: ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2,
# ONEDNN_MAX_CPU_ISA=AVX2), oneDNN was still ~15% faster on the forward and dX GEMMs of nanoGPT's model
# (768 x 128 x 384: 644 vs 761 us) and equal on dW; whole fp32 steps 6-8% faster (in-process A/B, 1 and
# 2 threads). So where the CPU is not Intel's and has AVX2 or AVX-512, this backend's float32 GEMMs go
# through oneDNN (torch.ops.mkldnn._linear_pointwise, the op Inductor's CPU backend emits for linear
# layers), which reads a transposed weight operand in place (a transposed left operand it copies: see
# _weight_grad); on Intel's CPUs (MKL's home) and without AVX2, through MKL.
# PYLLM_CPU_GEMM=onednn or mkl forces one. Before its first use the oneDNN path is checked against MKL.
# bfloat16 GEMMs (autocast, bf16 weights) already run in oneDNN inside F.linear.
_onednn: Optional[bool] = None  # decided on first use (tests set it)


@torch.compiler.assume_constant_result  # under torch.compile: decided eagerly, a constant in the graph
def _use_onednn() -> bool:
    global _onednn
    if _onednn is None:
        choice = os.environ.get("PYLLM_CPU_GEMM", "auto")
        if choice not in ("auto", "onednn", "mkl"):
            raise ValueError(f"PYLLM_CPU_GEMM={choice!r}: expected auto, onednn or mkl")
        wanted = choice == "onednn" or (choice == "auto" and _C.cpu_isa() != "base" and _C.cpu_vendor() != "intel")
        _onednn = wanted and _onednn_works()
    return _onednn


def _onednn_works() -> bool:
    """oneDNN's linear agrees with MKL's on a small awkward problem, strided operands included (the op is
    internal to PyTorch: if a release drops or changes it, MKL is used, with a warning)."""
    try:
        gen = torch.Generator().manual_seed(0)
        a, b, bias, u, v = (torch.randn(*s, generator=gen) for s in ((37, 53), (29, 53), (29,), (61, 37), (61, 29)))
        column_major = lambda t: t.t().contiguous().t()  # noqa: E731
        ok = all(torch.allclose(_onednn_nt(x, y, c), F.linear(x, y, c), rtol=1e-4, atol=1e-4)
                 for x, y, c in ((a, b, bias), (column_major(a), b, None), (a, column_major(b), bias),
                                 (u.t(), v.t(), None)))  # the last: the weight gradient's dy^T x
        reason = "it disagrees with MKL on a test GEMM"
    except Exception as e:  # noqa: BLE001 (any failure of an internal op means: do not use it)
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"pyllm cpu backend: oneDNN GEMMs not used ({reason}); using MKL", RuntimeWarning)
    return ok


def _onednn_nt(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


# Each oneDNN call costs ~10 us more than MKL's (4 x 8 x 8: 10.9 vs 1.5 us); GEMMs below about 2^20
# multiply-adds (one decoding step's projections, 8 x 128 x 384: 17.5 vs 11.9 us) stay on MKL
# (16 x 128 x 512: 23.7 vs 25.5 us; 64 x 128 x 512: 48.6 vs 82.9 us; one thread, this AMD EPYC).
_ONEDNN_MIN_MNK = 1 << 20


def _on_onednn(m: int, n: int, k: int) -> bool:
    return m * n * k >= _ONEDNN_MIN_MNK and _use_onednn()


def _gemm_nt(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a (M, K) @ b (N, K)^T + bias (N) in float32, any strides: oneDNN or MKL as chosen above."""
    if _on_onednn(a.shape[0], b.shape[0], a.shape[1]):
        return _onednn_nt(a, b, bias)
    return F.linear(a, b, bias)


def _transposed(t: Tensor) -> Tensor:
    """t^T as a new contiguous tensor: the C++ transpose for a 2-D float32 t with unit column stride
    (768 x 128: 11.5 us vs 38 us for PyTorch's strided copy, one thread, this AMD EPYC), else PyTorch."""
    if t.dim() != 2 or t.dtype is not _F32 or t.stride(1) != 1 or not t.is_cpu:
        return t.t().contiguous()
    rows, cols = t.shape
    out = t.new_empty((cols, rows))
    if t.numel():
        _C.cpu_transpose(t.data_ptr(), t.stride(0), out.data_ptr(), rows, rows, cols, _threads())
    return out


def _weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dy^T x (N, K) for dy (M, N), x (M, K). oneDNN copies a transposed left operand to row-major inside,
    so when copying x^T and the (K, N) result is less than copying dy^T, it computes (x^T dy)^T instead:
    at nanoGPT's MLP (768 x 128 -> 512) 632 -> 547 us, at the pipeline's head (2048 x 128 -> 2048) 9.5 ->
    6.7 ms (one thread, this AMD EPYC)."""
    (M, N), K = dy.shape, x.shape[1]
    if not _on_onednn(M, N, K):
        return dy.t() @ x  # MKL takes transposed operands as they are
    if M * K + K * N < M * N:
        return _transposed(_onednn_nt(_transposed(x), dy.t(), None))
    return _onednn_nt(_transposed(dy), x.t(), None)


def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _gemm_nt(x, weight, bias)


def _linear_fwd_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool,
                has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx = dy W, dweight = dy^T x, dbias = column sums of dy (empty where not needed)."""
    dx = _gemm_nt(dy, weight.t()) if need_dx else dy.new_empty(0)
    dw = _weight_grad(dy, x) if need_dw else dy.new_empty(0)
    return dx, dw, (dy.sum(0) if has_bias else dy.new_empty(0))


def _linear_bwd_fake(dy, x, weight, need_dx, need_dw, has_bias):
    empty = dy.new_empty(0)
    return (torch.empty_like(x) if need_dx else empty, torch.empty_like(weight) if need_dw else empty,
            dy.new_empty(dy.shape[1]) if has_bias else empty)


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, bwd, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad
    dx, dw, db = bwd(dy, x, weight, need_dx, need_dw, ctx.has_bias and need_db)
    return (dx if need_dx else None), (dw if need_dw else None), (db if ctx.has_bias and need_db else None)


_linear = kernel_op("pyllm::linear_cpu", _linear_fwd, _linear_fwd_fake, _linear_setup, _linear_backward,
                    bwd_name="pyllm::linear_bwd_cpu", bwd=_linear_bwd, bwd_fake=_linear_bwd_fake)


@register("linear", "cpu")
def linear(x, weight, bias=None, *, activation=None):
    _require_rows_cpu("linear", x=x, weight=weight, bias=bias)
    if (x.dtype is not _F32 or weight.dtype is not _F32 or (bias is not None and bias.dtype is not _F32)
            or torch.is_autocast_enabled("cpu") or not _use_onednn() or x.numel() == 0 or weight.numel() == 0):
        # MKL, or oneDNN's bf16 GEMM inside F.linear; empty operands (nothing to fuse; a width of 0 gives
        # the bias) as well
        return reference.linear(x, weight, bias, activation)
    K, N = x.shape[-1], weight.shape[0]
    y = _linear(x.reshape(-1, K), weight, bias).view(*x.shape[:-1], N)
    return y if activation is None else bias_gelu(y, None, approximate="tanh" if activation == "gelu_tanh" else "none")


# ------------------------------------------------------------------ linear + cross-entropy (fused)

# Logits per row chunk: 32 MB (8M floats, 16M bf16). Each chunk's weight-gradient GEMM reads and writes
# all of dweight (V x H), so small chunks turn the backward memory-bound at GPT-2's vocabulary: 2M-float
# chunks (41 rows of V=50257) made fwd+bwd 15% slower than eager, 8M ones 6% (one thread, 256 rows); in
# bf16 (all-bf16 inputs, 256 x 768 -> 50257, one thread) 8M-element chunks took 533 ms vs eager's 454,
# 16M-element ones 332 vs 368.
_LCE_CHUNK_BYTES = 1 << 25


def _linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                              label_smoothing: float, z_loss: float, mean: bool, with_grad: bool,
                              bf16: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), target (N,) -> (loss (fp32 scalar, summed or averaged over counted rows),
    dhidden, dweight, dbias) with the gradients of that loss (empty when not with_grad).

    Row chunks of logits are computed by oneDNN or BLAS (as linear's GEMMs), turned into loss and, in
    place, into dlogits by the C++ cross-entropy kernels while still in cache, and folded into the
    gradients by two more GEMMs: the (N, V) logits never exist whole and the backward is only a scaling
    (the Liger-Kernel scheme).
    ``bf16``: the GEMMs and logits in bfloat16 (what bf16 autocast does to the reference's F.linear), the
    weight and bias gradients accumulated over the chunks in fp32, each gradient returned in its
    input's dtype."""
    compute = torch.bfloat16 if bf16 else _F32
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    hc, wc = hidden.to(compute), weight.to(compute)
    bc = bias.to(compute) if bias is not None else None
    rows, vocab = hidden.shape[0], weight.shape[0]
    counted = _count_targets("linear_cross_entropy", target, vocab, ignore_index)
    count = max(counted, 1) if mean else 1
    scale = torch.full((1,), 1.0 / count)
    chunk = max(1, min(rows, _LCE_CHUNK_BYTES // (max(vocab, 1) * (2 if bf16 else 4))))
    dh = torch.empty_like(hidden) if with_grad else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=_F32) if with_grad else hidden.new_empty(0)  # fp32 accumulator
    db = hidden.new_empty(vocab, dtype=_F32) if with_grad and bias is not None else hidden.new_empty(0)
    if with_grad and rows == 0:  # no chunk will write them
        dw.zero_()
        db.zero_()
    total = torch.zeros((), dtype=torch.float64)
    threads = _threads()
    # float32 GEMMs through oneDNN (see linear above), else BLAS
    onednn = compute == _F32 and _on_onednn(chunk, vocab, hidden.shape[1])
    # one chunk of logits, reused: the op's only O(V) scratch (oneDNN allocates its own outputs)
    buffer = hidden.new_empty(0 if onednn else chunk * vocab, dtype=compute)
    with torch.autocast("cpu", enabled=False):  # the dtypes are chosen above; out= needs them as they are
        for start in range(0, rows, chunk):
            h, t = hc[start:start + chunk], target[start:start + chunk]
            n = h.shape[0]
            if onednn:
                logits = _onednn_nt(h, wc, bc)  # (n, V)
            elif bc is not None:
                logits = torch.addmm(bc, h, wc.t(), out=buffer[:n * vocab].view(n, vocab))
            else:
                logits = torch.mm(h, wc.t(), out=buffer[:n * vocab].view(n, vocab))
            loss, lse = logits.new_empty(n, dtype=_F32), logits.new_empty(n, dtype=_F32)
            _C.cpu_cross_entropy_fwd(_t(logits), t.data_ptr(), loss.data_ptr(), lse.data_ptr(), n, vocab,
                                     ignore_index, label_smoothing, z_loss, threads)
            total += loss.sum(dtype=torch.float64)
            if not with_grad:
                continue
            # logits -> dlogits in place (each element is read before it is written)
            _C.cpu_cross_entropy_bwd(_t(logits), t.data_ptr(), lse.data_ptr(), _t(scale), 0, _t(logits), n, vocab,
                                     ignore_index, label_smoothing, z_loss, threads)
            if onednn:
                dh[start:start + n] = _onednn_nt(logits, wc.t(), None)
            elif dh.dtype == compute:
                torch.mm(logits, wc, out=dh[start:start + n])
            else:
                dh[start:start + n] = torch.mm(logits, wc)
            # the first chunk writes the weight gradients, later ones add to them, in fp32
            if compute == _F32 and not onednn and start == 0:
                torch.mm(logits.t(), h, out=dw)
            elif compute == _F32 and not onednn:
                dw.addmm_(logits.t(), h)
            else:  # a oneDNN or bf16 GEMM (fp32 accumulation inside it), summed over the chunks in fp32
                part = _weight_grad(logits, h) if onednn else torch.mm(logits.t(), h)
                if start == 0:
                    dw.copy_(part)
                else:
                    dw += part
            if bias is not None:
                part = logits.sum(0, dtype=_F32)
                if start == 0:
                    db.copy_(part)
                else:
                    db += part
    dw = dw.to(weight.dtype) if with_grad else dw
    db = db.to(bias.dtype) if with_grad and bias is not None else db
    return (total / count).to(_F32), dh, dw, db


def _linear_cross_entropy_fwd_fake(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, mean,
                                   with_grad, bf16):
    return (hidden.new_empty((), dtype=_F32), torch.empty_like(hidden) if with_grad else hidden.new_empty(0),
            torch.empty_like(weight) if with_grad else hidden.new_empty(0),
            torch.empty_like(bias) if with_grad and bias is not None else hidden.new_empty(0))


def _linear_cross_entropy_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])
    # The gradients returned beside the loss are not differentiable outputs; without this autograd would
    # hand the backward a zero tensor for each (one of the size of the weight: 147 MiB for GPT-2's head).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_backward(ctx, _forward, dloss, _ddh, _ddw, _ddb):
    dh, dw, db = ctx.saved_tensors
    if dloss is None:  # the loss itself was not used
        return None, None, None, None, None, None, None, None, None, None
    if not dh.numel() and not dw.numel():
        raise RuntimeError("pyllm.ops.linear_cross_entropy (cpu): gradients were not computed in the forward")
    db = db if ctx.has_bias else None
    # Skip the scaling passes in the usual case loss.backward() (dloss == 1). Reading dloss costs no sync
    # on the CPU; while tracing (torch.compile, opcheck) it is a fake tensor without a value. (No double
    # backward: dh, dw, db were computed in the forward, with no graph to the inputs; autograd_op refuses it.)
    if type(dloss) is not Tensor or float(dloss) != 1.0:
        dh, dw, db = dh * dloss, dw * dloss, (db * dloss if db is not None else None)
    return dh, dw, db, None, None, None, None, None, None, None


_linear_cross_entropy = kernel_op("pyllm::linear_cross_entropy_cpu", _linear_cross_entropy_fwd,
                                  _linear_cross_entropy_fwd_fake, _linear_cross_entropy_setup,
                                  _linear_cross_entropy_backward)


@register("linear_cross_entropy", "cpu")
def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         reduction="mean"):
    _require_rows_cpu("linear_cross_entropy", hidden=hidden, weight=weight, bias=bias)
    if target.device.type != "cpu":
        raise Unsupported(f"cpu backend: argument 'target' of linear_cross_entropy is on {target.device}")
    if reduction == "none":
        raise Unsupported("cpu backend: linear_cross_entropy computes its gradients in the forward, which needs "
                          "a scalar loss (reduction 'mean' or 'sum')")
    # The GEMMs run in bf16 where the reference's F.linear would: under bf16 autocast, or on bf16 inputs
    autocast = torch.is_autocast_enabled("cpu")
    if autocast and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        raise Unsupported(f"cpu backend: linear_cross_entropy under {torch.get_autocast_dtype('cpu')} autocast "
                          f"(the kernels take float32 and bfloat16)")
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:  # no features or no classes: nothing to fuse
        return reference.linear_cross_entropy(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                                              reduction)
    bf16 = autocast or hidden.dtype == torch.bfloat16
    h2d, t1d = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1).long()
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, _, _, _ = _linear_cross_entropy(h2d, weight, bias, t1d, int(ignore_index), float(label_smoothing),
                                          float(z_loss), reduction == "mean", with_grad, bf16)
    return loss


# ---------------------------------------------------------------------------------------- RoPE


def _rope_one(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    y = x.new_empty((B, H, T, D))
    cs_batch_stride = cos.stride(0) if cos.dim() == 3 else 0
    _C.cpu_rope(_t(x), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(), cs_batch_stride, _t(y),
                B, H, T, D, inverse, _threads())
    return y


def _rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rope_one(q, cos, sin, inverse), _rope_one(k, cos, sin, inverse)


def _rope_fwd_fake(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse, ctx.shapes = inverse, (q.shape, k.shape)


def _rope_backward(ctx, rotate, dq, dk):
    cos, sin = ctx.saved_tensors
    dq = dq if dq is not None else cos.new_zeros(ctx.shapes[0])
    dk = dk if dk is not None else cos.new_zeros(ctx.shapes[1])
    dq_in, dk_in = rotate(dq, dk, cos, sin, not ctx.inverse)  # the backward is the rotation by -theta
    return dq_in, dk_in, None, None, None


_rope = kernel_op("pyllm::rope_cpu", _rope_fwd, _rope_fwd_fake, _rope_setup, _rope_backward)


@register("rope", "cpu")
def rope(q, k, cos, sin):
    _require_rows_cpu("rope", q=q, k=k, cos=cos, sin=sin)
    if cos.requires_grad or sin.requires_grad:
        raise Unsupported("cpu backend: rope has no gradient for cos/sin")
    # the kernel takes float32 tables: bfloat16 ones widen exactly ((T, D/2), a small copy)
    return _rope(q, k, cos.float(), sin.float(), False)


# ----------------------------------------------------------------------------------- attention

def _heads(t: Tensor) -> tuple[int, int, int, int, int]:
    """A (B, H, L, D) tensor with unit stride along D as the attention kernels take it: (address, dtype
    code, batch, head and row strides)."""
    return t.data_ptr(), _CODES[t.dtype], t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_out(like: Tensor, B: int, Hq: int, T: int, D: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """o (B, Hq, T, D) laid out as (B, T, Hq, D) in memory: the model's ``o.transpose(1, 2).reshape(B, T, Hq D)``
    is then a view, not a copy."""
    return torch.empty_strided((B, Hq, T, D), (T * Hq * D, D, Hq * D, 1), dtype=dtype or like.dtype,
                               device=like.device)


# A bfloat16 o comes with its float32 values, which the backward uses for Dsum = dO . O: from the rounded
# o, Dsum's cancellation against dP left small dK/dQ entries off by up to ~100x the reference's own bf16
# error (the reference computes in float32 and rounds only its output). The kernel writes the float32 o
# and o is rounded from it (torch's rounding, the kernel's own bit for bit); for a float32 o the third
# output is empty. (Custom ops may not return an alias of another output.)
def _attention_outs(like: Tensor, B: int, Hq: int, T: int, D: int) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, o32): the outputs of the attention forward, o32 the float32 o (empty when o is float32)."""
    o, lse = _attention_out(like, B, Hq, T, D), like.new_empty((B, Hq, T), dtype=_F32)
    o32 = _attention_out(like, B, Hq, T, D, _F32) if o.dtype != _F32 else like.new_empty(0, dtype=_F32)
    return o, lse, o32


def _attention_finish(o: Tensor, o32: Tensor) -> None:
    if o32.numel():
        o.copy_(o32)


def _saved_o(o: Tensor, o32: Tensor) -> Tensor:
    """The o the backward's Dsum is taken from: the float32 one."""
    return o32 if o32.numel() else o


def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, doc_ids: Optional[Tensor], scale: float, causal: bool,
                   window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o (B, Hq, T, D), lse (B, Hq, T) float32, o32: see _attention_outs), lse and o32 saved for the
    backward. q, k, v may be strided views (the kernel reads each head through its strides); doc_ids None or
    (B, S) contiguous int64; window 0 for none."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o, lse, o32 = _attention_outs(q, B, Hq, T, D)
    _C.cpu_attention_fwd(_heads(q), _heads(k), _heads(v), _heads(_saved_o(o, o32)), lse.data_ptr(), B, Hq, Hkv, T,
                         S, D, scale, causal, window, ptr(doc_ids), _threads())
    _attention_finish(o, o32)
    return o, lse, o32


def _attention_fwd_fake(q, k, v, doc_ids, scale, causal, window):
    return _attention_outs(q, *q.shape)


def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, doc_ids: Optional[Tensor],
                   scale: float, causal: bool, window: int) -> tuple[Tensor, Tensor, Tensor]:
    do, q, k, v, o = (_unit_last(t) for t in (do, q, k, v, o))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _C.cpu_attention_bwd(_heads(q), _heads(k), _heads(v), _heads(o), lse.data_ptr(), _heads(do), _heads(dq),
                         _heads(dk), _heads(dv), B, Hq, Hkv, T, S, D, scale, causal, window, ptr(doc_ids), _threads())
    return dq, dk, dv


def _attention_bwd_fake(do, q, k, v, o, lse, doc_ids, scale, causal, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    # the inputs as given: under torch.compile they are FakeTensors here, whose data_ptr() raises, so the
    # backward kernel wrapper makes them contiguous at run time
    q, k, v, doc_ids, *ctx.options = inputs
    o, lse, o32 = output
    ctx.save_for_backward(q, k, v, _saved_o(o, o32), lse, doc_ids)
    ctx.mark_non_differentiable(lse, o32)


def _attention_backward(ctx, bwd, do, _dlse, _do32):
    q, k, v, o, lse, doc_ids = ctx.saved_tensors
    return *bwd(do, q, k, v, o, lse, doc_ids, *ctx.options), None, None, None, None


_attention = kernel_op("pyllm::attention_cpu", _attention_fwd, _attention_fwd_fake, _attention_setup,
                       _attention_backward, bwd_name="pyllm::attention_bwd_cpu", bwd=_attention_bwd,
                       bwd_fake=_attention_bwd_fake)


# The model computes q, k, v as head views of its fused projection: qkv (B, T, (Hq + 2 Hkv) D) viewed as
# (B, T, Hq + 2 Hkv, D), transposed and split along the heads. Given those views, autograd would return
# dq, dk, dv separately and assemble the projection's gradient from them (a concatenation and a
# transposing copy, more time than the attention backward itself at nanoGPT's shape). When q, k, v are
# exactly those views (self-attention, T == S), the op below takes qkv instead: the kernels read the heads
# in place through their strides and the backward writes dq, dk, dv into one (B, T, (Hq + 2 Hkv) D)
# gradient, the projection's. As for SwiGLU above, q, k, v themselves then get no gradient of their own.


def _fused_qkv(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """The contiguous (B, T, (Hq + 2 Hkv) D) tensor of which q, k, v are the head views, or None."""
    base = _shared_base(q, k, v)
    if base is None:
        return None
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    W = (Hq + 2 * Hkv) * D
    if k.shape != (B, Hkv, T, D) or v.shape != k.shape or base.numel() != B * T * W:
        return None
    strides = (T * W, D, W, 1)
    if q.stride() != strides or k.stride() != strides or v.stride() != strides:
        return None
    start, e = base.data_ptr(), base.element_size()
    if q.data_ptr() != start or k.data_ptr() != start + e * Hq * D or v.data_ptr() != start + e * (Hq + Hkv) * D:
        return None
    return base if base.shape == (B, T, W) else base.view(B, T, W)


def _qkv_dims(qkv: Tensor, Hq: int, Hkv: int) -> tuple[int, int, int]:
    """(B, T, D) of a (B, T, (Hq + 2 Hkv) D) tensor."""
    B, T, W = qkv.shape
    return B, T, W // (Hq + 2 * Hkv)


def _qkv_heads(qkv: Tensor, Hq: int, Hkv: int) -> tuple[tuple, tuple, tuple]:
    """The q, k, v heads of a (B, T, (Hq + 2 Hkv) D) tensor, as the kernels take them."""
    _, T, D = _qkv_dims(qkv, Hq, Hkv)
    W = qkv.shape[2]
    start, e, code = qkv.data_ptr(), qkv.element_size(), _CODES[qkv.dtype]
    return tuple((start + e * h0 * D, code, T * W, D, W) for h0 in (0, Hq, Hq + Hkv))


def _attention_qkv_fwd(qkv: Tensor, doc_ids: Optional[Tensor], Hq: int, Hkv: int, scale: float, causal: bool,
                       window: int) -> tuple[Tensor, Tensor, Tensor]:
    B, T, D = _qkv_dims(qkv, Hq, Hkv)
    o, lse, o32 = _attention_outs(qkv, B, Hq, T, D)
    _C.cpu_attention_fwd(*_qkv_heads(qkv, Hq, Hkv), _heads(_saved_o(o, o32)), lse.data_ptr(), B, Hq, Hkv, T, T, D,
                         scale, causal, window, ptr(doc_ids), _threads())
    _attention_finish(o, o32)
    return o, lse, o32


def _attention_qkv_fwd_fake(qkv, doc_ids, Hq, Hkv, scale, causal, window):
    B, T, D = _qkv_dims(qkv, Hq, Hkv)
    return _attention_outs(qkv, B, Hq, T, D)


def _attention_qkv_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, doc_ids: Optional[Tensor], Hq: int,
                       Hkv: int, scale: float, causal: bool, window: int) -> Tensor:
    """The gradient of qkv (B, T, (Hq + 2 Hkv) D): every element is written (dq, dk, dv side by side)."""
    do, o = _unit_last(do), _unit_last(o)
    B, T, D = _qkv_dims(qkv, Hq, Hkv)
    dqkv = torch.empty_like(qkv)
    _C.cpu_attention_bwd(*_qkv_heads(qkv, Hq, Hkv), _heads(o), lse.data_ptr(), _heads(do),
                         *_qkv_heads(dqkv, Hq, Hkv), B, Hq, Hkv, T, T, D, scale, causal, window, ptr(doc_ids),
                         _threads())
    return dqkv


def _attention_qkv_bwd_fake(do, qkv, o, lse, doc_ids, Hq, Hkv, scale, causal, window):
    return torch.empty_like(qkv)


def _attention_qkv_setup(ctx, inputs, output):
    qkv, doc_ids, *ctx.options = inputs
    o, lse, o32 = output
    ctx.save_for_backward(qkv, _saved_o(o, o32), lse, doc_ids)
    ctx.mark_non_differentiable(lse, o32)


def _attention_qkv_backward(ctx, bwd, do, _dlse, _do32):
    qkv, o, lse, doc_ids = ctx.saved_tensors
    return bwd(do, qkv, o, lse, doc_ids, *ctx.options), None, None, None, None, None, None


_attention_qkv = kernel_op("pyllm::attention_qkv_cpu", _attention_qkv_fwd, _attention_qkv_fwd_fake,
                           _attention_qkv_setup, _attention_qkv_backward, bwd_name="pyllm::attention_qkv_bwd_cpu",
                           bwd=_attention_qkv_bwd, bwd_fake=_attention_qkv_bwd_fake)


@register("attention", "cpu")
def attention(q, k, v, *, causal=True, softmax_scale=None, doc_ids=None, window=None):
    _require_rows_cpu("attention", q=q, k=k, v=v)
    scale = float(softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.int64).contiguous()
    options = (scale, bool(causal), int(window or 0))
    if not torch.compiler.is_compiling():  # dynamo cannot trace ._base; compiled graphs take the strided path
        qkv = _fused_qkv(q, k, v)
        if qkv is not None:
            return _attention_qkv(qkv, doc_ids, q.shape[1], k.shape[1], *options)[0]
    return _attention(q, k, v, doc_ids, *options)[0]


# ------------------------------------------------------------------------ optimiser and scaling


def _pointer_table(tensors: Sequence[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _require_f32_cpu_list(op: str, **lists: Optional[Sequence[Tensor]]) -> None:
    for name, lst in lists.items():
        for i, t in enumerate(lst or ()):
            _require_f32_cpu(op, **{f"{name}[{i}]": t})
            if not t.is_contiguous():
                raise Unsupported(f"cpu backend: argument '{name}[{i}]' of {op} is not contiguous")


@register("adamw_step", "cpu")
@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
               master_params=None, found_inf=None):
    _require_f32_cpu_list("adamw_step", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                          master_params=master_params)
    if found_inf is not None and found_inf.device.type != "cpu":
        raise Unsupported(f"cpu backend: 'found_inf' is on {found_inf.device}")
    if found_inf is not None and float(found_inf.reshape(-1)[0]) > 0:
        return None  # overflowed gradients: skip the step, as the reference does
    step = float(step)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    tables = [_pointer_table(lst) for lst in (params, grads, exp_avgs, exp_avg_sqs)]
    master = _pointer_table(master_params) if master_params is not None else None
    _C.cpu_adamw(tables[0].data_ptr(), ptr(master), tables[1].data_ptr(), tables[2].data_ptr(),
                 tables[3].data_ptr(), sizes.data_ptr(), len(params), float(lr), beta1, beta2, eps, weight_decay,
                 1.0 - beta1 ** step, 1.0 - beta2 ** step, _threads())
    return None


@register("unscale_and_check_", "cpu")
@torch.no_grad()
def unscale_and_check_(grads, inv_scale, found_inf):
    _require_f32_cpu_list("unscale_and_check_", grads=grads)
    _require_f32_cpu("unscale_and_check_", found_inf=found_inf)
    sizes = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    table = _pointer_table(grads)
    if _C.cpu_unscale_check(table.data_ptr(), sizes.data_ptr(), len(grads), float(inv_scale), _threads()):
        found_inf.fill_(1.0)
    return None
