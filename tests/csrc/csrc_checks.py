"""Helpers of the csrc kernel tests: the three-way comparison of STYLE.md for one op on one backend.

truth = the reference on float64 copies of the inputs, "reference in dtype" = the reference on the
test dtype, kernel = ``pyllm.ops.<op>(..., backend=...)`` on the test dtype; outputs and the gradients
of the floating inputs (one shared upstream gradient) must obey pyllm.ops.tolerance.assert_close.
(A module, not conftest.py, so test files import it by name.)
"""

from __future__ import annotations

import torch

from pyllm import ops
from pyllm.ops.tolerance import assert_close, error_bound


def run(op, backend, args, kwargs, dtype, upstream=None, n_grad=None, dtypes=None):
    """ops.<op> on copies of the tensors in args/kwargs cast to ``dtype`` (or to ``dtypes[i]`` for args[i],
    ``dtypes[name]`` for a keyword: mixed-precision calls); the first ``n_grad`` floating tensors of args
    (default all) and every floating tensor in kwargs become leaves. Returns (outputs, gradients, upstream)."""
    n_grad = len(args) if n_grad is None else n_grad
    dtypes = dtypes or {}
    leaves = []

    def prep(t, grad, key):
        if not (torch.is_tensor(t) and t.is_floating_point()):
            return t
        t = t.detach().to(dtypes.get(key, dtype))
        if grad:
            t.requires_grad_()
            leaves.append(t)
        return t

    a = [prep(t, i < n_grad, i) for i, t in enumerate(args)]
    kw = {k: prep(v, True, k) for k, v in kwargs.items()}
    outs = getattr(ops, op)(*a, backend=backend, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if upstream is None:
        upstream = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    if leaves:
        torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return outs, [t.grad for t in leaves], upstream


def check(op, backend, args, dtype=torch.float32, n_grad=None, compare_with=None, dtypes=None, **kwargs):
    """Kernel vs reference (outputs and gradients, values and dtypes). ``dtypes``: per-argument dtypes
    overriding ``dtype`` (see run). ``compare_with``: a second kernel backend (e.g. "triton") that must
    agree with this one within the sum of both bounds."""
    truth, truth_grads, upstream = run(op, "torch", args, kwargs, torch.float64, n_grad=n_grad)
    ref, ref_grads, _ = run(op, "torch", args, kwargs, dtype, upstream, n_grad, dtypes)
    out, grads, _ = run(op, backend, args, kwargs, dtype, upstream, n_grad, dtypes)
    pairs = [(f"{op} output {i}", o, t, r) for i, (o, t, r) in enumerate(zip(out, truth, ref))]
    pairs += [(f"{op} grad {i}", g, t, r) for i, (g, t, r) in enumerate(zip(grads, truth_grads, ref_grads))]
    assert len(grads) == len(truth_grads)
    for name, o, t, r in pairs:
        assert o.dtype == r.dtype, f"{name} ({backend}): dtype {o.dtype}, the reference gives {r.dtype}"
        assert_close(o, t, r, f"{name} ({backend}, {dtype})")
    if compare_with is not None:
        other, other_grads, _ = run(op, compare_with, args, kwargs, dtype, upstream, n_grad, dtypes)
        for (name, o, t, r), p in zip(pairs, list(other) + list(other_grads)):
            bound = 2 * error_bound(t, r, o.dtype if o.dtype in (torch.float16, torch.bfloat16) else torch.float32)
            err = (o.double() - p.double()).abs().max().item() if o.numel() else 0.0
            assert err <= bound, f"{name}: {backend} and {compare_with} differ by {err:.3e} > {bound:.3e}"
