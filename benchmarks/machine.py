"""What a result was measured on, and the two ceilings every figure is compared with.

``describe()`` records the device, driver, commit and library versions that go into every result line.
``calibrate()`` measures, in the same run, the device's copy bandwidth (GB/s, a large ``copy_``: one
read and one write per byte) and its matmul peak per dtype (TFLOP/s of a large square matmul), so that
roofline percentages compare an op with what this device actually delivers rather than a data sheet.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

from pyllm.info import cpu_identity, cpu_label
from pyllm.train.metrics import half_matmul_emulated, peak_matmul_candidates

from .timing import DTYPES, dtype_context, time_fn

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_changed() -> bool:
    """Uncommitted changes to tracked files other than the results (benchmarks/results/), which every run
    appends to: a suite run in two parts (fp32, then bf16 with --resume) is still a run of its commit."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"))


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@functools.lru_cache(maxsize=None)
def describe(device: str) -> dict:
    """Device, driver, commit and versions: the context of every number measured in this process."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = cpu_identity()
    info = {
        "device_type": device,
        "cpu": cpu_label(cpu),
        "cpu_isa": cpu["isa"],
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        # a copy of the working tree without .git (a lent GPU machine) says its commit in PYLLM_COMMIT
        "commit": _git("rev-parse", "HEAD") or os.environ.get("PYLLM_COMMIT"),
        # True when the checkout had uncommitted changes: the commit alone does not say what ran
        "dirty": code_changed(),
        # other work on the machine when the run started: a shared machine's timings are noisier
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, driver=_nvidia_driver(),
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        info["device_name"] = info["gpu"]
    else:
        info["device_name"] = f"{info['cpu']} ({info['cpu_cores']} cores)"
    return info


def calibrate(device: str, dtypes: list[str], budget_s: float = 0.5) -> dict:
    """{"copy_gbps": float, "matmul_tflops": {dtype: float}} measured now on ``device``."""
    cuda = device == "cuda"
    # fp32 elements: 1 GiB per buffer on GPU, 128 MiB on CPU: measured on this (virtual) 2-core EPYC,
    # buffers of up to 64 MiB still copy from cache at several times DRAM speed
    n = (1 << 28 if cuda else 1 << 25)
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    # A ceiling is the best the device was seen to do: the fastest of many short repetitions, not the
    # median (on a shared CPU most long repetitions are preempted at least once).
    reps = dict(budget_s=budget_s, flush_l2=False, max_reps=500)
    t = time_fn(lambda: dst.copy_(src), device, **reps)
    out = {"copy_gbps": 2 * n * 4 / t["min_ms"] / 1e6, "matmul_tflops": {}}
    del src, dst
    size = 8192 if cuda else 512
    for name in dtypes:
        dtype = DTYPES[name]
        size_d = 128 if half_matmul_emulated(dtype, device) else size
        a = torch.randn(size_d, size_d, device=device, dtype=dtype)
        b = torch.randn(size_d, size_d, device=device, dtype=dtype)
        with dtype_context(name):  # the ceiling: the fastest of the GEMMs a provider may be using
            best_ms = min(time_fn(g, device, **reps)["min_ms"] for g in peak_matmul_candidates(a, b))
        out["matmul_tflops"][name] = 2 * size_d**3 / best_ms / 1e9
    return out
