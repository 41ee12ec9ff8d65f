"""One fused AdamW step over every parameter of a model (multi-tensor), in place.

Memory-bound: per parameter it reads p, g, m, v and writes p, m, v (28 bytes in fp32); in fp16/bf16 the
parameters and gradients are low precision and an fp32 master copy is read and written as well (GB/s).
Mode "fwd" is the step (there is no backward).
"""

from __future__ import annotations

import torch

from . import externals
from .harness import Case, Inputs, OpBench, bytes_of
from .pytest_adapter import pytest_benchmark_test
from .shapes import MODELS

_HYPER = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)


def parameter_shapes(model: str, n_layer: int | None, blocks_only: bool = False) -> list[tuple[int, ...]]:
    """Shapes of every parameter of a model (a name of ``shapes.MODELS`` or a pyllm.model preset),
    optionally with fewer layers or without the embeddings, built on the meta device (no memory)."""
    from pyllm.model import Transformer, preset

    cfg = MODELS[model] if model in MODELS else preset(model)
    if n_layer is not None:
        cfg = type(cfg)(**{**cfg.to_dict(), "n_layer": n_layer})
    with torch.device("meta"):
        return [tuple(p.shape) for name, p in Transformer(cfg).named_parameters()
                if not blocks_only or name.startswith("blocks.")]


def model_cases(suite: str, what: str) -> list[Case]:
    """The parameter lists an optimiser-side bench runs on: a whole model on GPU, two GPT-2 blocks on
    CPU (the 38M-entry embedding alone would dominate a CPU run), the tiny model in CI."""
    runs = {"short": [("tiny", None, False)], "cpu": [("gpt2-124M", 2, True)],
            "gpu": [("gpt2-124M", None, False), ("gpt2-350M", None, False)]}[suite]
    cases = []
    for m, layers, blocks in runs:
        shapes = parameter_shapes(m, layers, blocks)
        n = sum(torch.Size(s).numel() for s in shapes)
        scope = f"{layers} blocks" if blocks else "all layers" if layers is None else f"{layers} layers"
        cases.append(Case(f"{m} {what} ({scope}, {n / 1e6:.1f}M params)",
                          {"model": m, "n_layer": layers, "blocks_only": blocks, "tensors": len(shapes), "params": n}))
    return cases


class AdamWBench(OpBench):
    op = "adamw_step"
    metric = "gbps"
    differentiable = False

    def cases(self, suite):
        return model_cases(suite, "parameters")

    def make_inputs(self, case, dtype, device):
        shapes = parameter_shapes(case.shape["model"], case.shape["n_layer"], case.shape.get("blocks_only", False))
        params = [0.02 * torch.randn(s, device=device) for s in shapes]
        grads = [1e-3 * torch.randn(s, device=device) for s in shapes]
        exp_avgs = [1e-4 * torch.randn(s, device=device) for s in shapes]
        exp_avg_sqs = [1e-6 * torch.rand(s, device=device) for s in shapes]
        return Inputs([params, grads, exp_avgs, exp_avg_sqs], dict(_HYPER))

    def cast(self, inputs, dtype, grad):
        """Moments stay fp32; in fp16/bf16 the fp32 parameters become the master copy."""
        params, grads, m, v = inputs.args
        kwargs = dict(inputs.kwargs)
        if dtype != torch.float32:
            kwargs["master_params"] = [p.clone() for p in params]
        return Inputs([[p.to(dtype) for p in params], [g.to(dtype) for g in grads],
                       [t.clone() for t in m], [t.clone() for t in v]], kwargs)

    def outputs(self, ret, inputs):
        params, _, m, v = inputs.args
        return [*params, *m, *v]

    def bytes_moved(self, case, dtype, mode):
        n = case.shape["params"]
        if dtype == torch.float32:
            return bytes_of((7 * n, torch.float32))
        return bytes_of((2 * n, dtype), (6 * n, torch.float32))  # g in, p out; m, v, master in and out

    def externals(self, device):
        return externals.torch_adamw(device)


BENCH = AdamWBench()
test_adamw = pytest_benchmark_test(BENCH)
