"""Fused multi-tensor AdamW vs the reference: several steps, mixed shapes, fp32 master weights with
low-precision params, tensor lr/step, and a skipped step when found_inf is set."""

import pytest
import torch

from pyllm import ops
from pyllm.ops.tolerance import assert_close
from kernel_checks import DEVICE, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]

SHAPES = [(1,), (521,), (3, 347), (7, 5)]  # cross the interpreter's 512-element chunks


def _state(dtype, master, shapes=SHAPES):
    params = [torch.randn(s, dtype=torch.float64, device=DEVICE) for s in shapes]
    return {
        "params": [p.to(dtype) for p in params],
        "master": [p.float() for p in params] if master else None,
        "m": [torch.zeros(s, device=DEVICE) for s in shapes],
        "v": [torch.zeros(s, device=DEVICE) for s in shapes],
    }


def _clone(state, dtype=None):
    conv = (lambda t: t.clone()) if dtype is None else (lambda t: t.to(dtype))
    return {k: ([conv(t) for t in v] if v is not None else None) for k, v in state.items()}


def _run(state, grads, backend, steps, lr=1e-2, found_inf=None, tensor_args=False):
    for step in range(1, steps + 1):
        lr_arg = torch.tensor(lr, device=DEVICE) if tensor_args else lr
        step_arg = torch.tensor(float(step), device=DEVICE) if tensor_args else step
        ops.adamw_step(state["params"], [g[step - 1] for g in grads], state["m"], state["v"], lr=lr_arg,
                       beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step_arg,
                       master_params=state["master"], found_inf=found_inf, backend=backend)
    return state


def _grads(dtype, steps, shapes=SHAPES):
    return [[torch.randn(s, device=DEVICE).to(dtype) for _ in range(steps)] for s in shapes]


def _check_adamw(dtype, master, tensor_args, shapes=SHAPES, steps=3):
    init, grads = _state(dtype, master, shapes), _grads(dtype, steps, shapes)
    # truth: the reference in float64 on the same starting point and gradients
    truth = _state(torch.float64, False, shapes)
    truth["params"] = [(m if master else p).double() for p, m in zip(init["params"], init["master"] or init["params"])]
    truth["m"], truth["v"] = ([t.double() for t in init[k]] for k in ("m", "v"))
    truth = _run(truth, [[g.double() for g in gs] for gs in grads], "torch", steps, tensor_args=False)
    ref = _run(_clone(init), grads, "torch", steps, tensor_args=tensor_args)
    ker = _run(_clone(init), grads, "triton", steps, tensor_args=tensor_args)
    for name in ("params", "m", "v") + (("master",) if master else ()):
        t_list = truth["params"] if name == "master" else truth[name]
        for i, (k, t, r) in enumerate(zip(ker[name], t_list, ref[name])):
            assert_close(k, t.to(torch.float64), r, f"{name}[{i}]")


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float16, True), (torch.float16, False)])
@pytest.mark.parametrize("tensor_args", [False, True])
def test_adamw(dtype, master, tensor_args):
    _check_adamw(dtype, master, tensor_args)


def test_adamw_skips_step_on_found_inf():
    init, grads = _state(torch.float32, True), _grads(torch.float32, 1)
    ker = _run(_clone(init), grads, "triton", 1, found_inf=torch.ones(1, device=DEVICE))
    for name in ("params", "master", "m", "v"):
        for k, i in zip(ker[name], init[name]):
            assert torch.equal(k, i), name


@requires_gpu
def test_adamw_gpu_bf16_master_many_tensors():
    _check_adamw(torch.bfloat16, True, True, shapes=[(4096, 4096), (65537,), (1,), (11008, 13)] * 8)
