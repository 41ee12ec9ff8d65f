"""Every kernel backend on inputs in the layouts models and users hand them, not only contiguous ones:
rows wider than the tensor (a column slice), column-major (a transposed view), a storage offset of one
element (unaligned), rows broadcast with stride 0 (an expanded row), heads as a transposed (B, T, H, D)
view. Each case is the three-way rule of STYLE.md (pyllm.ops.tolerance), outputs and the gradients of
every input, with the layout applied inside the op so that gradients flow back to contiguous leaves.

Found this way (random layouts, then pinned here): the Triton linear_cross_entropy returned its hidden
gradient in transposed order for a column-major hidden; the Triton cross-entropy kernels read a strided
target (a column of a label table) as if contiguous.
"""

from __future__ import annotations

import pytest
import torch

from pyllm import ops
from pyllm.ops.registry import backends, ops_table
from pyllm.ops.tolerance import assert_close

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()


def slice_(t):
    """The same values in rows 3 elements wider than the tensor."""
    return torch.cat([t, torch.zeros(*t.shape[:-1], 3, dtype=t.dtype, device=t.device)], -1)[..., :t.shape[-1]]


def colmajor(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def offset(t):
    """The same values one element into their storage (4 or 8 bytes off any larger alignment)."""
    return torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape)


def expand(t):
    """Every row equal to the first, with row stride 0."""
    return t[:1].expand(t.shape)


def heads(t):
    """(B, H, T, D) seen through a (B, T, H, D) buffer, as the model's head views are."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


ROW_LAYOUTS = {"slice": slice_, "colmajor": colmajor, "offset": offset, "expand": expand}
HEAD_LAYOUTS = {"heads": heads, "slice": slice_, "offset": offset}


def _randn(*shape, scale=1.0):
    return torch.randn(shape, dtype=F64, generator=_GEN) * scale


_GEN = torch.Generator().manual_seed(0)


def _cases():
    """name -> (inputs (float64; integer tensors pass through), op(layout, *inputs, backend))."""
    target = torch.randint(0, 37, (19,), generator=torch.Generator().manual_seed(1))
    target[3] = -100
    cases = {}
    for name, lay in ROW_LAYOUTS.items():
        cases[f"layer_norm-{name}"] = ([_randn(19, 37, scale=2), _randn(37), _randn(37), _randn(19, 37)],
                                       lambda x, w, b, r, backend, lay=lay: ops.layer_norm(
                                           lay(x), w, b, residual=lay(r), backend=backend))
        cases[f"rms_norm-{name}"] = ([_randn(19, 37, scale=2), _randn(37), _randn(19, 37)],
                                     lambda x, w, r, backend, lay=lay: ops.rms_norm(lay(x), w, residual=r,
                                                                                    backend=backend))
        cases[f"bias_gelu-{name}"] = ([_randn(19, 37, scale=3), _randn(37)],
                                      lambda x, b, backend, lay=lay: ops.bias_gelu(lay(x), b, backend=backend))
        cases[f"swiglu-{name}"] = ([_randn(19, 37, scale=3), _randn(19, 37)],
                                   lambda g, u, backend, lay=lay: ops.swiglu(lay(g), lay(u), backend=backend))
        cases[f"softmax-{name}"] = ([_randn(19, 37, scale=3)],
                                    lambda x, backend, lay=lay: ops.softmax(lay(x), backend=backend))
        cases[f"cross_entropy-{name}"] = ([_randn(19, 37, scale=3), target],
                                          lambda x, t, backend, lay=lay: ops.cross_entropy(
                                              lay(x), t, label_smoothing=0.1, backend=backend))
        cases[f"linear-{name}"] = ([_randn(19, 24), _randn(29, 24, scale=0.3), _randn(29)],
                                   lambda x, w, b, backend, lay=lay: ops.linear(lay(x), lay(w), b, activation="gelu",
                                                                                backend=backend))
        cases[f"linear_cross_entropy-{name}"] = ([_randn(19, 24), _randn(37, 24, scale=0.3), target],
                                                 lambda h, w, t, backend, lay=lay: ops.linear_cross_entropy(
                                                     lay(h), lay(w), t, z_loss=1e-3, backend=backend))
    # the target as a column of a (rows, 2) label table (stride 2): the Triton kernels read it as contiguous
    labels = torch.stack([target, torch.zeros_like(target)], 1)
    cases["cross_entropy-strided_target"] = ([_randn(19, 37, scale=3), labels],
                                             lambda x, t, backend: ops.cross_entropy(x, t[:, 0], reduction="none",
                                                                                     backend=backend))
    cases["linear_cross_entropy-strided_target"] = ([_randn(19, 24), _randn(37, 24, scale=0.3), labels],
                                                    lambda h, w, t, backend: ops.linear_cross_entropy(
                                                        h, w, t[:, 0], backend=backend))
    for name, lay in HEAD_LAYOUTS.items():
        theta = torch.rand(13, 8, generator=torch.Generator().manual_seed(2), dtype=F64) * 6
        cases[f"rope-{name}"] = ([_randn(2, 4, 13, 16), _randn(2, 2, 13, 16)],
                                 lambda q, k, backend, lay=lay, c=theta.cos(), s=theta.sin(): ops.rope(
                                     lay(q), lay(k), c.to(q.dtype), s.to(q.dtype), backend=backend))
        cases[f"attention-{name}"] = ([_randn(2, 4, 13, 16), _randn(2, 2, 21, 16), _randn(2, 2, 21, 16)],
                                      lambda q, k, v, backend, lay=lay: ops.attention(lay(q), lay(k), lay(v),
                                                                                      backend=backend))
    return cases


CASES = _cases()


def _run(fn, inputs, dtype, backend, upstream, device):
    leaves = [t.to(device, dtype, copy=True).requires_grad_() if t.is_floating_point() else t.to(device)
              for t in inputs]
    outs = fn(*leaves, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = upstream or [torch.randn(o.shape, dtype=F64, device=device) for o in outs]
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return outs, [t.grad for t in leaves if t.is_floating_point()], upstream


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_on_strided_inputs(case, backend, monkeypatch):
    op = case.split("-")[0]
    if not backends()[backend] == "available":
        pytest.skip(f"{backend} backend {backends()[backend]}")
    if backend not in ops_table().get(op, []):
        pytest.skip(f"{op} has no {backend} kernel")
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    device = "cpu" if backend == "cpu" else "cuda" if HAS_CUDA else "cpu"  # triton: the interpreter on the CPU
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")  # a fallback to the reference would pass without testing
    if backend == "cpu" and op == "linear":
        # the C++ path, every GEMM on oneDNN: with MKL (the choice on Intel CPUs) cpu linear is the reference
        from pyllm.ops import cpu_backend

        monkeypatch.setattr(cpu_backend, "_onednn", True)
        monkeypatch.setattr(cpu_backend, "_ONEDNN_MIN_MNK", 0)
    inputs, fn = CASES[case]
    # the CUDA GEMM and attention kernels take 16-bit inputs only (tensor cores)
    dtype = torch.float16 if backend == "cuda" and op in ("linear", "attention") else torch.float32
    torch.manual_seed(0)
    truth, truth_grads, upstream = _run(fn, inputs, F64, "torch", None, device)
    ref, ref_grads, _ = _run(fn, inputs, dtype, "torch", upstream, device)
    out, grads, _ = _run(fn, inputs, dtype, backend, upstream, device)
    for i, (o, t, r) in enumerate(zip(out, truth, ref)):
        assert_close(o.detach(), t.detach(), r.detach(), f"{case} output {i} ({backend})")
    for i, (g, t, r) in enumerate(zip(grads, truth_grads, ref_grads)):
        assert_close(g, t, r, f"{case} gradient {i} ({backend})")


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_rope_leaves_its_inputs_alone_under_no_grad(backend):
    # the op is out of place on every backend: the Triton one rotated q and k in place under no-grad, so a
    # caller's q changed on that backend only, and no-grad views of tensors needing grad became unusable
    if not backends()[backend] == "available":
        pytest.skip(f"{backend} backend {backends()[backend]}")
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    device = "cpu" if backend == "cpu" else "cuda" if HAS_CUDA else "cpu"
    q, k = (torch.randn(2, h, 5, 8, device=device, requires_grad=True) for h in (4, 2))
    theta = torch.rand(5, 4, device=device)
    with torch.no_grad():
        qv, kv = heads(q), heads(k)  # views made under no-grad
        before = qv.clone(), kv.clone()
        out = ops.rope(qv, kv, theta.cos(), theta.sin(), backend=backend)
        ref = ops.rope(before[0], before[1], theta.cos(), theta.sin(), backend="torch")
        truth = ops.rope(*(t.double() for t in (*before, theta.cos(), theta.sin())), backend="torch")
    assert torch.equal(qv, before[0]) and torch.equal(kv, before[1])
    for i, (o, t, r) in enumerate(zip(out, truth, ref)):
        assert_close(o * 1.0, t, r, f"rope output {i} under no-grad ({backend})")  # usable with grad mode on
