"""LayerNorm with the fused residual add, as the model calls it: (LN(x + r), x + r) over d_model.

Memory-bound: one read of x and r, one write of the output and the new residual (forward); the
backward reads the upstream gradients and the saved sum and writes one gradient (GB/s).
``ResidualNormBench`` is what this bench and bench_rms_norm.py share: RMSNorm is the same call
without the bias.
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class ResidualNormBench(OpBench):
    """A norm over d_model with the fused residual add, ``op(x, w[, b], residual=r)`` -> (norm(x + r), x + r),
    at the widths of the models named per suite in ``widths``; ``extra_cases`` adds an op's own shapes."""

    metric = "gbps"
    has_bias: bool = True
    widths: dict[str, list[str]] = {}

    def cases(self, suite):
        n = TOKENS[suite]
        return [Case(f"{m} ({n} tokens, d={MODELS[m].d_model})", {"rows": n, "cols": MODELS[m].d_model})
                for m in self.widths[suite]] + self.extra_cases(suite)

    def extra_cases(self, suite) -> list[Case]:
        return []

    def make_inputs(self, case, dtype, device):
        n, d = case.shape["rows"], case.shape["cols"]
        x, r = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(2))
        params = [1 + 0.1 * torch.randn(d, device=device, dtype=dtype)]  # weight, then the bias
        if self.has_bias:
            params.append(0.1 * torch.randn(d, device=device, dtype=dtype))
        args = [x, *params, r]
        return Inputs(args, grad_args=tuple(range(len(args))))

    def call(self, fn, inputs):
        *args, r = inputs.args
        return fn(*args, residual=r)

    def bytes_moved(self, case, dtype, mode):
        nd = case.shape["rows"] * case.shape["cols"]
        fwd = bytes_of((4 * nd, dtype))  # read x, r; write out, x + r
        bwd = bytes_of((4 * nd, dtype))  # read d(out), d(x + r), x + r; write dx (= dr)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def externals(self, device):
        return {**externals.liger(self.op, device), **externals.apex(self.op, device)}


class LayerNormBench(ResidualNormBench):
    op = "layer_norm"
    widths = {"short": ["gpt2-124M"], "cpu": ["gpt2-124M", "llama-1B"],
              "gpu": ["gpt2-124M", "gpt2-350M", "llama-1B", "llama-8B"]}

    def extra_cases(self, suite):
        if suite != "cpu":
            return []
        # the GPT-style models the CPU trains
        return [Case(f"{m} ({s.tokens} tokens, d={s.model.d_model})", {"rows": s.tokens, "cols": s.model.d_model})
                for m, s in CPU_MODELS.items() if s.model.norm == "layernorm"]


BENCH = LayerNormBench()
test_layer_norm = pytest_benchmark_test(BENCH)
