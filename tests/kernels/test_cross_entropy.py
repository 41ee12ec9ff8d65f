"""Cross-entropy Triton kernel vs the reference: reductions, ignore_index, label smoothing, z-loss,
vocabularies that are not a multiple of the chunk and (on GPU) above 65,536."""

import math

import pytest
import torch

from pyllm import ops
from pyllm.ops import reference
from pyllm.ops.tolerance import assert_close
from kernel_checks import DEVICE, check_op, kernel_dtypes, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _case(M, V, n_ignored=0):
    logits = torch.randn(M, V, dtype=torch.float64, device=DEVICE) * 3
    target = torch.randint(0, V, (M,), device=DEVICE)
    target[:n_ignored] = -100
    return logits, target


def _ce(**kw):
    return lambda x, t, backend: ops.cross_entropy(x, t, backend=backend, **kw)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("M,V,n_ignored", [(1, 1, 0), (7, 2053, 2), (3, 37, 3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy(dtype, M, V, n_ignored, reduction):
    logits, target = _case(M, V, n_ignored)
    check_op(_ce(reduction=reduction), [logits, target], dtype)


@pytest.mark.parametrize("label_smoothing,z_loss,reduction", [(0.1, 0.0, "sum"), (0.0, 1e-3, "mean"),
                                                              (0.2, 1e-2, "none")])
def test_cross_entropy_smoothing_zloss(label_smoothing, z_loss, reduction):
    logits, target = _case(5, 1031, 1)
    check_op(_ce(label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction), [logits, target],
             torch.float32)


def test_cross_entropy_vocab_above_65536():
    logits, target = _case(2, 70001)
    check_op(_ce(z_loss=1e-4), [logits, target], torch.float32)


@pytest.mark.parametrize("V", [9, 2053])
def test_cross_entropy_with_an_infinite_logit_is_the_references(V):
    """A +inf logit makes logsumexp +inf (the kernel's max-shifted sum once made it nan): rows with +inf at
    a non-target (+inf), at the target (nan), beside a -inf (+inf), in an ignored row (0), a plain row."""
    x = torch.randn(5, V, device=DEVICE) * 3
    target = torch.tensor([0, 1, 2, -100, 4], device=DEVICE)
    x[0, V - 2] = x[1, 1] = x[2, V // 2] = x[3, 5] = float("inf")
    x[2, 0] = float("-inf")
    loss = ops.cross_entropy(x, target, reduction="none", backend="triton")
    want = ops.cross_entropy(x, target, reduction="none", backend="torch")
    truth = ops.cross_entropy(x.double(), target, reduction="none", backend="torch")
    assert want[0] == want[2] == float("inf") and want[1].isnan() and want[3] == 0
    # +inf and nan are exact by definition, not rounded values: the same ones, in the same rows
    rows = want.isfinite()
    torch.testing.assert_close(loss[~rows], want[~rows], rtol=0, atol=0, equal_nan=True)
    assert_close(loss[rows], truth[rows], want[rows], "cross-entropy of the finite rows")


def test_cross_entropy_3d_int32_targets():
    logits, target = _case(6, 50)
    check_op(_ce(), [logits.view(2, 3, 50), target.view(2, 3).int()], torch.float32)


def test_target_out_of_range_gives_its_row_a_nan_loss():
    """Past pyllm.ops' check (CPU tensors only: on a GPU it would be a host sync per step) the kernels flag
    a target outside [0, V) with a nan loss, as the cuda backend does; they read the neighbouring logits."""
    from pyllm.kernels import cross_entropy as ce_kernel

    x = torch.randn(4, 5, device=DEVICE)
    target = torch.tensor([0, 5, -1, -100], device=DEVICE)
    loss = ce_kernel.cross_entropy(x, target, reduction="none")
    in_range = torch.tensor([0, 0, 0, -100], device=DEVICE)
    want = ops.cross_entropy(x, in_range, reduction="none", backend="torch")
    truth = ops.cross_entropy(x.double(), in_range, reduction="none", backend="torch")
    assert loss[1].isnan() and loss[2].isnan()
    assert_close(loss[[0, 3]], truth[[0, 3]], want[[0, 3]], "cross-entropy of the rows in range")
    assert ce_kernel.linear_cross_entropy(x, torch.eye(5, device=DEVICE), target).isnan()


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,V", [(4096, 50257), (1023, 128256), (3, 262147)])
def test_cross_entropy_gpu(dtype, M, V):
    logits, target = _case(M, V, 17)
    check_op(_ce(label_smoothing=0.1, z_loss=1e-4), [logits, target], dtype)


def _lce(**kw):
    return lambda h, w, t, b, backend: ops.linear_cross_entropy(h, w, t, b, backend=backend, **kw)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("reduction,bias", [("mean", False), ("sum", True), ("none", True)])
def test_linear_cross_entropy(dtype, reduction, bias):
    """20 rows, V=71, H=16: 4-row chunks, so the weight gradient is summed over 5 chunks."""
    h = torch.randn(4, 5, 16, dtype=torch.float64, device=DEVICE)
    w = torch.randn(71, 16, dtype=torch.float64, device=DEVICE) * 0.5
    b = torch.randn(71, dtype=torch.float64, device=DEVICE) if bias else None
    t = torch.randint(0, 71, (4, 5), device=DEVICE)
    t[0, :3] = -100
    check_op(_lce(reduction=reduction, label_smoothing=0.1, z_loss=1e-3), [h, w, t, b], dtype)


def test_linear_cross_entropy_column_major_hidden():
    # hidden as a transposed view: its gradient was allocated with hidden's strides and then read as one
    # flat array by the scaling pass, so it came back in transposed order
    h = torch.randn(6, 16, dtype=torch.float64, device=DEVICE)
    w = torch.randn(33, 16, dtype=torch.float64, device=DEVICE) * 0.5
    t = torch.randint(0, 33, (6,), device=DEVICE)
    op = lambda h, w, t, backend: ops.linear_cross_entropy(h.t().contiguous().t(), w, t, backend=backend)  # noqa: E731
    check_op(op, [h, w, t], torch.float32)


def test_linear_cross_entropy_no_grad():
    h, w = torch.randn(9, 16, device=DEVICE), torch.randn(33, 16, device=DEVICE)
    t = torch.randint(0, 33, (9,), device=DEVICE)
    with torch.no_grad():
        got = ops.linear_cross_entropy(h, w, t, backend="triton")
        want = ops.linear_cross_entropy(h, w, t, backend="torch")
        truth = ops.linear_cross_entropy(h.double(), w.double(), t, backend="torch")
    assert_close(got, truth, want, "linear_cross_entropy under no-grad")


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_with_no_features(bias, monkeypatch):
    # hidden size 0: the logits are the bias (or zeros: ln V); the chunk sizing divided by H. Nothing to
    # fuse: the backend hands the call to the reference (a spy shows it), so no kernel output is compared.
    h = torch.randn(4, 0, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 0, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True) if bias else None
    t = torch.tensor([1, 2, 3, 4], device=DEVICE)
    made = []
    real = reference.linear_cross_entropy
    monkeypatch.setattr(reference, "linear_cross_entropy", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    got = ops.linear_cross_entropy(h, w, t, b, backend="triton")
    assert len(made) == 1 and got is made[0]
    if not bias:
        torch.testing.assert_close(got, torch.tensor(math.log(5), device=DEVICE))
    got.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_gpu(dtype):
    h = torch.randn(4096, 1024, dtype=torch.float64, device=DEVICE)
    w = torch.randn(128256, 1024, dtype=torch.float64, device=DEVICE) * 0.03
    t = torch.randint(0, 128256, (4096,), device=DEVICE)
    t[:100] = -100
    check_op(_lce(), [h, w, t, None], dtype)


@requires_gpu
def test_linear_cross_entropy_gpu_peak_memory():
    """The issue's shape (hidden 4096, vocab 128256, 16k tokens, bf16): forward + backward peak memory
    of the fused op at most a quarter of the unfused one's (both above the inputs' own footprint)."""
    h = torch.randn(16384, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(128256, 4096, device=DEVICE, dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, 128256, (16384,), device=DEVICE)

    def peak(backend):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ops.linear_cross_entropy(h, w, t, backend=backend).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, unfused = peak("triton"), peak("torch")
    assert fused <= unfused / 4, f"fused peak {fused / 2**30:.2f} GiB vs unfused {unfused / 2**30:.2f} GiB"
