"""Softmax Triton kernel vs the reference: single-block rows and chunked long rows, forward and gradient."""

import pytest
import torch

from pyllm import ops
from kernel_checks import DEVICE, check_op, kernel_dtypes, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _softmax(x, backend):
    return ops.softmax(x, backend=backend)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", [(1,), (3, 5, 37), (2, 9001)])  # 9001 > 8192: the two-sweep path
def test_softmax(dtype, shape):
    check_op(_softmax, [torch.randn(shape, dtype=torch.float64, device=DEVICE) * 4], dtype)


def test_softmax_masked_rows():
    """-inf entries (masked scores) get probability 0; a row with one finite entry gives 1."""
    x = torch.randn(3, 9001, dtype=torch.float64, device=DEVICE)
    x[0, ::2] = float("-inf")
    x[1, :-1] = float("-inf")
    x[2, :4000] = float("-inf")
    check_op(_softmax, [x], torch.float32, grads=False)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 1024), (64, 131072), (7, 8191)])
def test_softmax_gpu(dtype, shape):
    check_op(_softmax, [torch.randn(shape, dtype=torch.float64, device=DEVICE) * 4], dtype)
