"""Launch policy shared by every kernel file: where kernels may run and which autotune configs to try,
and the two layout rules their wrappers share (row views, the reference's output dtype).

Triton compiles for CUDA devices; with TRITON_INTERPRET=1 it instead runs kernels in a NumPy
interpreter on CPU tensors (how CI tests them). The interpreter is read once, here, at import -
``@triton.jit`` makes the same decision at decoration time, so the two always agree.

Autotuning benchmarks every config; in the interpreter that would multiply the (already slow) run
time by the number of configs and tell nothing about speed, so there each kernel gets one small
config instead (``configs(full, interp)``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def configs(full: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The autotune space: ``full`` on a GPU, just ``interp`` under the interpreter."""
    return [interp] if INTERPRET else full


def runnable_reason(*tensors: torch.Tensor | None) -> str | None:
    """None if Triton can run on these tensors' device, else the reason it cannot."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        return f"tensor on {t.device} (Triton needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return None


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (persistent grids size themselves by it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_hint(t: torch.Tensor, per_sm: int = 1) -> int:
    """A persistent-grid size: ``per_sm`` programs per SM on CUDA, a small number in the interpreter."""
    if t.device.type == "cuda":
        return per_sm * sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel over ``block`` elements: ~8-16 elements a thread
    (16-byte vector loads for 16-bit types), between 1 and 16 warps."""
    return max(1, min(16, block // 256))


def rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a strided view (e.g. a column half) stays a view."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def promoted(x: torch.Tensor, other: torch.Tensor | None) -> torch.dtype:
    """The reference's output dtype for x combined elementwise with ``other`` (x + bias, silu(gate) * up,
    normed * weight): type promotion, so bf16 activations with a float32 parameter give float32."""
    return x.dtype if other is None else torch.promote_types(x.dtype, other.dtype)
