"""The "cuda" backend: the CUDA C++ kernels of ``pyllm._C`` (csrc/cuda).

Like the cpu backend, each op is a ``torch.library`` custom op (``pyllm::<op>_cuda``) with a fake
implementation and a registered autograd formula, called through an autograd.Function in eager mode
(autograd_op.py). Before calling a kernel the wrappers check what the
raw-pointer interface cannot: device (the current CUDA device), dtype (float32/float16/bfloat16; the tensor-core GEMM and
attention take float16/bfloat16), contiguity (inputs are made contiguous, or read through a row stride
where the kernel supports one), 16-byte alignment of every base ptr (the kernels use 128-bit
loads; a misaligned view is copied) and the 32-bit limits of the launch grids and int indices. Inputs
a kernel does not take raise ``Unsupported`` (fallback to the reference, or an error in strict mode).
Kernels run on the current stream and never synchronise with the host.

Not implemented here (the reference runs): rope, softmax, linear_cross_entropy, update_loss_scale_,
attention with doc_ids or a sliding window, head dims other than 64 and 128.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from pyllm import _C  # an ImportError here marks the backend unavailable

from .autograd_op import kernel_op
from .kernel_autograd import (
    ptr,
    rows_and_width,
    attention_fwd_fake,
    attention_bwd_fake,
    attention_setup,
    attention_backward,
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

if not torch.cuda.is_available():
    raise ImportError("no CUDA device visible to torch")
if not getattr(_C, "has_cuda", False):
    raise ImportError("pyllm._C was built without CUDA kernels (no nvcc at build time, or PYLLM_CUDA=0)")

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h
_HALF = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_GRID_Y_MAX = 65535


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _require(op: str, dtypes=tuple(_DTYPE_CODES), **tensors: Optional[Tensor]) -> None:
    """Raise Unsupported unless every given tensor is on the current CUDA device with an accepted dtype.
    The launchers use the current device and its current stream: a tensor on another GPU would be read
    through a pointer that is invalid there."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise Unsupported(f"cuda backend: argument '{name}' of {op} is on {t.device}, needs a CUDA device")
        if t.device.index != torch.cuda.current_device():
            raise Unsupported(f"cuda backend: argument '{name}' of {op} is on {t.device} but the current device "
                              f"is cuda:{torch.cuda.current_device()} (torch.cuda.set_device, or "
                              f"'with torch.cuda.device(...)')")
        if t.dtype not in dtypes:
            raise Unsupported(f"cuda backend: argument '{name}' of {op} is {t.dtype}; this kernel takes "
                              f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")


def _ready(t: Optional[Tensor]) -> Optional[Tensor]:
    """Contiguous and 16-byte aligned (a copy only when the tensor is neither)."""
    if t is None:
        return None
    if not t.is_contiguous() or t.data_ptr() % 16:
        t = t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def _limit(op: str, what: str, value: int, limit: int = _INT32_MAX) -> None:
    """Unsupported when a size exceeds what the kernel's int indices or launch grid can ptr."""
    if value > limit:
        raise Unsupported(f"cuda backend: {op}: {what} is {value}, above the kernel's limit {limit}")


# ------------------------------------------------------------------------------ LayerNorm / RMSNorm


def _norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
          rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, mean, rstd): h = x + residual (empty without residual), fp32 statistics per row."""
    x, residual, weight, bias = _ready(x), _ready(residual), _ready(weight), _ready(bias)
    rows, n = rows_and_width(x)
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = dict(device=x.device, dtype=torch.float32)
    mean, rstd = torch.empty(0 if rms else rows, **stats), torch.empty(rows, **stats)
    _C.cuda_norm_fwd(x.data_ptr(), ptr(residual), weight.data_ptr(), ptr(bias), y.data_ptr(),
                     ptr(h) if residual is not None else 0, ptr(mean) if not rms else 0, rstd.data_ptr(), rows, n,
                     eps, rms, _DTYPE_CODES[x.dtype], _stream())
    return y, h, mean, rstd


def _norm_fwd_fake(x, residual, weight, bias, eps, rms):
    rows = rows_and_width(x)[0]
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            x.new_empty(0 if rms else rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


def _norm_bwd(dy: Tensor, h: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, dh_extra: Optional[Tensor],
              has_bias: bool, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    dy, h, weight, dh_extra = _ready(dy), _ready(h), _ready(weight), _ready(dh_extra)
    rows, n = rows_and_width(h)
    dx, dw = torch.empty_like(h), torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else weight.new_empty(0)
    work = torch.empty(_C.cuda_norm_bwd_workspace(rows, n), device=h.device, dtype=torch.float32)
    _C.cuda_norm_bwd(dy.data_ptr(), h.data_ptr(), weight.data_ptr(), ptr(mean) if not rms else 0, rstd.data_ptr(),
                     ptr(dh_extra), dx.data_ptr(), dw.data_ptr(), ptr(db) if has_bias else 0, work.data_ptr(), rows,
                     n, rms, _DTYPE_CODES[h.dtype], _stream())
    return dx, dw, db


_norm = kernel_op("pyllm::norm_cuda", _norm_fwd, _norm_fwd_fake, norm_setup, norm_backward,
                  bwd_name="pyllm::norm_bwd_cuda", bwd=_norm_bwd, bwd_fake=norm_bwd_fake)


def _check_same_dtype(op, x, **others):
    _require(op, x=x, **others)
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise Unsupported(f"cuda backend: argument '{name}' of {op} is {t.dtype}, the kernel needs x's {x.dtype}")


# norms.cu indexes a row with int: i + one loop stride (256 threads x 8 elements) must stay below 2^31.
_NORM_MAX_WIDTH = _INT32_MAX - 256 * 8


def _check_norm(op, x, **others):
    _check_same_dtype(op, x, **others)
    rows, n = rows_and_width(x)
    _limit(op, "the last dim of argument 'x'", n, _NORM_MAX_WIDTH)
    # rows up to 1024 wide: 8 rows per block of the grid; wider: one block per row
    _limit(op, "the rows of argument 'x'", rows, 8 * _INT32_MAX if n <= 1024 else _INT32_MAX)


@register("layer_norm", "cuda")
def layer_norm(x, weight, bias=None, *, eps=1e-5, residual=None):
    _check_norm("layer_norm", x, weight=weight, bias=bias, residual=residual)
    y, h, _, _ = _norm(x, residual, weight, bias, float(eps), False)
    return (y, h) if residual is not None else y


@register("rms_norm", "cuda")
def rms_norm(x, weight, *, eps=1e-6, residual=None):
    _check_norm("rms_norm", x, weight=weight, residual=residual)
    y, h, _, _ = _norm(x, residual, weight, None, float(eps), True)
    return (y, h) if residual is not None else y


# ------------------------------------------------------------------------------ bias + GELU, SwiGLU


def _bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], tanh: bool) -> Tensor:
    x, bias = _ready(x), _ready(bias)
    rows, n = rows_and_width(x)
    y = torch.empty_like(x)
    _C.cuda_bias_gelu_fwd(x.data_ptr(), ptr(bias), y.data_ptr(), rows, n, tanh, _DTYPE_CODES[x.dtype], _stream())
    return y


def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], tanh: bool) -> tuple[Tensor, Tensor]:
    dy, x, bias = _ready(dy), _ready(x), _ready(bias)
    rows, n = rows_and_width(x)
    dx = torch.empty_like(x)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    work = torch.empty(_C.cuda_bias_gelu_bwd_workspace(rows, n) if bias is not None else 0, device=x.device,
                       dtype=torch.float32)
    _C.cuda_bias_gelu_bwd(dy.data_ptr(), x.data_ptr(), ptr(bias), dx.data_ptr(), ptr(db) if bias is not None else 0,
                          ptr(work) if bias is not None else 0, rows, n, tanh, _DTYPE_CODES[x.dtype], _stream())
    return dx, db


_bias_gelu = kernel_op("pyllm::bias_gelu_cuda", _bias_gelu_fwd, bias_gelu_fwd_fake, bias_gelu_setup,
                       bias_gelu_backward, bwd_name="pyllm::bias_gelu_bwd_cuda", bwd=_bias_gelu_bwd,
                       bwd_fake=bias_gelu_bwd_fake)


@register("bias_gelu", "cuda")
def bias_gelu(x, bias=None, *, approximate="tanh"):
    _check_same_dtype("bias_gelu", x, bias=bias)
    return _bias_gelu(x, bias, approximate == "tanh")


def _strided_rows(t: Tensor) -> tuple[Tensor, int]:
    """(t, row stride) when t's rows are evenly strided with a contiguous last dim and an aligned base,
    else (a contiguous copy, width). Evenly strided = the leading dims flatten to one without a copy (a
    view), which also holds with size-1 dims of any stride (the stride test of each dim against the next
    one did not: (2, 1, 3, n) with strides (S, S, n, 1) passed, and rows were read at r * n)."""
    if t.dim() >= 1 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0:
        try:
            return t, t.view(math.prod(t.shape[:-1]), t.shape[-1]).stride(0)
        except RuntimeError:  # not expressible with one row stride
            pass
    t = _ready(t.contiguous())
    return t, t.shape[-1]


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    (gate, gs), (up, us) = _strided_rows(gate), _strided_rows(up)
    rows, n = rows_and_width(gate)
    y = gate.new_empty(gate.shape)
    _C.cuda_swiglu_fwd(gate.data_ptr(), up.data_ptr(), y.data_ptr(), rows, n, gs, us, _DTYPE_CODES[gate.dtype],
                       _stream())
    return y


def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    (gate, gs), (up, us) = _strided_rows(gate), _strided_rows(up)
    dy = _ready(dy)
    rows, n = rows_and_width(gate)
    dgate, dup = gate.new_empty(gate.shape), gate.new_empty(gate.shape)
    _C.cuda_swiglu_bwd(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(), rows, n, gs, us,
                       _DTYPE_CODES[gate.dtype], _stream())
    return dgate, dup


_swiglu = kernel_op("pyllm::swiglu_cuda", _swiglu_fwd, swiglu_fwd_fake, swiglu_setup, swiglu_backward,
                    bwd_name="pyllm::swiglu_bwd_cuda", bwd=_swiglu_bwd, bwd_fake=swiglu_bwd_fake)


@register("swiglu", "cuda")
def swiglu(gate, up):
    _check_same_dtype("swiglu", gate, up=up)
    return _swiglu(gate, up)


# ------------------------------------------------------------------------------- cross-entropy


def _cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float) -> tuple[Tensor, Tensor]:
    """logits (rows, V), target (rows,) int64 -> (loss per row, lse per row), fp32. A target outside
    [0, V) that is not ignore_index gives a nan loss for its row (checked on the device, no sync)."""
    logits, target = _ready(logits), target.contiguous()  # target (rows,) int64
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _C.cuda_cross_entropy_fwd(logits.data_ptr(), target.data_ptr(), loss.data_ptr(), lse.data_ptr(), rows, vocab,
                              ignore_index, label_smoothing, z_loss, _DTYPE_CODES[logits.dtype], _stream())
    return loss, lse


def _cross_entropy_fwd_fake(logits, target, ignore_index, label_smoothing, z_loss):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


def _cross_entropy_bwd(grad: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float) -> Tensor:
    grad_stride = 0 if grad.dim() == 1 and grad.stride(0) == 0 else 1  # expanded from a sum/mean
    grad = grad.float() if grad_stride == 0 else grad.float().contiguous()
    logits, target = _ready(logits), target.contiguous()  # the kernel reads target[row]: no stride
    rows, vocab = logits.shape
    dlogits = torch.empty_like(logits)
    _C.cuda_cross_entropy_bwd(logits.data_ptr(), target.data_ptr(), lse.data_ptr(), grad.data_ptr(), grad_stride,
                              dlogits.data_ptr(), rows, vocab, ignore_index, label_smoothing, z_loss,
                              _DTYPE_CODES[logits.dtype], _stream())
    return dlogits


_cross_entropy = kernel_op("pyllm::cross_entropy_cuda", _cross_entropy_fwd, _cross_entropy_fwd_fake,
                           cross_entropy_setup, cross_entropy_backward, bwd_name="pyllm::cross_entropy_bwd_cuda",
                           bwd=_cross_entropy_bwd, bwd_fake=cross_entropy_bwd_fake)


@register("cross_entropy", "cuda")
def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    _require("cross_entropy", logits=logits)
    vocab = logits.shape[-1]
    logits2d, target1d = logits.reshape(-1, vocab), target.reshape(-1).long()
    _limit("cross_entropy", "the rows of argument 'logits'", logits2d.shape[0])
    loss, _ = _cross_entropy(logits2d, target1d, int(ignore_index), float(label_smoothing), float(z_loss))
    return reduce_cross_entropy(loss, target1d, ignore_index, reduction)


# ----------------------------------------------------------------------------- GEMM and linear


def _gemm_fwd(a: Tensor, b: Tensor, bias: Optional[Tensor], b_is_nk: bool, activation: int) -> Tensor:
    """act(a (M, K) @ B + bias): B is b (N, K) when b_is_nk else b (K, N). activation 0/1/2: none/gelu/tanh."""
    a, b, bias = _ready(a), _ready(b), _ready(bias)
    M, K = a.shape
    N = b.shape[0] if b_is_nk else b.shape[1]
    c = a.new_empty((M, N))
    _C.cuda_gemm(a.data_ptr(), b.data_ptr(), ptr(bias), c.data_ptr(), M, N, K, b_is_nk, activation,
                 _DTYPE_CODES[a.dtype], _stream())
    return c


def _gemm_fwd_fake(a, b, bias, b_is_nk, activation):
    return a.new_empty((a.shape[0], b.shape[0] if b_is_nk else b.shape[1]))


def _gemm_setup(ctx, inputs, output):
    # Not only for calls that need gradients (autograd_op's Function also runs under functorch transforms,
    # and ran for every eager call before it skipped graph-free ones): refuse the activation only in backward.
    a, b, bias, b_is_nk, activation = inputs
    ctx.save_for_backward(a, b)
    ctx.b_is_nk, ctx.has_bias, ctx.activation = b_is_nk, bias is not None, activation


def _gemm_backward(ctx, gemm, dc):
    if ctx.activation:
        raise RuntimeError("pyllm::gemm_cuda with a fused activation is forward-only; linear() splits it for autograd")
    a, b = ctx.saved_tensors  # dc as given: _gemm_fwd makes it contiguous (not here: FakeTensors under compile)
    if ctx.b_is_nk:  # c = a b^T: da = dc b (b is (N, K): a (K=N_inner, N_out=K) row-major operand)
        da = gemm(dc, b, None, False, 0)
        db = dc.t() @ a  # (N, K): the weight gradient through cuBLAS (a transposed operand)
    else:  # c = a b: da = dc b^T (b (K, N) is an (N_out=K, K_inner=N) operand), db = a^T dc
        da = gemm(dc, b, None, True, 0)
        db = a.t() @ dc
    dbias = dc.sum(0) if ctx.has_bias else None
    return da, db, dbias, None, None


_gemm = kernel_op("pyllm::gemm_cuda", _gemm_fwd, _gemm_fwd_fake, _gemm_setup, _gemm_backward)


def _check_gemm(op, a, b, bias, b_is_nk):
    _require(op, _HALF, a=a, b=b, bias=bias)
    if b.dtype != a.dtype or (bias is not None and bias.dtype != a.dtype):
        raise Unsupported(f"cuda backend: {op} needs one dtype for all operands")
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") != a.dtype:
        # F.linear would cast the operands to the autocast dtype and return that: the reference does it
        raise Unsupported(f"cuda backend: {op} on {a.dtype} operands under {torch.get_autocast_dtype('cuda')} "
                          "autocast")
    K = a.shape[-1]
    N = b.shape[0] if b_is_nk else b.shape[1]
    if K % 8 or N % 8:
        raise Unsupported(f"cuda backend: {op} needs the inner dim K={K} and output dim N={N} to be multiples of 8 "
                          f"(16-byte rows for cp.async, in the forward and the backward)")
    M = math.prod(a.shape[:-1])  # not numel // K: that is 0 for K == 0 whatever the rows
    for name, v in ((f"the rows M of argument '{'x' if b_is_nk else 'a'}'", M), ("the output dim N", N),
                    ("the inner dim K", K)):
        _limit(op, name, v)
    _limit(op, "the row tiles ceil(M / 128) (grid y)", -(-M // 128), _GRID_Y_MAX)


@register("matmul", "cuda")
def matmul(a, b):
    _check_gemm("matmul", a, b, None, False)
    return _gemm(a, b, None, False, 0)


_ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2}


@register("linear", "cuda")
def linear(x, weight, bias=None, *, activation=None):
    _check_gemm("linear", x, weight, bias, True)
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not reshape(-1, K): ambiguous when K == 0
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if activation is None or not needs_grad:  # inference: bias and activation in the GEMM epilogue
        y = _gemm(x2d, weight, bias, True, _ACTIVATION_CODES[activation])
    else:  # training: keep the pre-activation for the backward; the GELU kernel fuses bias + activation
        y = _bias_gelu(_gemm(x2d, weight, None, True, 0), bias, activation == "gelu_tanh")
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------- attention


def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 forward: (o like q, lse (B, Hq, T) fp32)."""
    q, k, v = _ready(q), _ready(k), _ready(v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    _C.cuda_attention_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), B, Hq, Hkv, T, S, D,
                          scale, causal, _DTYPE_CODES[q.dtype], _stream())
    return o, lse


def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                   causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    do, q, k, v = _ready(do), _ready(q), _ready(k), _ready(v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # with no queries the kernel does not run, and keys/values get zero gradient, not uninitialised memory
    alloc = torch.zeros_like if B * Hq * T == 0 else torch.empty_like
    dq = (torch.zeros_like if S == 0 else torch.empty_like)(q)  # no keys: the kernel returns before writing dq
    dk, dv = alloc(k), alloc(v)
    work = torch.empty(_C.cuda_attention_bwd_workspace(B, Hq, T, D), device=q.device, dtype=torch.float32)
    _C.cuda_attention_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), do.data_ptr(),
                          dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), work.data_ptr(), B, Hq, Hkv, T, S, D, scale,
                          causal, _DTYPE_CODES[q.dtype], _stream())
    return dq, dk, dv


_attention = kernel_op("pyllm::attention_cuda", _attention_fwd, attention_fwd_fake, attention_setup,
                       attention_backward, bwd_name="pyllm::attention_bwd_cuda", bwd=_attention_bwd,
                       bwd_fake=attention_bwd_fake)


@register("attention", "cuda")
def attention(q, k, v, *, causal=True, softmax_scale=None, doc_ids=None, window=None):
    _require("attention", _HALF, q=q, k=k, v=v)
    if doc_ids is not None or window is not None:
        raise Unsupported("cuda backend: attention with doc_ids or a sliding window is not implemented")
    B, Hq, T, D = q.shape
    if D not in (64, 128):
        raise Unsupported(f"cuda backend: attention head dim {D} (the kernel has 64 and 128)")
    _limit("attention", "batch x query heads of argument 'q' (grid y)", B * Hq, _GRID_Y_MAX)
    # a key tile's start n0 + 64 must stay in int range
    _limit("attention", "the positions S of argument 'k'", k.shape[2], _INT32_MAX - 64)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    return _attention(q, k, v, float(scale), bool(causal))[0]


# ------------------------------------------------------------------------ optimiser and scaling


def _host_table(tensors: Sequence[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _device_scalar(value, device, name: str = "scalar") -> tuple[float, int, Optional[Tensor]]:
    """(host value, device ptr, keep-alive tensor): a CUDA tensor is read by the kernel, no sync. A tensor
    on another device (a CPU flag with CUDA parameters, another GPU) would hand the kernel a pointer it
    cannot read: Unsupported."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise Unsupported(f"cuda backend: '{name}' must hold one value, it has {value.numel()}")
        if value.device.type == "cuda" and value.device == device:
            t = value.reshape(1).float().contiguous()
            return 0.0, t.data_ptr(), t
        if value.device.type == "cuda":
            raise Unsupported(f"cuda backend: '{name}' is on {value.device}, the tensors on {device}")
    return float(value), 0, None


def _check_list(op, dtypes, **lists):
    for name, lst in lists.items():
        for i, t in enumerate(lst or ()):
            _require(op, dtypes, **{f"{name}[{i}]": t})
            if not t.is_contiguous():
                raise Unsupported(f"cuda backend: argument '{name}[{i}]' of {op} is not contiguous")


@register("adamw_step", "cuda")
@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
               master_params=None, found_inf=None):
    _check_list("adamw_step", tuple(_DTYPE_CODES), params=params, grads=grads)
    _check_list("adamw_step", (torch.float32,), exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                master_params=master_params)
    device = params[0].device
    lr_value, lr_ptr, lr_keep = _device_scalar(lr, device, "lr")
    step_value, step_ptr, step_keep = _device_scalar(step, device, "step")
    if found_inf is not None and (found_inf.device != device or found_inf.numel() != 1):
        raise Unsupported(f"cuda backend: adamw_step's 'found_inf' must be one value on {device} (the kernel reads "
                          f"it there), got {found_inf.numel()} on {found_inf.device}")
    found = found_inf.reshape(1).float().contiguous() if found_inf is not None else None
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):  # one launch sequence per (param, grad) dtype pair
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    for (p_dtype, g_dtype), idx in groups.items():
        pick = lambda lst: [lst[i] for i in idx]  # noqa: E731
        tables = [_host_table(pick(lst)) for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        master = _host_table(pick(master_params)) if master_params is not None else None
        sizes = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64)
        _C.cuda_adamw(tables[0].data_ptr(), ptr(master), tables[1].data_ptr(), tables[2].data_ptr(),
                      tables[3].data_ptr(), sizes.data_ptr(), len(idx), lr_value, lr_ptr, beta1, beta2, eps,
                      weight_decay, step_value, step_ptr, ptr(found), _DTYPE_CODES[p_dtype], _DTYPE_CODES[g_dtype],
                      _stream())
    del lr_keep, step_keep  # the kernels are enqueued; the caching allocator keeps the memory stream-ordered
    return None


@register("unscale_and_check_", "cuda")
@torch.no_grad()
def unscale_and_check_(grads, inv_scale, found_inf):
    _check_list("unscale_and_check_", tuple(_DTYPE_CODES), grads=grads)
    _require("unscale_and_check_", (torch.float32,), found_inf=found_inf)
    if not found_inf.is_contiguous():
        raise Unsupported("cuda backend: 'found_inf' of unscale_and_check_ is not contiguous")
    if grads and found_inf.device != grads[0].device:
        raise Unsupported(f"cuda backend: 'found_inf' is on {found_inf.device}, the gradients on {grads[0].device}")
    inv_value, inv_ptr, inv_keep = _device_scalar(inv_scale, found_inf.device, "inv_scale")
    groups: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    for dtype, lst in groups.items():
        table = _host_table(lst)
        sizes = torch.tensor([g.numel() for g in lst], dtype=torch.int64)
        _C.cuda_unscale_check(table.data_ptr(), sizes.data_ptr(), len(lst), inv_value, inv_ptr, found_inf.data_ptr(),
                              _DTYPE_CODES[dtype], _stream())
    del inv_keep
    return None
