"""The same benchmarks under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each ``bench_<op>.py`` exposes ``test_<op>``, parametrized over (case, dtype, mode, provider) of the
suite named by ``PYLLM_BENCH_SUITE`` (default: "gpu" with a CUDA device, else "short"). A test first
checks the provider against the reference (a wrong result fails the test), then hands the timed call
to pytest-benchmark; providers that are absent or reject the inputs are skipped with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from .harness import (MODES, OpBench, RunOptions, check, providers, reference_truth, strict_backends,
                      timed_call)
from .timing import DTYPES, _flush_l2, dtype_context

_ROUNDS = {"short": 5, "cpu": 20, "gpu": 100}


def _options() -> RunOptions:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return RunOptions(suite=os.environ.get("PYLLM_BENCH_SUITE") or ("gpu" if device == "cuda" else "short"),
                      device=device)


def pytest_benchmark_test(bench: OpBench):
    """A parametrized pytest-benchmark test function for ``bench``."""
    opts = _options()
    modes = MODES if bench.differentiable else ("fwd",)
    grid = [pytest.param(case, d, m, id=f"{case.label}-{d}-{m}")
            for case in bench.cases(opts.suite) for d in opts.dtypes_for(bench) for m in modes]

    @pytest.mark.parametrize("provider", list(providers(bench, opts.device)))
    @pytest.mark.parametrize("case,dtype_name,mode", grid)
    def test(benchmark, case, dtype_name, mode, provider):
        fn = providers(bench, opts.device)[provider]
        if isinstance(fn, str):
            pytest.skip(fn)
        if provider == "torch.compile" and opts.suite == "short":
            pytest.skip("torch.compile is left out of the short suite (compile time)")
        device, dtype = opts.device, DTYPES[dtype_name]
        torch._dynamo.reset()
        torch.manual_seed(0)
        with strict_backends(), torch._functorch.config.patch(donated_buffer=False):
            base = bench.make_inputs(case, torch.float32, device)
            truth = reference_truth(bench, base, dtype, dtype_name, device)
            try:
                check(bench, fn, base, dtype, dtype_name, truth)  # AssertionError: a wrong result fails
            except (AssertionError, KeyboardInterrupt):
                raise
            except Exception as e:
                pytest.skip(f"{type(e).__name__}: {e}")
            inputs = bench.cast(base, dtype, True)
            with dtype_context(dtype_name):
                call = timed_call(bench, fn, inputs, mode, truth.upstream)
                if device == "cuda":
                    target = lambda: (call(), torch.cuda.synchronize())  # noqa: E731
                    setup = lambda: _flush_l2(device)  # noqa: E731
                else:
                    target, setup = call, None
                benchmark.extra_info.update(op=bench.op, shape=case.shape, dtype=dtype_name, mode=mode)
                benchmark.pedantic(target, setup=setup, rounds=_ROUNDS[opts.suite], warmup_rounds=1)

    test.__name__ = f"test_{bench.op}"
    return test
