"""GPU-only trainer checks (skipped without CUDA): bf16 + torch.compile tracks fp32, a whole fp16
step with the loss scaler makes no host synchronisation, and NVML's energy reading arrives (its
arithmetic is tested on CPU in test_energy.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from .helpers import losses, make_trainer, tiny_model

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_gpu
def test_bf16_compiled_tracks_fp32_on_gpu(tmp_path):
    ref = np.array(losses(make_trainer(tmp_path / "fp32", device="cuda", max_steps=10).fit()))
    low = np.array(losses(make_trainer(tmp_path / "bf16", device="cuda", precision="bf16", compile=True,
                                       max_steps=10).fit()))
    assert np.max(np.abs(low - ref) / ref) < 1e-2  # bf16 unit roundoff 3.9e-3, a few steps of drift


class _OnDevice:
    """Wraps a batch source so batches are already CUDA tensors (no host-to-device copy in the step)."""

    def __init__(self, inner, batches=8, loss_weight=False):
        self.batches = [{k: v.cuda() for k, v in inner.next_batch().items()} for _ in range(batches)]
        if loss_weight:  # as SFT's packed rows carry it: a host number (their trained-token count)
            self.batches = [{**b, "loss_weight": 100 + i} for i, b in enumerate(self.batches)]
        self.i = 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


@requires_gpu
@pytest.mark.parametrize("loss_weight", [False, True])
def test_fp16_step_has_no_host_sync(tmp_path, loss_weight):
    t = make_trainer(tmp_path, model=tiny_model(), device="cuda", precision="fp16", master_weights=True,
                     micro_batch_size=2)
    t.batches = _OnDevice(t.batches, loss_weight=loss_weight)
    t.train_step(1e-3)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step(1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.scaler.skipped.item() == 0


@requires_gpu
def test_nvml_energy_is_measured_on_gpu(tmp_path):
    pytest.importorskip("pynvml", reason="nvidia-ml-py (in the dev extra) is not installed")
    t0 = time.perf_counter()
    summary = make_trainer(tmp_path, device="cuda", max_steps=200).fit()
    watts = summary["energy_kwh"] * 3.6e6 / (time.perf_counter() - t0)
    assert 5 < watts < 1500, watts  # a plausible mean board power while training, for any data-centre GPU
    assert summary["co2_kg"] == pytest.approx(summary["energy_kwh"] * 0.4)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["energy_kwh"] == summary["energy_kwh"]
