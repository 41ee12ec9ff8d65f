"""Softmax over the last dim: attention-score rows (up to 16k keys) and vocabulary rows (128k).

Memory-bound: forward reads x, writes y; backward reads y and dy, writes dx (GB/s).
"""

from __future__ import annotations

import torch

from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS


class SoftmaxBench(OpBench):
    op = "softmax"
    metric = "gbps"

    def cases(self, suite):
        sizes = {"short": [(64, 512)], "cpu": [(1024, 1024), (256, 50257)],
                 "gpu": [(16384, 1024), (4096, 4096), (1024, 16384), (1024, 128256)]}[suite]
        cases = [Case(f"{rows}x{cols}", {"rows": rows, "cols": cols}) for rows, cols in sizes]
        if suite == "cpu":  # almost no work: the time is each provider's fixed cost per call (dispatch, autograd)
            cases.append(Case("per-call cost 4x128", {"rows": 4, "cols": 128}))
        if suite == "cpu":  # attention-score rows of the small models the CPU trains: (B H T, T)
            for m, s in CPU_MODELS.items():
                rows, cols = s.tokens * s.model.n_head, s.tokens // s.batch
                cases.append(Case(f"{m} attention scores {rows}x{cols}", {"rows": rows, "cols": cols}))
        return cases

    def make_inputs(self, case, dtype, device):
        return Inputs([torch.randn(case.shape["rows"], case.shape["cols"], device=device, dtype=dtype)],
                      grad_args=(0,))

    def bytes_moved(self, case, dtype, mode):
        n = case.shape["rows"] * case.shape["cols"]
        fwd, bwd = bytes_of((2 * n, dtype)), bytes_of((3 * n, dtype))
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


BENCH = SoftmaxBench()
test_softmax = pytest_benchmark_test(BENCH)
