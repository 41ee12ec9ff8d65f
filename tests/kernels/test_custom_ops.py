"""The Triton ops are well-formed torch.library custom ops: ``opcheck`` validates each schema, fake
(meta) implementation and autograd registration, and a function of several ops compiles with
torch.compile(fullgraph=True) and matches eager values and gradients."""

import pytest
import torch

import pyllm.ops.triton_backend  # noqa: F401  (defines the pyllm::*_triton ops)
from pyllm import ops
from kernel_checks import DEVICE, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _r(*shape):
    return torch.randn(shape, device=DEVICE, requires_grad=True)


CASES = {
    "layer_norm_triton": lambda: (_r(3, 8), _r(8), _r(8), _r(3, 8), 1e-5, False),
    "bias_gelu_triton": lambda: (_r(3, 8), _r(8), True),
    "swiglu_triton": lambda: (_r(3, 8), _r(3, 8)),
    "rope_triton": lambda: (_r(1, 2, 3, 8), _r(1, 1, 3, 8), torch.randn(3, 4, device=DEVICE),
                            torch.randn(3, 4, device=DEVICE), False),
    "softmax_triton": lambda: (_r(3, 8),),
    "cross_entropy_triton": lambda: (_r(3, 8), torch.tensor([1, -100, 7], device=DEVICE), -100, 0.1, 0.01),
    "attention_triton": lambda: (_r(1, 2, 5, 16), _r(1, 1, 5, 16), _r(1, 1, 5, 16), None, True, None, None),
    "matmul_triton": lambda: (_r(5, 7), _r(7, 3), False),
    "linear_triton": lambda: (_r(5, 7), _r(3, 7), _r(3), 2, True),
    "linear_cross_entropy_triton": lambda: (_r(5, 8), _r(11, 8), torch.tensor([1, 2, -100, 4, 5], device=DEVICE),
                                            None, -100, 0.0, 0.0, "mean", True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.pyllm, name), CASES[name]())


def test_torch_compile_fullgraph():
    def f(x, w, b, q, k, v, t):
        h = ops.layer_norm(x, w, b, backend="triton")
        h = ops.bias_gelu(h, b, backend="triton")
        o = ops.attention(q, k, v, backend="triton")
        return ops.cross_entropy(h, t, backend="triton") + o.sum()

    args = (_r(6, 8), _r(8), _r(8), _r(1, 2, 5, 16), _r(1, 1, 5, 16), _r(1, 1, 5, 16),
            torch.randint(0, 8, (6,), device=DEVICE))
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    grads = torch.autograd.grad(out, args[:6])
    want = f(*args)
    want_grads = torch.autograd.grad(want, args[:6])
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
