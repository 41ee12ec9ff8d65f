"""bias+GELU (tanh, exact) and SwiGLU Triton kernels vs the reference, forward and gradients."""

import pytest
import torch

from pyllm import ops
from kernel_checks import (DEVICE, check_op, kernel_dtypes, low_precision_dtypes, requires_gpu,  # noqa: F401
                           strict_backend)

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
def test_pointwise_with_float32_operands(dtype, rows):
    # 16-bit activations with a float32 bias / up (autocast's mix): the reference's type promotion gives a
    # float32 output (the kernels wrote the activation's dtype), and the float32 bias gradient is the float32
    # column sum of d(x + bias) (the kernel summed the gradient already rounded to x's dtype: fp16 11-17x the
    # bound here). x holds multiples of 1/8, exact in 16 bits, so the reference's own error is float32's and a
    # 16-bit rounding of the bias gradient cannot hide in it.
    x = torch.randint(-24, 25, (rows, 33), generator=torch.Generator().manual_seed(rows)).double().to(DEVICE) / 8
    check_op(lambda x, b, backend: ops.bias_gelu(x, b, backend=backend), [x, _randn(33)], dtype,
             dtypes={1: torch.float32})
    check_op(lambda g, u, backend: ops.swiglu(g, u, backend=backend), [x, _randn(rows, 33)], dtype,
             dtypes={1: torch.float32})


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
