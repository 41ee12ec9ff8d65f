"""LayerNorm with the fused residual add, as the model calls it: (LN(x + r), x + r) over d_model.

Memory-bound: one read of x and r, one write of the output and the new residual (forward); the
backward reads the upstream gradients and the saved sum and writes one gradient (GB/s).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class LayerNormBench(OpBench):
    op = "layer_norm"
    metric = "gbps"

    def cases(self, suite):
        widths = {"short": ["gpt2-124M"], "cpu": ["gpt2-124M", "llama-1B"],
                  "gpu": ["gpt2-124M", "gpt2-350M", "llama-1B", "llama-8B"]}[suite]
        n = TOKENS[suite]
        cases = [Case(f"{m} ({n} tokens, d={MODELS[m].d_model})", {"rows": n, "cols": MODELS[m].d_model})
                 for m in widths]
        if suite == "cpu":  # the GPT-style models the CPU trains
            cases += [Case(f"{m} ({s.tokens} tokens, d={s.model.d_model})", {"rows": s.tokens, "cols": s.model.d_model})
                      for m, s in CPU_MODELS.items() if s.model.norm == "layernorm"]
        return cases

    def make_inputs(self, case, dtype, device):
        n, d = case.shape["rows"], case.shape["cols"]
        x, r = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(2))
        w = 1 + 0.1 * torch.randn(d, device=device, dtype=dtype)
        b = 0.1 * torch.randn(d, device=device, dtype=dtype)
        return Inputs([x, w, b, r], grad_args=(0, 1, 2, 3))

    def call(self, fn, inputs):
        x, w, b, r = inputs.args
        return fn(x, w, b, residual=r)

    def bytes_moved(self, case, dtype, mode):
        nd = case.shape["rows"] * case.shape["cols"]
        fwd = bytes_of((4 * nd, dtype))  # read x, r; write out, x + r
        bwd = bytes_of((4 * nd, dtype))  # read d(out), d(x + r), x + r; write dx (= dr)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def externals(self, device):
        return {**externals.liger(self.op, device), **externals.apex(self.op, device)}


BENCH = LayerNormBench()
test_layer_norm = pytest_benchmark_test(BENCH)
