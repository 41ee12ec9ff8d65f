"""bias+GELU (tanh, exact) and SwiGLU Triton kernels vs the reference, forward and gradients."""

import pytest
import torch

from pyllm import ops
from kernel_checks import (DEVICE, check_op, kernel_dtypes, low_precision_dtypes, requires_gpu,  # noqa: F401
                           strict_backend, widened)
from pyllm.ops.tolerance import assert_close

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _randn(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape,bias", [((1, 1), True), ((2, 35, 300), True), ((5, 130), False)])  # 3x3 tiles
def test_bias_gelu(dtype, approximate, shape, bias):
    x, b = _randn(*shape), (_randn(shape[-1]) if bias else None)
    check_op(lambda x, b, backend: ops.bias_gelu(x, b, approximate=approximate, backend=backend), [x, b], dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", [(1,), (2, 3, 67), (70, 131)])
def test_swiglu(dtype, shape):
    check_op(lambda g, u, backend: ops.swiglu(g, u, backend=backend), [_randn(*shape), _randn(*shape)], dtype)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
@pytest.mark.parametrize("rows", [1, 7])
def test_pointwise_with_float32_operands_give_float32(dtype, rows):
    # 16-bit activations with a float32 bias / up (autocast's mix): the reference's type promotion gives a
    # float32 output (the kernels wrote the activation's dtype)
    x = _randn(rows, 33)
    check_op(lambda x, b, backend: ops.bias_gelu(x, widened(b, x), backend=backend), [x, _randn(33)], dtype)
    check_op(lambda g, u, backend: ops.swiglu(g, widened(u, g), backend=backend), [x, _randn(rows, 33)], dtype)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
@pytest.mark.parametrize("rows", [1, 7])
def test_float32_bias_gradient_is_summed_before_rounding(dtype, rows):
    # a float32 bias leaf on 16-bit x: its gradient is the float32 column sum of d(x + bias), as the reference's
    # autograd gives it; the kernel summed the gradient already rounded to x's dtype (fp16: 11-17x the bound
    # here). x holds multiples of 1/8, exact in 16 bits, so the reference's error is float32's.
    x = torch.randint(-24, 25, (rows, 33), generator=torch.Generator().manual_seed(rows)).double().to(DEVICE) / 8
    b, dy = _randn(33), _randn(rows, 33)
    grads = {}
    for name, dt, backend in (("truth", torch.float64, "torch"), ("ref", dtype, "torch"), ("kernel", dtype, "triton")):
        xx = x.to(dt, copy=True).requires_grad_()
        bb = b.to(torch.promote_types(dt, torch.float32), copy=True).requires_grad_()
        y = ops.bias_gelu(xx, bb, backend=backend)
        assert y.dtype == bb.dtype
        y.backward(dy.to(y.dtype))
        grads[name] = (xx.grad, bb.grad)
    for i, what in enumerate(("x", "bias")):
        assert_close(grads["kernel"][i], grads["truth"][i], grads["ref"][i], f"gradient of {what}")


def test_swiglu_strided_halves():
    """The model splits one [gate | up] projection: the kernel must read the column halves in place."""
    fused = _randn(2, 5, 2 * 37)

    def op(fused, backend):
        gate, up = fused.chunk(2, dim=-1)
        return ops.swiglu(gate, up, backend=backend)

    check_op(op, [fused], torch.float32)


def test_gelu_extreme_inputs():
    """tanh form at |x| ~ 1e4 (overflow of exp inside tanh) must give x and 0, not nan."""
    x = torch.tensor([[-1e4, -30.0, 0.0, 30.0, 1e4]], dtype=torch.float64, device=DEVICE)
    check_op(lambda x, backend: ops.bias_gelu(x, None, backend=backend), [x], torch.float32)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 3072), (1023, 11008), (3, 65539)])
def test_pointwise_gpu(dtype, shape):
    x, b = _randn(*shape), _randn(shape[-1])
    check_op(lambda x, b, backend: ops.bias_gelu(x, b, backend=backend), [x, b], dtype)
    check_op(lambda x, b, backend: ops.bias_gelu(x, b, approximate="none", backend=backend), [x, b], dtype)
    check_op(lambda g, u, backend: ops.swiglu(g, u, backend=backend), [x, _randn(*shape)], dtype)
