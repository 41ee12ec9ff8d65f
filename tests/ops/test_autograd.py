"""Autograd contracts of the kernel backends beyond first-order gradients (tests/ops/test_layouts.py has those).

Double backward: the kernels' backward passes are not differentiable, so a gradient of a gradient through
them must raise, not come out without the kernel's second-order term (the cpu backend's did, silently, for
every op, and the Triton linear_cross_entropy: found by fuzzing Hessian-vector products). Triton's other
kernels raise "no autograd formula"; where a kernel's backward is itself differentiable (the Triton rope and
matmul) the result must be right.

Fused views (cpu backend): q, k, v as head views of one qkv projection, and gate/up as the halves of one
projection, are handed to the kernel as that projection, so the views are not in the graph (documented
in pyllm.ops.attention / swiglu); the documented opt-out, copies of the views, must differentiate.
"""

from __future__ import annotations

import pytest
import torch

from pyllm import ops
from pyllm.ops.tolerance import assert_close

_GEN = torch.Generator().manual_seed(0)
X = torch.randn(4, 16, generator=_GEN)  # the input of every case; 16 = 2 x 8: halves, heads, rotations
U = torch.randn(4, 16, generator=_GEN)
W = torch.randn(7, 16, generator=_GEN) * 0.3
T = torch.tensor([1, 6, 0, 3])
THETA = torch.rand(4, 4, generator=_GEN) * 6


def _weighted(y):
    """A scalar whose gradient with respect to y depends on y itself, so the second derivative of the op
    enters both through its saved inputs and through the gradient it receives."""
    return 0.5 * (y * y).sum()


def _like(x, *constants):
    return [c.to(x.dtype) for c in constants]


def _heads(x):
    return x.view(1, 4, 2, 8).transpose(1, 2)  # (B=1, H=2, T=4, D=8), strided views of x


CASES = {
    "layer_norm": lambda x, b: _weighted(ops.layer_norm(x, x.new_ones(16), x.new_zeros(16), backend=b)),
    # a constant upstream gradient: the second derivative enters through the saved x only (missed by
    # torch.autograd.function.once_differentiable, which watches the incoming gradients)
    "layer_norm constant upstream": lambda x, b: (ops.layer_norm(x, x.new_ones(16), x.new_zeros(16), backend=b)
                                                  * U.to(x.dtype)).sum(),
    "rms_norm residual": lambda x, b: _weighted(ops.rms_norm(x, x.new_ones(16), residual=x * 0.5, backend=b)[0]),
    "bias_gelu": lambda x, b: _weighted(ops.bias_gelu(x, None, backend=b)),
    "swiglu": lambda x, b: _weighted(ops.swiglu(x, x * 0.5, backend=b)),
    "swiglu fused halves": lambda x, b: _weighted(ops.swiglu(*(x * 1.0).chunk(2, dim=-1), backend=b)),
    "rope": lambda x, b: _weighted(ops.rope(_heads(x), _heads(x), *_like(x, THETA.cos(), THETA.sin()),
                                            backend=b)[0]),
    "softmax": lambda x, b: _weighted(ops.softmax(x, backend=b)),
    "matmul": lambda x, b: _weighted(ops.matmul(x, *_like(x, W.t().contiguous()), backend=b)),
    "linear": lambda x, b: _weighted(ops.linear(x, *_like(x, W), backend=b)),
    "cross_entropy": lambda x, b: ops.cross_entropy(x, T, backend=b),
    "linear_cross_entropy": lambda x, b: ops.linear_cross_entropy(x, *_like(x, W), T, backend=b),
    "attention": lambda x, b: _weighted(ops.attention(_heads(x), _heads(x * 0.5), _heads(x), backend=b)),
    "attention fused qkv": lambda x, b: _weighted(ops.attention(
        *(x * 1.0).repeat(1, 3).view(1, 4, 6, 8).transpose(1, 2).split(2, dim=1), backend=b)),
}


def _hessian_vector(case, x0, backend):
    x = x0.clone().requires_grad_()
    (g,) = torch.autograd.grad(CASES[case](x, backend), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * U).sum(), x)
    return hv


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_double_backward_raises_or_is_right(case, backend, monkeypatch):
    op = case.split()[0]
    if ops.backends()[backend] != "available":
        pytest.skip(f"{backend} backend {ops.backends()[backend]}")
    if backend not in ops.ops_table()[op]:
        pytest.skip(f"{op} has no {backend} kernel")
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")  # the kernel runs, not the reference
    if backend == "cpu" and op == "linear":
        # the C++ path: with MKL (the choice on Intel CPUs) cpu linear is the reference, which would be
        # compared with itself
        from pyllm.ops import cpu_backend

        monkeypatch.setattr(cpu_backend, "_onednn", True)
        monkeypatch.setattr(cpu_backend, "_ONEDNN_MIN_MNK", 0)
    try:
        got = _hessian_vector(case, X, backend)
    except RuntimeError as e:
        assert "not differentiable" in str(e) or "no autograd formula was registered" in str(e), str(e)
        return
    if op == "attention":  # the reference (SDPA) has no double backward to compare with
        pytest.fail(f"{case} ({backend}) gave a second derivative: compare it with reference.attention_explicit")
    truth = _hessian_vector(case, X.double(), "torch")
    ref = _hessian_vector(case, X, "torch")
    assert_close(got, truth, ref, f"{case} ({backend}) Hessian-vector product")


@pytest.mark.parametrize("op", ["attention", "swiglu"])
def test_cpu_fused_views_and_their_documented_opt_out(op, monkeypatch):
    # Fused: the projection gets the gradient (what the model uses), the views are not in the graph.
    # Copies of the views (the opt-out the docstrings give) take the strided path: views differentiable.
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")
    base = torch.randn(2, 5, 3 * 2 * 8 if op == "attention" else 2 * 9, requires_grad=True)

    def views(t):
        if op == "attention":
            return t.view(2, 5, 6, 8).transpose(1, 2).split(2, dim=1)
        return t.chunk(2, dim=-1)

    def run(args, backend):
        return (ops.attention(*args, backend=backend) if op == "attention" else ops.swiglu(*args, backend=backend))

    up = torch.randn_like(run(views(base), "torch"))
    base64 = base.detach().double().requires_grad_()
    (truth_base,) = torch.autograd.grad(run(views(base64), "torch"), base64, up.double())
    (want_base,) = torch.autograd.grad(run(views(base), "torch"), base, up)
    (got_base,) = torch.autograd.grad(run(views(base), "cpu"), base, up)
    assert_close(got_base, truth_base, want_base, f"{op} gradient of the fused projection")

    fused = views(base)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        torch.autograd.grad(run(fused, "cpu"), fused[0], up)

    copied = views(base)
    copied64 = views(base64)
    truth = torch.autograd.grad(run(copied64, "torch"), copied64, up.double())
    want = torch.autograd.grad(run(copied, "torch"), copied, up)
    got = torch.autograd.grad(run([v.clone() for v in copied], "cpu"), copied, up)
    for i, (g, t, w) in enumerate(zip(got, truth, want)):
        assert_close(g, t, w, f"{op} gradient of copied view {i}")
