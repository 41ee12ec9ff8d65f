"""RMSNorm with the fused residual add (Llama's norm): (RMSNorm(x + r), x + r) over d_model.

Memory-bound; bytes counted as for LayerNorm (GB/s).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import MODELS, TOKENS


class RMSNormBench(OpBench):
    op = "rms_norm"
    metric = "gbps"

    def cases(self, suite):
        widths = {"short": ["llama-1B"], "cpu": ["gpt2-124M", "llama-1B"],
                  "gpu": ["gpt2-124M", "llama-1B", "llama-8B"]}[suite]
        n = TOKENS[suite]
        cases = [Case(f"{m} ({n} tokens, d={MODELS[m].d_model})", {"rows": n, "cols": MODELS[m].d_model})
                 for m in widths]
        if suite == "gpu":  # a width past one block of most kernels
            cases.append(Case(f"wide ({n} tokens, d=8192)", {"rows": n, "cols": 8192}))
        return cases

    def make_inputs(self, case, dtype, device):
        n, d = case.shape["rows"], case.shape["cols"]
        x, r = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(2))
        w = 1 + 0.1 * torch.randn(d, device=device, dtype=dtype)
        return Inputs([x, w, r], grad_args=(0, 1, 2))

    def call(self, fn, inputs):
        x, w, r = inputs.args
        return fn(x, w, residual=r)

    def bytes_moved(self, case, dtype, mode):
        nd = case.shape["rows"] * case.shape["cols"]
        fwd = bytes_of((4 * nd, dtype))  # read x, r; write out, x + r
        bwd = bytes_of((4 * nd, dtype))  # read d(out), d(x + r), x + r; write dx (= dr)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def externals(self, device):
        return {**externals.liger(self.op, device), **externals.apex(self.op, device)}


BENCH = RMSNormBench()
test_rms_norm = pytest_benchmark_test(BENCH)
