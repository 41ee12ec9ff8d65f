"""Observability: the progress bar, JSONL metrics, optional TensorBoard, MFU, peak memory and energy.

MFU = achieved model FLOP/s / the device's peak, with the model's FLOPs per token and the GPU peaks
from ``pyllm.model.flops`` (PaLM's 6 N + 12 L T d count). Energy comes from NVML's total-energy
counter on NVIDIA GPUs, or its power readings integrated over time (pynvml, optional), summed over
ranks; CO2 = kWh x the configured grid intensity. Peak memory is the CUDA allocator's peak on GPUs,
the process's peak resident set on CPUs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from pyllm.data.shards import write_atomic
from pyllm.model.flops import peak_flops

from .config import LOW_DTYPES


def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured figure, else pyllm.model.flops' table for known GPUs; None on
    CPUs (give peak_tflops, e.g. from pyllm.model.flops.cpu_peak_flops)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


def half_matmul_emulated(dtype: torch.dtype, device: str) -> bool:
    """A half-precision matmul this device has no units for (a CPU's bf16 without AVX512-BF16/AMX, fp16
    without AMX-FP16): many times slower than fp32, so its peak is probed at a small size and training in
    it draws a warning (``warn_if_emulated``)."""
    from . import config

    if device == "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (config.cpu_has_native_bf16() if dtype == torch.bfloat16 else config.cpu_has_native_fp16())


def warn_if_emulated(precision: str, device: torch.device) -> None:
    """A RuntimeWarning when ``precision`` runs its matmuls emulated on ``device``: nothing fails, but the
    run is slow for a reason the user may not suspect (the nanoGPT CPU preset, 30 steps on a Zen 4 CPU
    with AVX512-BF16 but no fp16 units: fp32 20,400 tokens/s, bf16 26,400, fp16 1,150)."""
    dtype = LOW_DTYPES.get(precision)
    if dtype is not None and half_matmul_emulated(dtype, device.type):
        units = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AMX-FP16"
        warnings.warn(f"precision={precision!r} on a CPU without {units}: its matmuls are emulated, often 10x "
                      f"or more slower than fp32; precision='fp32' trains faster here", RuntimeWarning, stacklevel=3)


def peak_matmul_candidates(a: torch.Tensor, b: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """The products whose fastest repetition is a device's measured matmul peak for a's dtype (the MFU and
    roofline denominators where no data-sheet figure applies): a @ b, and for float32 on a CPU also
    oneDNN's linear. PyTorch's fp32 CPU matmul is MKL, which runs its AVX2 code on CPUs not made by
    Intel, while the cpu backend's fp32 GEMMs run in oneDNN there (pyllm/ops/cpu_backend.py, "linear
    (GEMMs)"): against MKL alone the default pipeline's pretraining showed an MFU of 120%."""
    gemms = [lambda: a @ b]
    if not a.is_cuda and a.dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        gemms.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return gemms


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class EnergyMeter:
    """Energy used by this process's GPU since construction, read through NVML (pynvml, optional).

    Preferred source: the board's total-energy counter (millijoules since the driver loaded; Volta and
    newer), read at start and at ``kwh()``. Where the counter is unsupported: power readings (milliwatts)
    integrated over time with the trapezoid rule, sampled by ``sample()`` (the trainer calls it every
    step; NVML is read at most once per ``interval`` seconds) and once more at ``kwh()``. ``kwh()`` is
    None on CPUs, without pynvml, or when NVML answers neither.
    """

    def __init__(self, device: torch.device, interval: float = 0.5, clock: Callable[[], float] = time.perf_counter):
        self.interval, self.clock = interval, clock
        self._counter = self._power = None  # () -> mJ since driver load | () -> mW now
        if device.type != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            handle = _nvml_handle(pynvml, device.index or 0)
        except pynvml.NVMLError:
            return
        try:
            self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self._counter = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError:  # no energy counter on this GPU: integrate power readings
            try:
                self._last_mw, self._last_t, self._joules = pynvml.nvmlDeviceGetPowerUsage(handle), clock(), 0.0
                self._power = lambda: pynvml.nvmlDeviceGetPowerUsage(handle)
            except pynvml.NVMLError:
                pass

    def sample(self) -> None:
        """Take a power reading if ``interval`` has passed (only where there is no energy counter)."""
        if self._power is not None and self.clock() - self._last_t >= self.interval:
            self._add_reading()

    def _add_reading(self) -> None:
        now, mw = self.clock(), self._power()
        self._joules += (mw + self._last_mw) / 2 * 1e-3 * (now - self._last_t)  # trapezoid: mean W x s
        self._last_mw, self._last_t = mw, now

    def kwh(self) -> float | None:
        if self._counter is not None:
            return (self._counter() - self._start_mj) / 3.6e9  # 1 kWh = 3.6e6 J = 3.6e9 mJ
        if self._power is not None:
            self._add_reading()
            return self._joules / 3.6e6
        return None


def _nvml_handle(pynvml, cuda_index: int):
    """NVML numbers every GPU of the machine; CUDA numbers only those in CUDA_VISIBLE_DEVICES, in its
    order (indices or UUIDs; abbreviated UUIDs are not resolved and raise NVMLError)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[cuda_index] if cuda_index < len(visible) else str(cuda_index)
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


class MetricsLog:
    """JSONL records (and TensorBoard scalars) from rank 0; a tqdm bar with loss, tokens/s and ETA.

    Training continues from ``start_step`` (a checkpoint's, or 0): the records of later steps in an existing
    metrics.jsonl describe work that is about to be redone, so they are dropped, and every step keeps one
    record of each kind."""

    def __init__(self, out_dir: Path, enabled: bool, progress: bool, tensorboard: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        _drop_records_after(out_dir / "metrics.jsonl", start_step)
        self.file = open(out_dir / "metrics.jsonl", "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("pyllm train: tensorboard=True but the tensorboard package is not installed; skipping it",
                      file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def record(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in metrics:
            post = {"loss": f"{metrics['loss']:.4f}"}
            if "tokens_per_s" in metrics:
                post["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the records of steps after ``step``, and without a last line cut
    short by a kill."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep == lines:
        return
    write_atomic(path, "".join(keep).encode("utf-8"))
