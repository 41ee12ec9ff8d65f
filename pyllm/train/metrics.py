"""Observability: the progress bar, JSONL metrics, optional TensorBoard, MFU, peak memory and energy.

MFU = achieved model FLOP/s / the device's peak, with the model's FLOPs per token and the GPU peaks
from ``pyllm.model.flops`` (PaLM's 6 N + 12 L T d count). Energy comes from NVML's total-energy
counter on NVIDIA GPUs (pynvml, optional); CO2 = kWh x the configured grid intensity. Peak memory is
the CUDA allocator's peak on GPUs, the process's peak resident set on CPUs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from pyllm.model.flops import peak_flops

def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured figure, else pyllm.model.flops' table for known GPUs; None on
    CPUs (give peak_tflops, e.g. from pyllm.model.flops.cpu_peak_flops)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class EnergyMeter:
    """Joules used by the GPU since start(), from NVML (None where NVML or the counter is missing)."""

    def __init__(self, device: torch.device):
        self.handle, self.start_mj = None, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # millijoules
            self.start_mj = self._read()
        except Exception:  # pynvml missing, or a GPU without the energy counter
            self.handle = None

    def kwh(self) -> float | None:
        if self.handle is None:
            return None
        return (self._read() - self.start_mj) / 3.6e9


class MetricsLog:
    """JSONL records (and TensorBoard scalars) from rank 0; a tqdm bar with loss, tokens/s and ETA."""

    def __init__(self, out_dir: Path, enabled: bool, progress: bool, tensorboard: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
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
