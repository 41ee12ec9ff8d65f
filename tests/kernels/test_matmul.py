"""Triton matmul and linear (bias, GELU epilogues) vs the reference, forward and gradients; the
persistent launch and the fp32 accumulate-into-output epilogue."""

import pytest
import torch

from pyllm import ops
from pyllm.kernels import matmul as matmul_kernel
from pyllm.ops.tolerance import assert_close
from kernel_checks import DEVICE, check_op, kernel_dtypes, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _randn(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (70, 131, 300)])  # interpreter tiles 32x128x64: 3x3 tiles, 3 K steps
def test_matmul(dtype, M, K, N):
    check_op(lambda a, b, backend: ops.matmul(a, b, backend=backend), [_randn(M, K), _randn(K, N)], dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("activation,bias", [(None, True), ("gelu", True), ("gelu_tanh", False)])
def test_linear(dtype, activation, bias):
    x, w, b = _randn(2, 7, 33), _randn(41, 33), (_randn(41) if bias else None)
    check_op(lambda x, w, b, backend: ops.linear(x, w, b, activation=activation, backend=backend), [x, w, b], dtype)


def test_persistent_and_accumulate():
    """Persistent launch (fewer programs than tiles) and C += A B into an fp32 buffer from fp16 inputs."""
    a, b = _randn(100, 130), _randn(130, 270)
    truth = a @ b
    got = matmul_kernel.mm(a.float(), b.float(), persistent=True)  # 4 programs for 12 tiles (interpreter)
    assert_close(got, truth, (a.float() @ b.float()), "persistent")
    c = torch.ones(100, 270, device=DEVICE)
    matmul_kernel.matmul_into(c, a.half(), b.half(), accumulate=True)
    ref16 = (a.half().float() @ b.half().float()) + 1  # the rounding of the fp16 inputs is in both
    assert_close(c, truth + 1, ref16, "accumulate")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(4096, 4096, 4096), (1, 4096, 11008), (8191, 1023, 129), (16384, 768, 50257)])
def test_matmul_gpu(dtype, M, K, N):
    a, b = _randn(M, K), _randn(K, N)
    check_op(lambda a, b, backend: ops.matmul(a, b, backend=backend), [a, b], dtype, grads=False)
    truth = (a @ b).float()
    got = matmul_kernel.mm(a.to(dtype), b.to(dtype), persistent=True)
    assert_close(got, truth, (a.to(dtype) @ b.to(dtype)), "persistent")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gpu(dtype):
    x, w, b = _randn(4, 1023, 768), _randn(3072, 768), _randn(3072)
    check_op(lambda x, w, b, backend: ops.linear(x, w, b, activation="gelu_tanh", backend=backend), [x, w, b], dtype)
