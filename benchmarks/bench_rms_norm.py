"""RMSNorm with the fused residual add (Llama's norm): (RMSNorm(x + r), x + r) over d_model.

Memory-bound; bytes counted as for LayerNorm (GB/s). Inputs, call, bytes and external baselines are
LayerNorm's without the bias (``ResidualNormBench`` in bench_layer_norm.py).
"""

from __future__ import annotations

from .bench_layer_norm import ResidualNormBench
from .harness import Case
from .pytest_adapter import pytest_benchmark_test
from .shapes import TOKENS


class RMSNormBench(ResidualNormBench):
    op = "rms_norm"
    has_bias = False
    widths = {"short": ["llama-1B"], "cpu": ["gpt2-124M", "llama-1B"], "gpu": ["gpt2-124M", "llama-1B", "llama-8B"]}

    def extra_cases(self, suite):
        n = TOKENS[suite]  # on GPU, a width past one block of most kernels
        return [Case(f"wide ({n} tokens, d=8192)", {"rows": n, "cols": 8192})] if suite == "gpu" else []


BENCH = RMSNormBench()
test_rms_norm = pytest_benchmark_test(BENCH)
