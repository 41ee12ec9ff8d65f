"""Kernel-test helpers: device markers, strict backend selection and the three-way comparison of STYLE.md.

(A module, not a conftest.py: pytest swaps same-named conftest modules in and out of sys.modules, so
helpers imported from one are unreliable; test files import this by name.)

Every kernel test calls an op through ``pyllm.ops.<op>(..., backend="triton")`` with
PYLLM_STRICT_BACKEND=1, so a kernel that silently fell back to the reference fails instead of passing.
``check_op`` computes the truth (the reference on float64 inputs), the reference in the test dtype
and the kernel, for the outputs and for the gradients of every floating input under one shared
upstream gradient, and applies ``pyllm.ops.tolerance.assert_close`` to each.
"""

from __future__ import annotations

import pytest
import torch

from pyllm.ops.tolerance import assert_close


HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Same rule as tests/conftest.py: bf16 is wrong in the Triton interpreter, so it runs on a GPU only.
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def kernel_dtypes():
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter gets bf16 dots/casts wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def low_precision_dtypes():
    """The 16-bit dtypes of kernel_dtypes()."""
    return [d for d in kernel_dtypes() if d != torch.float32]


@pytest.fixture
def strict_backend(monkeypatch):
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(op, inputs, dtype, backend, grads, kwargs, upstream, dtypes=None):
    args = []
    for i, t in enumerate(inputs):
        if torch.is_tensor(t) and t.is_floating_point():
            t = t.detach().to((dtypes or {}).get(i, dtype)).requires_grad_(grads)
        args.append(t)
    outs = _as_tuple(op(*args, backend=backend, **kwargs))
    if not grads:
        return outs, ()
    if upstream is None:
        upstream = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream) if o.is_floating_point())
    loss.backward()
    return outs, tuple(a.grad for a in args if torch.is_tensor(a) and a.requires_grad), upstream


def check_op(op, inputs, dtype, *, grads=True, truth_dtype=torch.float64, dtypes=None, **kwargs):
    """Compare ``op(*inputs, backend="triton", **kwargs)`` in ``dtype`` to the reference (see module doc).
    ``inputs``: tensors (floating ones are cast per run; integer ones are passed as they are) or None.
    ``dtypes``: {input index: dtype} overriding ``dtype`` in the reference and kernel runs (mixed precision,
    e.g. 16-bit activations with float32 parameters as autocast hands them over); the truth stays float64."""
    if grads:
        truth, truth_g, up = _run(op, inputs, truth_dtype, "torch", True, kwargs, None)
        ref, ref_g, _ = _run(op, inputs, dtype, "torch", True, kwargs, up, dtypes)
        ker, ker_g, _ = _run(op, inputs, dtype, "triton", True, kwargs, up, dtypes)
    else:
        (truth, _), (ref, _), (ker, _) = (_run(op, inputs, d, b, False, kwargs, None, m) for d, b, m in
                                          ((truth_dtype, "torch", None), (dtype, "torch", dtypes),
                                           (dtype, "triton", dtypes)))
        truth_g = ref_g = ker_g = ()
    for i, (k, t, r) in enumerate(zip(ker, truth, ref)):
        assert k.dtype == r.dtype, f"output {i}: dtype {k.dtype} != reference {r.dtype}"
        assert_close(k, t, r, f"output {i}")
    assert len(ker_g) == len(truth_g)
    for i, (k, t, r) in enumerate(zip(ker_g, truth_g, ref_g)):
        assert k is not None and t is not None, f"gradient {i} missing"
        assert_close(k, t, r, f"gradient {i}")
