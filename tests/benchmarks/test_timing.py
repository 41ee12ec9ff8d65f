import pytest
import torch

from benchmarks.timing import dtype_context, summarize, time_fn


def test_summarize_median_quartiles_and_extremes():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median_ms": 3.0, "q25_ms": 2.0, "q75_ms": 4.0, "min_ms": 1.0, "max_ms": 5.0, "reps": 5}
    one = summarize([7.0])
    assert one["median_ms"] == one["q25_ms"] == one["q75_ms"] == 7.0
    with pytest.raises(ValueError, match="no timings"):
        summarize([])


def test_time_fn_counts_calls_within_rep_bounds():
    calls = []
    stats = time_fn(lambda: calls.append(1), "cpu", budget_s=0.01, warmup_s=0.0, min_reps=4, max_reps=6)
    assert 4 <= stats["reps"] <= 6
    assert len(calls) >= stats["reps"] + 2  # one warm-up call, at least one estimating call, then the reps
    assert 0 <= stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_tf32_only_inside_the_tf32_context():
    before = torch.backends.cuda.matmul.allow_tf32
    with dtype_context("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
    with dtype_context("bf16"):
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="unknown benchmark dtype 'fp8'"):
        with dtype_context("fp8"):
            pass
