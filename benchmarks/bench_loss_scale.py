"""Dynamic loss scaling, the two device-side steps of a mixed-precision optimiser step: unscale every
gradient while checking for inf/nan (one multi-tensor pass), then update the scale. No host sync.

Memory-bound: every gradient is read and written once (GB/s). Mode "fwd" is the step.
"""

from __future__ import annotations

import torch

from pyllm import ops

from . import externals
from .bench_adamw import parameter_shapes
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test


def _loss_scale(unscale, update):
    def fn(grads, inv_scale, found_inf, scale, growth_tracker, growth_factor=2.0, backoff_factor=0.5,
           growth_interval=2000):
        unscale(grads, inv_scale, found_inf)
        update(scale, growth_tracker, found_inf, growth_factor=growth_factor, backoff_factor=backoff_factor,
               growth_interval=growth_interval)
    return fn


class LossScaleBench(OpBench):
    op = "loss_scale"
    metric = "gbps"
    differentiable = False
    gpu_dtypes = ("fp32", "fp16", "bf16")

    def kernel_ops(self):
        return ("unscale_and_check_", "update_loss_scale_")

    def pyllm_fn(self, backend):
        return _loss_scale(lambda *a: ops.unscale_and_check_(*a, backend=backend),
                           lambda *a, **k: ops.update_loss_scale_(*a, backend=backend, **k))

    def reference_fn(self):
        return _loss_scale(ops.reference.unscale_and_check_, ops.reference.update_loss_scale_)

    def cases(self, suite):
        runs = {"short": [("tiny", None)], "cpu": [("gpt2-124M", 2)], "gpu": [("gpt2-124M", None), ("gpt2-350M", None)]}[suite]
        cases = []
        for m, layers in runs:
            shapes = parameter_shapes(m, layers)
            n = sum(torch.Size(s).numel() for s in shapes)
            cases.append(Case(f"{m} gradients ({'all' if layers is None else layers} layers, {n / 1e6:.1f}M)",
                              {"model": m, "n_layer": layers, "tensors": len(shapes), "params": n}))
        return cases

    def make_inputs(self, case, dtype, device):
        grads = [torch.randn(s, device=device) for s in parameter_shapes(case.shape["model"], case.shape["n_layer"])]
        # 1 - 2^-10, not a power of two: a wrong scale shows in the check, yet repeated timing calls
        # do not shrink the gradients into denormals (slow on CPU)
        return Inputs([grads], {"inv_scale": 1.0 - 2.0**-10})

    def cast(self, inputs, dtype, grad):
        """Gradients in the benchmark dtype; the scale state is always fp32 / int32, fresh per call site."""
        device = inputs.args[0][0].device
        return Inputs([[g.to(dtype) for g in inputs.args[0]],
                       torch.tensor([inputs.kwargs["inv_scale"]], device=device), torch.zeros(1, device=device),
                       torch.full((1,), 1024.0, device=device), torch.zeros(1, dtype=torch.int32, device=device)])

    def outputs(self, ret, inputs):
        grads, _, found_inf, scale, tracker = inputs.args
        return [*grads, found_inf, scale, tracker.float()]

    def bytes_moved(self, case, dtype, mode):
        return bytes_of((2 * case.shape["params"], dtype))

    def externals(self, device):
        return externals.torch_amp_scaler(device)


BENCH = LossScaleBench()
test_loss_scale = pytest_benchmark_test(BENCH)
