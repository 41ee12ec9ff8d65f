"""Causal attention at the head layouts of GPT-2 and Llama (grouped-query), sequences 512 to 16k, and of
the small models the CPU trains (benchmarks/shapes.py CPU_MODELS).

Compute-bound. FLOPs counted as in the FlashAttention benchmarks: 4 B H T S D for the two matmuls of
the forward, halved for causal; the backward is 2.5 times the forward (five matmuls instead of two).
"""

from __future__ import annotations

import torch

from pyllm import ops

from . import externals
from .harness import Case, Inputs, OpBench
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS


class AttentionBench(OpBench):
    op = "attention"
    metric = "tflops"
    gpu_dtypes = ("fp32", "tf32", "fp16", "bf16")

    def cases(self, suite):
        # (model, batch, sequence)
        runs = {"short": [("gpt2-124M", 1, 32)],
                "cpu": [("gpt2-124M", 1, 512), ("llama-1B", 1, 256)],
                "gpu": [("gpt2-124M", 16, 512), ("gpt2-124M", 8, 1024), ("gpt2-350M", 4, 2048),
                        ("llama-1B", 2, 4096), ("llama-8B", 1, 8192), ("llama-8B", 1, 16384)]}[suite]
        cases = []
        for m, b, t in runs:
            cfg = MODELS[m]
            shape = {"B": b, "Hq": cfg.n_head, "Hkv": cfg.n_kv_head, "T": t, "D": cfg.head_dim, "causal": True}
            cases.append(Case(f"{m} (B={b}, T={t}, {cfg.n_head}/{cfg.n_kv_head} heads, D={cfg.head_dim})", shape))
        if suite == "cpu":  # the small models the CPU trains, at one training step's batch
            for m, s in CPU_MODELS.items():
                cfg, t = s.model, s.tokens // s.batch
                shape = {"B": s.batch, "Hq": cfg.n_head, "Hkv": cfg.n_kv_head, "T": t, "D": cfg.head_dim,
                         "causal": True}
                cases.append(Case(f"{m} (B={s.batch}, T={t}, {cfg.n_head}/{cfg.n_kv_head} heads, D={cfg.head_dim})",
                                  shape))
        return cases

    def make_inputs(self, case, dtype, device):
        s = case.shape
        q = torch.randn(s["B"], s["Hq"], s["T"], s["D"], device=device, dtype=dtype)
        k, v = (torch.randn(s["B"], s["Hkv"], s["T"], s["D"], device=device, dtype=dtype) for _ in range(2))
        return Inputs([q, k, v], {"causal": s["causal"]}, grad_args=(0, 1, 2))

    def flops(self, case, mode):
        s = case.shape
        fwd = 4.0 * s["B"] * s["Hq"] * s["T"] * s["T"] * s["D"] / (2 if s["causal"] else 1)
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]

    def externals(self, device):
        # the reference already calls SDPA (a fused kernel); the written-out formula is the unfused program
        return {"torch unfused formula": ops.reference.attention_explicit,
                **externals.flash_attn(device), **externals.sdpa_backends(device)}


BENCH = AttentionBench()
test_attention = pytest_benchmark_test(BENCH)
