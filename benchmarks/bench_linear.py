"""linear with a fused GELU epilogue: GELU_tanh(x W^T + b), GPT-2's MLP up-projection.

Compute-bound: 2 M N K FLOPs forward, twice that backward (TFLOP/s); the epilogue's pointwise work is
not counted.
"""

from __future__ import annotations

import torch

from .harness import Case, Inputs, OpBench
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class LinearBench(OpBench):
    op = "linear"
    metric = "tflops"
    gpu_dtypes = ("fp32", "tf32", "fp16", "bf16")

    def cases(self, suite):
        if suite == "short":
            return [Case("small MLP up + GELU (64 tokens, 128->512)", {"M": 64, "K": 128, "N": 512, "activation": "gelu_tanh"})]
        models = {"cpu": ["gpt2-124M"], "gpu": ["gpt2-124M", "gpt2-350M"]}[suite]
        n = TOKENS[suite]
        cases = [Case(f"{m} MLP up + GELU ({n} tokens, {MODELS[m].d_model}->{MODELS[m].d_ff})",
                      {"M": n, "K": MODELS[m].d_model, "N": MODELS[m].d_ff, "activation": "gelu_tanh"})
                 for m in models]
        if suite == "cpu":  # and the MLP up-projections of the small models the CPU trains
            cases += [Case(f"{m} MLP up + GELU ({s.tokens} tokens, {s.model.d_model}->{s.model.d_ff})",
                           {"M": s.tokens, "K": s.model.d_model, "N": s.model.d_ff, "activation": "gelu_tanh"})
                      for m, s in CPU_MODELS.items() if s.model.mlp == "gelu"]
        return cases

    def make_inputs(self, case, dtype, device):
        s = case.shape
        x = torch.randn(s["M"], s["K"], device=device, dtype=dtype)
        w = torch.randn(s["N"], s["K"], device=device, dtype=dtype) / s["K"] ** 0.5
        b = 0.1 * torch.randn(s["N"], device=device, dtype=dtype)
        return Inputs([x, w, b], {"activation": s["activation"]}, grad_args=(0, 1, 2))

    def flops(self, case, mode):
        f = 2.0 * case.shape["M"] * case.shape["N"] * case.shape["K"]
        return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}[mode]


BENCH = LinearBench()
test_linear = pytest_benchmark_test(BENCH)
