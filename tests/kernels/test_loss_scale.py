"""Multi-tensor unscale + found-inf and the device-side loss-scale update vs the reference."""

import pytest
import torch

from pyllm import ops
from kernel_checks import DEVICE, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _grads(dtypes, sizes):
    return [torch.randn(n, device=DEVICE).to(d) * 1000 for d, n in zip(dtypes, sizes)]


def _unscale(grads, inv_scale, backend):
    grads = [g.clone() for g in grads]
    found = torch.zeros(1, device=DEVICE)
    ops.unscale_and_check_(grads, inv_scale, found, backend=backend)
    return grads, found


# sizes cross the interpreter's 512-element chunk (1, a prime, 2 chunks + 1, a 2-D tensor below)
@pytest.mark.parametrize("poison", [None, "inf", "nan", "-inf"])
@pytest.mark.parametrize("inv_as_tensor", [False, True])
def test_unscale_and_check(poison, inv_as_tensor):
    grads = _grads([torch.float32, torch.float16, torch.float32, torch.float16], [1, 521, 1025, 7])
    grads.append(torch.randn(3, 37, device=DEVICE))
    if poison:
        grads[2][1024] = float(poison)  # in the last chunk of a multi-chunk tensor
    inv = torch.tensor([1 / 1024.0], device=DEVICE) if inv_as_tensor else 1 / 1024.0
    want, want_found = _unscale(grads, inv, "torch")
    got, got_found = _unscale(grads, inv, "triton")
    assert got_found.item() == want_found.item() == (1.0 if poison else 0.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)


def test_found_inf_is_sticky():
    """A flag already set by an earlier call (e.g. another gradient group) is never cleared."""
    found = torch.ones(1, device=DEVICE)
    ops.unscale_and_check_([torch.ones(5, device=DEVICE)], 0.5, found, backend="triton")
    assert found.item() == 1.0


def test_update_loss_scale_sequence():
    """Same scale/tracker trajectory as the reference over overflow, growth and interval boundaries."""
    states = {b: (torch.tensor([2.0 ** 16], device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE))
              for b in ("torch", "triton")}
    for overflow in [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0]:
        found = torch.tensor([float(overflow)], device=DEVICE)
        for b, (scale, tracker) in states.items():
            ops.update_loss_scale_(scale, tracker, found, growth_interval=3, backend=b)
        assert torch.equal(states["torch"][0], states["triton"][0])
        assert torch.equal(states["torch"][1], states["triton"][1])


@requires_gpu
def test_unscale_gpu_mixed_dtypes_many_tensors():
    sizes = [1, 3, 65535, 65537, 1 << 20, 4097] * 20
    grads = _grads([torch.bfloat16, torch.float16, torch.float32] * 40, sizes)
    grads[-3][65536] = float("inf")
    want, want_found = _unscale(grads, 1 / 65536.0, "torch")
    got, got_found = _unscale(grads, 1 / 65536.0, "triton")
    assert got_found.item() == want_found.item() == 1.0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
