"""The NVML energy path on a CPU machine: a stand-in ``pynvml`` module replays scripted readings, so
the arithmetic (mJ and mW to kWh, the trapezoid rule, CO2) and the wiring into the summary and the
JSONL are checked here; a GPU session only has to confirm that real readings arrive."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import pyllm.train.trainer as trainer_module
from pyllm.train.metrics import EnergyMeter

from .helpers import make_trainer

CUDA0 = torch.device("cuda", 0)  # only a label: the meter never touches CUDA itself


class _NVMLError(Exception):
    pass


def fake_nvml(monkeypatch, energy_mj=None, power_mw=None, gpus=("GPU-a", "GPU-b", "GPU-c")):
    """Install a ``pynvml`` whose counter / power readings come from the given iterables (None: that
    query is unsupported, as on GPUs without the counter). Returns the handles asked for, in order."""
    energy, power, opened = iter(energy_mj or ()), iter(power_mw or ()), []

    def reader(values, supported):
        def read(handle):
            assert handle in gpus
            if not supported:
                raise _NVMLError("Not Supported")
            return next(values)
        return read

    def by_index(i):
        opened.append(gpus[i])
        return gpus[i]

    def by_uuid(uuid):
        if uuid not in gpus:
            raise _NVMLError("Not Found")
        opened.append(uuid)
        return uuid

    module = types.SimpleNamespace(
        NVMLError=_NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetTotalEnergyConsumption=reader(energy, energy_mj is not None),
        nvmlDeviceGetPowerUsage=reader(power, power_mw is not None))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return opened


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_energy_counter_difference_in_millijoules_is_kwh(monkeypatch):
    opened = fake_nvml(monkeypatch, energy_mj=[5_000_000, 5_000_000 + 7_200_000_000])
    meter = EnergyMeter(CUDA0)
    meter.sample()  # no power sampling where the counter exists (the iterator would run dry)
    assert meter.kwh() == pytest.approx(2.0, rel=1e-12)  # 7.2e9 mJ = 7.2e6 J = 2 kWh
    assert opened == ["GPU-a"]


def test_power_readings_in_milliwatts_are_integrated_with_the_trapezoid_rule(monkeypatch):
    # a ramp 0 -> 400 W over one hour, read every 15 min: the trapezoid rule is exact on a line, 0.2 kWh
    fake_nvml(monkeypatch, power_mw=[0, 100_000, 200_000, 300_000, 400_000])
    clock = Clock()
    meter = EnergyMeter(CUDA0, interval=900.0, clock=clock)
    for _ in range(3):
        clock.t += 450.0
        meter.sample()  # half an interval: no reading yet
        clock.t += 450.0
        meter.sample()
    clock.t += 900.0
    assert meter.kwh() == pytest.approx(0.2, rel=1e-12)


def test_power_integration_weights_uneven_intervals(monkeypatch):
    # 100 W for 10 s, then a step up read after 30 s: (100 + 100) / 2 * 10 + (100 + 500) / 2 * 30 = 10 kJ
    fake_nvml(monkeypatch, power_mw=[100_000, 100_000, 500_000])
    clock = Clock()
    meter = EnergyMeter(CUDA0, interval=1.0, clock=clock)
    clock.t += 10.0
    meter.sample()
    clock.t += 30.0
    assert meter.kwh() == pytest.approx(10_000 / 3.6e6, rel=1e-12)


def test_no_energy_without_a_gpu_pynvml_or_any_nvml_source(monkeypatch):
    fake_nvml(monkeypatch)  # neither the counter nor power is supported
    assert EnergyMeter(CUDA0).kwh() is None
    assert EnergyMeter(torch.device("cpu")).kwh() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert EnergyMeter(CUDA0).kwh() is None


@pytest.mark.parametrize("visible,index,expected", [(None, 1, "GPU-b"), ("2,0", 0, "GPU-c"),
                                                     ("GPU-b, GPU-a", 1, "GPU-a")])
def test_the_metered_gpu_is_the_one_cuda_visible_devices_maps_the_device_to(monkeypatch, visible, index, expected):
    opened = fake_nvml(monkeypatch, energy_mj=[0, 0])
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert EnergyMeter(torch.device("cuda", index)).kwh() == 0.0
    assert opened == [expected]


def test_trainer_reports_measured_kwh_and_co2_in_summary_and_jsonl(monkeypatch, tmp_path):
    fake_nvml(monkeypatch, energy_mj=[1_000_000_000, 1_000_000_000 + 1_800_000_000])  # 0.5 kWh
    monkeypatch.setattr(trainer_module, "EnergyMeter", lambda device: EnergyMeter(CUDA0))  # as if on a GPU
    summary = make_trainer(tmp_path, max_steps=2, carbon_intensity=0.3).fit()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["energy_kwh"] == summary["energy_kwh"] == pytest.approx(0.5, rel=1e-12)
    assert saved["co2_kg"] == summary["co2_kg"] == pytest.approx(0.15, rel=1e-12)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["energy_kwh"] == pytest.approx(0.5) and last["co2_kg"] == pytest.approx(0.15)
