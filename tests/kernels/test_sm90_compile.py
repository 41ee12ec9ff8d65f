"""Every Triton kernel goes through the real compiler for Hopper (sm_90), not only the interpreter.

Runs tests/kernels/sm90_compile.py in a subprocess (without TRITON_INTERPRET: @triton.jit picks the
interpreter at import time). It catches what the interpreter accepts but the compiler rejects
(non-constexpr globals, loop-carried type changes, unsupported ops), and checks the facts a GPU run
depends on: matmul and attention use Hopper's wgmma, every kernel fits the 227 KB of shared memory
a block may use, and the memory-bound kernels spill no registers. Needs no GPU (Triton ships ptxas).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MEMORY_BOUND = ("layernorm", "rmsnorm", "gelu", "swiglu", "rope", "softmax", "cross_entropy", "unscale", "adamw")
MAX_SHARED = 227 * 1024


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tool = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(tool)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    names = {r["kernel"] for r in rows}
    for expected in MEMORY_BOUND + ("matmul", "matmul_accumulate_fp32", "update_scale") + tuple(
            f"attention_{k} D={d}" for k in ("fwd", "dkdv", "dq") for d in (128, 256)):
        assert any(n.startswith(expected) for n in names), f"{expected} was not compiled"
    for r in rows:
        assert r["shared"] <= MAX_SHARED, r
        if r["kernel"].startswith(("matmul", "attention")):
            assert r["wgmma"], f"{r['kernel']} does not use wgmma: {r}"
        if r["kernel"].startswith(MEMORY_BOUND):
            assert r["spill_bytes"] == 0, f"{r['kernel']} spills registers: {r}"
