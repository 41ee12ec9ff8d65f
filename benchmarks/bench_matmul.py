"""matmul a (M, K) @ b (K, N): squares, and the MLP projections of GPT-2 and Llama.

Compute-bound: 2 M N K FLOPs forward, twice that backward (dA and dB) (TFLOP/s).
"""

from __future__ import annotations

import torch

from .harness import Case, Inputs, OpBench
from .pytest_adapter import pytest_benchmark_test
from .shapes import MODELS, TOKENS


class MatmulBench(OpBench):
    op = "matmul"
    metric = "tflops"
    gpu_dtypes = ("fp32", "tf32", "fp16", "bf16")

    def cases(self, suite):
        squares = {"short": [128], "cpu": [512, 1024], "gpu": [1024, 2048, 4096, 8192]}[suite]
        cases = [Case(f"square {n}", {"M": n, "K": n, "N": n}) for n in squares]
        models = {"short": [], "cpu": ["gpt2-124M"], "gpu": ["gpt2-124M", "llama-8B"]}[suite]
        n = TOKENS[suite]
        for m in models:
            d, f = MODELS[m].d_model, MODELS[m].d_ff
            cases.append(Case(f"{m} MLP up ({n} tokens, {d}->{f})", {"M": n, "K": d, "N": f}))
        return cases

    def make_inputs(self, case, dtype, device):
        s = case.shape
        return Inputs([torch.randn(s["M"], s["K"], device=device, dtype=dtype),
                       torch.randn(s["K"], s["N"], device=device, dtype=dtype)], grad_args=(0, 1))

    def flops(self, case, mode):
        f = 2.0 * case.shape["M"] * case.shape["N"] * case.shape["K"]
        return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}[mode]


BENCH = MatmulBench()
test_matmul = pytest_benchmark_test(BENCH)
