"""GELU(x + bias), tanh form, on the MLP hidden activations of GPT-2 (d_ff = 4 d_model).

Memory-bound: forward reads x, writes y; backward reads dy and x, writes dx (GB/s).
"""

from __future__ import annotations

import torch

from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class BiasGeluBench(OpBench):
    op = "bias_gelu"
    metric = "gbps"

    def cases(self, suite):
        models = {"short": ["gpt2-124M"], "cpu": ["gpt2-124M"], "gpu": ["gpt2-124M", "gpt2-350M"]}[suite]
        n = TOKENS[suite]
        cases = [Case(f"{m} MLP ({n} tokens, d_ff={MODELS[m].d_ff})", {"rows": n, "cols": MODELS[m].d_ff})
                 for m in models]
        if suite == "cpu":  # the GPT-style models the CPU trains
            cases += [Case(f"{m} MLP ({s.tokens} tokens, d_ff={s.model.d_ff})", {"rows": s.tokens, "cols": s.model.d_ff})
                      for m, s in CPU_MODELS.items() if s.model.mlp == "gelu"]
        return cases

    def make_inputs(self, case, dtype, device):
        n, f = case.shape["rows"], case.shape["cols"]
        return Inputs([torch.randn(n, f, device=device, dtype=dtype), 0.1 * torch.randn(f, device=device, dtype=dtype)],
                      grad_args=(0, 1))

    def bytes_moved(self, case, dtype, mode):
        nf = case.shape["rows"] * case.shape["cols"]
        fwd, bwd = bytes_of((2 * nf, dtype)), bytes_of((3 * nf, dtype))
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


BENCH = BiasGeluBench()
test_bias_gelu = pytest_benchmark_test(BENCH)
