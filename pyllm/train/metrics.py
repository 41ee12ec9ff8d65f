"""Observability: the progress bar, JSONL metrics, optional TensorBoard, MFU, peak memory and energy.

MFU = achieved model FLOP/s / the device's peak, with the model's FLOPs per token from
``pyllm.model.flops`` when present, else the PaLM count (6 x matmul parameters + 12 x layers x width x
sequence for attention). Energy comes from NVML's total-energy counter on NVIDIA GPUs (pynvml, optional);
CO2 = kWh x the configured grid intensity.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

# Dense peak TFLOP/s in bf16/fp16 (tensor cores, no sparsity), from the vendors' data sheets.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                     "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0}


def flops_per_token(model_cfg, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (forward + backward) of a transformer with ``model_cfg``."""
    try:
        from pyllm.model.flops import train_flops_per_token  # the foundation's count, when it exists
    except ImportError:
        train_flops_per_token = None
    if train_flops_per_token is not None:
        return float(train_flops_per_token(model_cfg, seq_len))
    n_matmul = n_params - (model_cfg.max_seq_len * model_cfg.d_model if model_cfg.pos == "learned" else 0)
    if not model_cfg.tie_embeddings:
        n_matmul -= model_cfg.vocab_size * model_cfg.d_model  # the input embedding is a lookup, not a matmul
    return 6.0 * n_matmul + 12.0 * model_cfg.n_layer * model_cfg.n_head * model_cfg.head_dim * seq_len


def device_peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU, or None when unknown (CPUs, fp32 on GPUs unless given)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_16BIT.items():
        if key in name:
            return tflops * 1e12
    return None


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
