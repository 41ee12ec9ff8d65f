"""Every Triton kernel goes through the real compiler for Hopper (sm_90), not only the interpreter.

Runs tests/kernels/sm90_compile.py in a subprocess (without TRITON_INTERPRET: @triton.jit picks the
interpreter at import time). It catches what the interpreter accepts but the compiler rejects
(non-constexpr globals, loop-carried type changes, unsupported ops), and checks the facts a GPU run
depends on: matmul and attention use Hopper's wgmma, every kernel fits the 227 KB of shared memory
a block may use, and the memory-bound kernels spill no registers. Needs no GPU (Triton ships ptxas).
Which kernels must be compiled is found here, from the @triton.jit functions of pyllm.kernels, so a
new kernel that the tool does not compile fails the test.
"""

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MEMORY_BOUND = ("layernorm", "rmsnorm", "gelu", "swiglu", "rope", "softmax", "cross_entropy", "unscale", "adamw",
                "attention_bwd_preprocess")
TENSOR_CORE = ("matmul", "attention_fwd", "attention_dkdv", "attention_dq")
MAX_SHARED = 227 * 1024


def _launched_kernels() -> set:
    """"module.name" of each @triton.jit function of pyllm.kernels that no other one calls: the kernels the
    launchers start (the others are device functions, compiled inside their callers)."""
    import triton

    import pyllm.kernels

    sources = {}
    for info in pkgutil.iter_modules(pyllm.kernels.__path__):
        module = importlib.import_module(f"pyllm.kernels.{info.name}")
        for obj in vars(module).values():
            if not isinstance(obj, triton.runtime.KernelInterface):
                continue
            while isinstance(obj, triton.runtime.KernelInterface):  # autotuner -> jit (or interpreted) -> function
                obj = obj.fn
            if obj.__module__ == module.__name__:  # not one imported from another kernel file
                sources[f"{info.name}.{obj.__name__}"] = inspect.getsource(obj)
    called = {name for name in sources
              if any(re.search(rf"\b{name.split('.')[1]}\(", src) for other, src in sources.items() if other != name)}
    return set(sources) - called


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tool = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(tool)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    kernels = _launched_kernels()
    # the search itself: a kernel behind an autotuner and a plain one are found, a device function is not
    assert {"attention._attention_fwd_kernel", "layernorm._layernorm_fwd_kernel"} <= kernels, sorted(kernels)
    assert "gelu._tanh" not in kernels, sorted(kernels)
    missing = kernels - {r["function"] for r in rows}
    assert not missing, f"{tool.name} compiles no instance of {sorted(missing)}: add one to its instances()"
    names = {r["kernel"] for r in rows}
    for expected in MEMORY_BOUND + ("matmul", "matmul_accumulate_fp32", "update_scale") + tuple(
            f"attention_{k} D={d}" for k in ("fwd", "dkdv", "dq") for d in (128, 256)):
        assert any(n.startswith(expected) for n in names), f"{expected} was not compiled"
    for r in rows:
        assert r["shared"] <= MAX_SHARED, r
        if r["kernel"].startswith(TENSOR_CORE):
            assert r["wgmma"], f"{r['kernel']} does not use wgmma: {r}"
        if r["kernel"].startswith(MEMORY_BOUND):
            assert r["spill_bytes"] == 0, f"{r['kernel']} spills registers: {r}"
