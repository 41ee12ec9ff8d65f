"""Dynamic loss scaling, the two device-side steps of a mixed-precision optimiser step: unscale every
gradient while checking for inf/nan (one multi-tensor pass), then update the scale. No host sync.

Memory-bound: every gradient is read and written once (GB/s). Mode "fwd" is the step.
"""

from __future__ import annotations

import torch

from pyllm import ops

from . import externals
from .bench_adamw import model_cases, parameter_shapes
from .harness import Inputs, OpBench, bytes_of
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
        return model_cases(suite, "gradients")

    def make_inputs(self, case, dtype, device):
        shapes = parameter_shapes(case.shape["model"], case.shape["n_layer"], case.shape.get("blocks_only", False))
        grads = [torch.randn(s, device=device) for s in shapes]
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
