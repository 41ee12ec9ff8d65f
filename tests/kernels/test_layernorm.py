"""LayerNorm / RMSNorm Triton kernels vs the reference: forward, input/weight/bias/residual gradients."""

import pytest
import torch

from pyllm import ops
from kernel_checks import (DEVICE, check_op, kernel_dtypes, low_precision_dtypes, requires_gpu,  # noqa: F401
                           strict_backend)

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


# (300, 61) and (2, 70, 130) span several programs in the interpreter (64-row tiles, 4 backward bands).
def _inputs(shape, residual, bias):
    N = shape[-1]
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE) * 2 + 0.5
    w = torch.randn(N, dtype=torch.float64, device=DEVICE)
    b = torch.randn(N, dtype=torch.float64, device=DEVICE) if bias else None
    r = torch.randn(shape, dtype=torch.float64, device=DEVICE) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape,residual", [((1, 1), False), ((3, 5, 37), True), ((300, 61), False)])
def test_layer_norm(dtype, shape, residual):
    x, w, b, r = _inputs(shape, residual, bias=True)
    check_op(lambda x, w, b, r, backend: ops.layer_norm(x, w, b, residual=r, backend=backend), [x, w, b, r], dtype)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape,residual", [((1, 1), True), ((2, 3, 37), False), ((2, 70, 130), True)])
def test_rms_norm(dtype, shape, residual):
    x, w, _, r = _inputs(shape, residual, bias=False)
    check_op(lambda x, w, r, backend: ops.rms_norm(x, w, residual=r, backend=backend), [x, w, r], dtype)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
def test_norms_with_float32_parameters(dtype):
    # 16-bit activations with float32 parameters (autocast's mix): LayerNorm's output keeps x's dtype,
    # RMSNorm's promotes with the weight's (float32); its kernel wrote x's dtype
    x, w, b, r = _inputs((3, 37), residual=True, bias=True)
    f32 = torch.float32
    check_op(lambda x, w, b, r, backend: ops.layer_norm(x, w, b, residual=r, backend=backend), [x, w, b, r], dtype,
             dtypes={1: f32, 2: f32})
    check_op(lambda x, w, r, backend: ops.rms_norm(x, w, residual=r, backend=backend), [x, w, r], dtype,
             dtypes={1: f32})


def test_layer_norm_no_bias():
    x, w, _, _ = _inputs((4, 33), False, bias=False)
    check_op(lambda x, w, backend: ops.layer_norm(x, w, None, backend=backend), [x, w], torch.float32)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(4096, 4096), (1023, 8192), (2, 1031)])
def test_norms_gpu(dtype, rms, shape):
    x, w, b, r = _inputs(shape, True, bias=not rms)
    if rms:
        check_op(lambda x, w, r, backend: ops.rms_norm(x, w, residual=r, backend=backend), [x, w, r], dtype)
    else:
        check_op(lambda x, w, b, r, backend: ops.layer_norm(x, w, b, residual=r, backend=backend), [x, w, b, r], dtype)
