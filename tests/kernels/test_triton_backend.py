"""The triton backend's edges: empty tensors, and inputs a kernel does not take (a clear Unsupported
reason, which strict mode turns into a BackendError instead of a silent fallback)."""

import pytest
import torch

from pyllm import ops
from kernel_checks import DEVICE, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


# name -> (input shapes, op); only the bias of "linear" holds numbers (the output is GELU(bias)).
EMPTY_CASES = {
    "bias_gelu": ([(4, 0)], lambda x, b: ops.bias_gelu(x, backend=b)),
    "swiglu": ([(2, 0, 3), (2, 0, 3)], lambda g, u, b: ops.swiglu(g, u, backend=b)),
    "softmax": ([(0, 5)], lambda x, b: ops.softmax(x, backend=b)),
    "layer_norm": ([(0, 5), (5,), (5,)], lambda x, w, bias, b: ops.layer_norm(x, w, bias, backend=b)),
    "rms_norm": ([(0, 5), (5,), (0, 5)], lambda x, w, r, b: ops.rms_norm(x, w, residual=r, backend=b)[0]),
    "linear": ([(3, 0), (5, 0), (5,)], lambda x, w, bias, b: ops.linear(x, w, bias, activation="gelu", backend=b)),
    "matmul": ([(0, 4), (4, 3)], lambda x, y, b: ops.matmul(x, y, backend=b)),
    "attention": ([(1, 2, 0, 16), (1, 1, 0, 16), (1, 1, 0, 16)], lambda q, k, v, b: ops.attention(q, k, v, backend=b)),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_inputs(name):
    shapes, op = EMPTY_CASES[name]
    inputs = [torch.randn(s, device=DEVICE) for s in shapes]
    outs = {}
    for backend in ("triton", "torch"):
        args = [t.clone().requires_grad_() for t in inputs]
        outs[backend] = op(*args, backend)
        outs[backend].sum().backward()  # the backward of an empty op runs too
    assert outs["triton"].shape == outs["torch"].shape and outs["triton"].dtype == outs["torch"].dtype
    torch.testing.assert_close(outs["triton"], outs["torch"])


def test_unsupported_dtype_is_a_clear_error_in_strict_mode():
    x = torch.randn(3, 5, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ops.BackendError, match="float64"):
        ops.softmax(x, backend="triton")


def test_unsupported_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "0")
    q = torch.randn(1, 1, 3, 512, device=DEVICE)  # head dim above the kernel's 256
    with pytest.warns(RuntimeWarning, match="head dim 512"):
        out = ops.attention(q, q, q, backend="triton")
    torch.testing.assert_close(out, ops.attention(q, q, q, backend="torch"))


def test_mixed_operand_dtypes_are_unsupported_not_wrong():
    # outside autocast the ops layer refuses a GEMM's operands of two dtypes (tests/ops/test_validation.py);
    # under autocast, whose casts the kernels do not see, the Triton backend declines them
    x, w = torch.randn(3, 8, device=DEVICE, dtype=torch.float16), torch.randn(5, 8, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
        with pytest.raises(ops.BackendError, match="operand dtypes differ"):
            ops.linear(x, w, backend="triton")
    with pytest.raises(TypeError, match="'weight' has dtype float32, expected float16"):
        ops.linear(x, w, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter case")
def test_cpu_tensors_without_interpreter_are_unsupported():
    """Without TRITON_INTERPRET=1, CPU tensors make every Triton op raise Unsupported before any work."""
    import os
    import subprocess
    import sys

    code = ("import torch, warnings\nfrom pyllm import ops\nx = torch.randn(2, 3)\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    y = ops.softmax(x, backend='triton')\n"
            "assert torch.allclose(y, torch.softmax(x, -1))\n"
            "assert any('Triton needs CUDA' in str(m.message) for m in w), [str(m.message) for m in w]\n"
            "import os; os.environ['PYLLM_STRICT_BACKEND'] = '1'\n"
            "try:\n    ops.softmax(x, backend='triton')\nexcept ops.BackendError as e:\n    print('strict:', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYLLM_STRICT_BACKEND")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "strict:" in run.stdout and "Triton needs CUDA" in run.stdout
