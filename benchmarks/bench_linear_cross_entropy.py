"""The output head and its loss in one: cross_entropy(h W^T, targets) without the (N, V) logits.

Compute-bound: 2 N H V FLOPs forward, twice that backward (TFLOP/s); peak memory shows what not
materialising the logits saves (on GPU).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class LinearCrossEntropyBench(OpBench):
    op = "linear_cross_entropy"
    metric = "tflops"
    gpu_dtypes = ("fp32", "tf32", "fp16", "bf16")

    def cases(self, suite):
        if suite == "short":  # CI: small enough for a loaded 2-core machine
            return [Case("small head (16 tokens, H=128, V=4096)", {"N": 16, "H": 128, "V": 4096})]
        models = {"cpu": ["gpt2-124M"], "gpu": ["gpt2-124M", "llama-1B", "llama-8B"]}[suite]
        n = {"cpu": 256, "gpu": TOKENS["gpu"]}[suite]
        cases = [Case(f"{m} head ({n} tokens, H={MODELS[m].d_model}, V={MODELS[m].vocab_size})",
                      {"N": n, "H": MODELS[m].d_model, "V": MODELS[m].vocab_size}) for m in models]
        if suite == "cpu":  # the heads of the small models the CPU trains
            cases += [Case(f"{m} head ({s.tokens} tokens, H={s.model.d_model}, V={s.model.vocab_size})",
                           {"N": s.tokens, "H": s.model.d_model, "V": s.model.vocab_size})
                      for m, s in CPU_MODELS.items()]
        return cases

    def make_inputs(self, case, dtype, device):
        n, h, v = case.shape["N"], case.shape["H"], case.shape["V"]
        hidden = torch.randn(n, h, device=device, dtype=dtype)
        weight = torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5
        return Inputs([hidden, weight, torch.randint(0, v, (n,), device=device)], grad_args=(0, 1))

    def flops(self, case, mode):
        f = 2.0 * case.shape["N"] * case.shape["H"] * case.shape["V"]
        return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}[mode]

    def externals(self, device):
        return externals.liger(self.op, device)


BENCH = LinearCrossEntropyBench()
test_linear_cross_entropy = pytest_benchmark_test(BENCH)
