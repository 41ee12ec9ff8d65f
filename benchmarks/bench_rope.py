"""Rotary embedding of q and k (Su et al. 2021) at Llama's head layout (grouped-query heads).

Memory-bound: forward reads q, k (and the small cos/sin tables), writes both rotated; the backward
rotates the gradients back, the same traffic (GB/s).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import MODELS


class RopeBench(OpBench):
    op = "rope"
    metric = "gbps"

    def cases(self, suite):
        # (model, batch, sequence)
        runs = {"short": [("llama-1B", 1, 32)], "cpu": [("llama-1B", 1, 512)],
                "gpu": [("llama-1B", 4, 2048), ("llama-8B", 2, 4096), ("llama-8B", 1, 16384)]}[suite]
        cases = []
        for m, b, t in runs:
            cfg = MODELS[m]
            shape = {"B": b, "Hq": cfg.n_head, "Hkv": cfg.n_kv_head, "T": t, "D": cfg.head_dim}
            cases.append(Case(f"{m} (B={b}, T={t}, {cfg.n_head}/{cfg.n_kv_head} heads, D={cfg.head_dim})", shape))
        return cases

    def make_inputs(self, case, dtype, device):
        s = case.shape
        q = torch.randn(s["B"], s["Hq"], s["T"], s["D"], device=device, dtype=dtype)
        k = torch.randn(s["B"], s["Hkv"], s["T"], s["D"], device=device, dtype=dtype)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, s["D"], 2, device=device).float() / s["D"])
        freqs = torch.arange(s["T"], device=device).float()[:, None] * inv_freq  # (T, D/2)
        return Inputs([q, k, freqs.cos().to(dtype), freqs.sin().to(dtype)], grad_args=(0, 1))

    def bytes_moved(self, case, dtype, mode):
        s = case.shape
        qk = s["B"] * (s["Hq"] + s["Hkv"]) * s["T"] * s["D"]
        one = bytes_of((2 * qk, dtype), (s["T"] * s["D"], dtype))  # q, k in and out; cos and sin
        return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]

    def externals(self, device):
        return externals.liger(self.op, device)


BENCH = RopeBench()
test_rope = pytest_benchmark_test(BENCH)
