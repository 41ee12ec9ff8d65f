"""Timing one callable the way the FlashAttention and Triton benchmarks do.

GPU: CUDA events around each repetition, the L2 cache flushed (a 256 MiB buffer zeroed) before each,
so that no repetition reads its inputs from a cache the previous one warmed; warm-up first (compiles,
autotuning, allocator growth). CPU: wall clock per repetition. The number of repetitions follows from a
time budget, clamped to [min_reps, max_reps]. The result is the median with its spread (quartiles,
min, max): a mean hides the outliers a shared machine produces.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch

# Benchmark dtype names -> tensor dtype. "tf32" is fp32 tensors with TF32 tensor-core matmuls allowed.
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_L2_FLUSH: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def dtype_context(name: str):
    """Allow TF32 matmuls (cuBLAS and cuDNN) inside the block only for the "tf32" dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown benchmark dtype {name!r}; valid: {', '.join(DTYPES)}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _flush_l2(device: str) -> None:
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    _L2_FLUSH[device].zero_()


def time_fn(fn: Callable[[], object], device: str, *, budget_s: float = 0.2, warmup_s: float = 0.05,
            min_reps: int = 3, max_reps: int = 200, flush_l2: bool = True) -> dict:
    """Time ``fn()``; returns {"median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "reps"}."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # warm-up: at least one call, then until warmup_s has passed; it also estimates one call's cost
    fn()
    sync()
    start, calls = time.perf_counter(), 0
    while True:
        fn()
        sync()
        calls += 1
        if time.perf_counter() - start >= warmup_s:
            break
    estimate_s = (time.perf_counter() - start) / calls
    reps = int(min(max_reps, max(min_reps, budget_s / max(estimate_s, 1e-7))))
    times_ms = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush_l2:
                _flush_l2(device)
            begin.record()
            fn()
            end.record()
        sync()
        times_ms = [b.elapsed_time(e) for b, e in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    return summarize(times_ms)


def summarize(times_ms: list[float]) -> dict:
    """Median and spread of a list of timings (ms)."""
    if not times_ms:
        raise ValueError("summarize: no timings")
    if len(times_ms) >= 2:
        q25, _, q75 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q25 = q75 = times_ms[0]
    return {"median_ms": statistics.median(times_ms), "q25_ms": q25, "q75_ms": q75,
            "min_ms": min(times_ms), "max_ms": max(times_ms), "reps": len(times_ms)}
