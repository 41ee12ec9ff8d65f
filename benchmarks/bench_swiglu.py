"""SiLU(gate) * up on the MLP hidden activations of Llama (Shazeer 2020).

Memory-bound: forward reads gate and up, writes y; backward reads dy, gate, up and writes two
gradients (GB/s).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import CPU_MODELS, MODELS, TOKENS


class SwiGLUBench(OpBench):
    op = "swiglu"
    metric = "gbps"

    def cases(self, suite):
        models = {"short": ["llama-1B"], "cpu": ["llama-1B"], "gpu": ["llama-1B", "llama-8B"]}[suite]
        n = TOKENS[suite] if suite != "short" else 16
        cases = [Case(f"{m} MLP ({n} tokens, d_ff={MODELS[m].d_ff})", {"rows": n, "cols": MODELS[m].d_ff})
                 for m in models]
        if suite == "cpu":  # as the model calls it, on the Llama-style models the CPU trains and one large row
            sizes = [(m, s.tokens, s.model.d_ff) for m, s in CPU_MODELS.items() if s.model.mlp == "swiglu"]
            sizes += [(m, n, MODELS[m].d_ff) for m in models]
            cases += [Case(f"{m} MLP, [gate|up] halves ({t} tokens, d_ff={f})", {"rows": t, "cols": f, "halves": True})
                      for m, t, f in sizes]
        return cases

    def make_inputs(self, case, dtype, device):
        n, f = case.shape["rows"], case.shape["cols"]
        if case.shape.get("halves"):  # gate and up as the model makes them: the halves of one (rows, 2 f) tensor
            return Inputs([torch.randn(n, 2 * f, device=device, dtype=dtype)], grad_args=(0,))
        return Inputs([torch.randn(n, f, device=device, dtype=dtype) for _ in range(2)], grad_args=(0, 1))

    def call(self, fn, inputs):
        if len(inputs.args) == 1:
            return fn(*inputs.args[0].chunk(2, dim=-1))
        return fn(*inputs.args, **inputs.kwargs)

    def bytes_moved(self, case, dtype, mode):
        nf = case.shape["rows"] * case.shape["cols"]
        fwd, bwd = bytes_of((3 * nf, dtype)), bytes_of((5 * nf, dtype))
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def externals(self, device):
        return externals.liger(self.op, device)


BENCH = SwiGLUBench()
test_swiglu = pytest_benchmark_test(BENCH)
