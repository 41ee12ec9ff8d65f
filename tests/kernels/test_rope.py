"""RoPE Triton kernel vs the reference: q and k (grouped heads), shared and per-batch angles, gradients,
strided views of a fused qkv projection, and the in-place inference path."""

import pytest
import torch

from pyllm import ops
from pyllm.ops.tolerance import assert_close
from kernel_checks import DEVICE, check_op, kernel_dtypes, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _angles(B, T, D, per_batch):
    pos = torch.arange(T, dtype=torch.float64, device=DEVICE)
    if per_batch:
        pos = pos[None] + torch.arange(B, dtype=torch.float64, device=DEVICE)[:, None] * 3  # (B, T)
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64, device=DEVICE) / D)
    ang = pos[..., None] * inv
    return ang.cos(), ang.sin()


def _rope_op(q, k, cos, sin, backend):
    return ops.rope(q, k, cos, sin, backend=backend)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("B,Hq,Hkv,T,D,per_batch", [(1, 1, 1, 1, 2, False), (2, 6, 2, 7, 34, True),
                                                    (1, 3, 3, 131, 16, False)])  # 3 position tiles
def test_rope(dtype, B, Hq, Hkv, T, D, per_batch):
    q = torch.randn(B, Hq, T, D, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float64, device=DEVICE)
    cos, sin = _angles(B, T, D, per_batch)
    # cos/sin are constants (buffers): keep them out of the gradient check by closing over them.
    check_op(lambda q, k, backend: _rope_op(q, k, cos.to(q.dtype), sin.to(q.dtype), backend), [q, k], dtype)


def test_rope_on_qkv_views():
    """The model rotates strided (B, H, T, D) views of one (B, T, 3H, D) projection."""
    B, T, H, D = 2, 5, 3, 8
    qkv = torch.randn(B, T, 3 * H, D, dtype=torch.float64, device=DEVICE)
    cos, sin = _angles(B, T, D, False)

    def op(qkv, backend):
        q, k, _ = qkv.transpose(1, 2).split([H, H, H], dim=1)
        return _rope_op(q, k, cos.to(qkv.dtype), sin.to(qkv.dtype), backend)

    check_op(op, [qkv], torch.float32)


def test_rope_out_of_place_under_no_grad():
    # as on every backend (it rotated q and k in place here until the layout fuzz: tests/ops/test_layouts.py)
    q = torch.randn(2, 4, 5, 8, device=DEVICE)
    k = torch.randn(2, 2, 5, 8, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    cos, sin = (t.float() for t in _angles(2, 5, 8, False))
    want = ops.rope(q, k, cos, sin, backend="torch")
    truth = ops.rope(q.double(), k.double(), cos.double(), sin.double(), backend="torch")
    with torch.no_grad():
        got = ops.rope(q, k, cos, sin, backend="triton")
    assert torch.equal(q, q0) and torch.equal(k, k0)
    for name, g, t, w in zip("qk", got, truth, want):
        assert_close(g, t, w, f"rope {name} under no-grad")


@pytest.mark.filterwarnings("ignore:pyllm.ops.rope.*falling back:RuntimeWarning")
def test_rope_declines_cos_sin_that_need_a_gradient(monkeypatch):
    # learned angles: the kernel treats cos/sin as constants, so it returned no gradient for them; it is
    # declined instead (strict mode: an error) and the reference runs, as on the cpu backend
    q, k = torch.randn(1, 2, 5, 8, device=DEVICE), torch.randn(1, 1, 5, 8, device=DEVICE)
    theta = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(ops.BackendError, match="rope has no gradient for cos/sin"):
        ops.rope(q, k, theta.cos(), theta.sin(), backend="triton")
    monkeypatch.delenv("PYLLM_STRICT_BACKEND")
    grads = []
    for backend in ("torch", "triton"):
        theta.grad = None
        q_rot, k_rot = ops.rope(q, k, theta.cos(), theta.sin(), backend=backend)
        (q_rot.sum() + k_rot.sum()).backward()
        grads.append(theta.grad)
    # exact: the fallback is the reference itself, the same ops on the same inputs
    assert torch.equal(grads[1], grads[0])


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (12, 12, 64), (5, 1, 256)])
def test_rope_gpu(dtype, Hq, Hkv, D):
    B, T = 2, 1031
    q = torch.randn(B, Hq, T, D, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float64, device=DEVICE)
    cos, sin = _angles(B, T, D, False)
    check_op(lambda q, k, backend: _rope_op(q, k, cos.to(q.dtype), sin.to(q.dtype), backend), [q, k], dtype)


@requires_gpu
def test_rope_gpu_sequence_longer_than_a_grid_axis():
    """Llama-3-8B's heads (32 x 128, GQA 8) at 131,072 positions: BLOCK_T is 1 there, so the position blocks
    must be on the grid's first axis (CUDA allows 65535 on the second; the launch failed with the batch first)."""
    T = 131072
    q = torch.randn(1, 32, T, 128, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(1, 8, T, 128, dtype=torch.bfloat16, device=DEVICE)
    theta = torch.rand(T, 64, device=DEVICE)
    cos, sin = theta.cos().to(q.dtype), theta.sin().to(q.dtype)
    with torch.no_grad():
        got = ops.rope(q, k, cos, sin, backend="triton")
        want = ops.rope(q, k, cos, sin, backend="torch")
        truth = ops.rope(q.float(), k.float(), cos.float(), sin.float(), backend="torch")  # the same bf16 inputs
    for name, g, t, w in zip("qk", got, truth, want):
        assert_close(g[:, :, -5:], t[:, :, -5:], w[:, :, -5:], f"rope {name}, the grid's far end")
        assert_close(g, t, w, f"rope {name} at {T} positions")
