"""Softmax cross-entropy of logits (N, V) against targets: GPT-2's 50k and Llama-3's 128k vocabularies.

Memory-bound: the forward reads the logits once; the backward reads them and writes their gradient
(GB/s). The unfused reference also materialises an fp32 copy; the figure counts only the least traffic.
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import MODELS, TOKENS


class CrossEntropyBench(OpBench):
    op = "cross_entropy"
    metric = "gbps"

    def cases(self, suite):
        models = {"short": ["gpt2-124M"], "cpu": ["gpt2-124M", "llama-1B"], "gpu": ["gpt2-124M", "llama-8B"]}[suite]
        n = {"short": 4, "cpu": 256, "gpu": TOKENS["gpu"]}[suite]
        return [Case(f"{m} vocab ({n} tokens, V={MODELS[m].vocab_size})", {"N": n, "V": MODELS[m].vocab_size})
                for m in models]

    def make_inputs(self, case, dtype, device):
        n, v = case.shape["N"], case.shape["V"]
        logits = torch.randn(n, v, device=device, dtype=dtype)
        return Inputs([logits, torch.randint(0, v, (n,), device=device)], grad_args=(0,))

    def bytes_moved(self, case, dtype, mode):
        nv = case.shape["N"] * case.shape["V"]
        fwd, bwd = bytes_of((nv, dtype)), bytes_of((2 * nv, dtype))
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def externals(self, device):
        return externals.liger(self.op, device)


BENCH = CrossEntropyBench()
test_cross_entropy = pytest_benchmark_test(BENCH)
