"""``pyllm plan``: size a model and its data for a budget, and estimate time, cost and energy.

Compute-optimal sizing after Hoffmann et al. 2022 (Chinchilla): about 20 training tokens per
parameter, and C = 6 N D training FLOPs. Give exactly one of: a parameter count, a token budget, a
compute budget (FLOPs) or a wall-clock budget on the chosen devices. The shape (layers, width, heads)
is a GPT-2-style model whose parameter count comes from ``pyllm.model.flops.param_counts``.

Estimates, not measurements: time = C / (devices x peak x MFU); energy = devices x board power x time;
cost = device-hours x price. The MFU, power and price are stated assumptions (override them).

    pyllm plan --params 124M --device h100 --gpus 8
    pyllm plan --hours 24 --device a100 --gpus 8 --mfu 0.35 --price 1.8
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass

from pyllm.model import ModelConfig
from pyllm.model.flops import PEAK_FLOPS, param_counts

TOKENS_PER_PARAM = 20.0
MAX_LAYERS, MAX_WIDTH = 128, 16384  # the largest shape model_shape considers (about 413B parameters)

# device -> (PEAK_FLOPS key, board power in W (the data sheet's max TDP), assumed on-demand $/device-hour)
DEVICES = {
    "h100": ("H100 SXM", 700.0, 3.0),
    "h100-pcie": ("H100 PCIe", 350.0, 2.5),
    "h200": ("H200", 700.0, 3.5),
    "a100": ("A100", 400.0, 1.8),
    "l4": ("L4", 72.0, 0.8),
    "rtx4090": ("RTX 4090", 450.0, 0.5),
    "v100": ("V100 SXM2", 300.0, 0.9),
}


class PlanError(ValueError):
    """Bad plan arguments (one line)."""


@dataclass
class Plan:
    params: float
    """Target parameter count N."""
    tokens: float
    """Training tokens D (20 N when compute-optimal)."""
    flops: float
    """Training compute C = 6 N D."""
    model: dict
    """A model shape near N: n_layer, d_model, n_head and its exact parameter count."""
    device: str
    gpus: int
    mfu: float
    hours: float
    """Wall-clock estimate: C / (gpus x peak x mfu)."""
    energy_kwh: float | None
    """None for a device of unknown power (no --power-w)."""
    cost_usd: float | None
    """None for a device of unknown price (no --price)."""
    co2_kg: float | None


def parse_count(text: str) -> float:
    """'124M', '1.5B', '2e9', '300k' -> float."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise PlanError(f"cannot read {text!r} as a count (examples: 124M, 1.5B, 2e9)") from None


def model_shape(n_params: float, vocab_size: int, seq_len: int) -> dict:
    """The GPT-2-style shape (d_model a multiple of 64, head dim 64, aspect d_model / n_layer near 64,
    as GPT-2 small's 768 / 12) whose parameter count is closest to ``n_params``."""
    best = None
    for n_layer in range(1, MAX_LAYERS + 1):
        for d_model in range(64, MAX_WIDTH + 1, 64):
            cfg = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=d_model // 64, d_model=d_model,
                              max_seq_len=seq_len)
            n = param_counts(cfg).total
            if n > 1.5 * n_params:
                break
            score = abs(math.log(n / n_params)) + 0.1 * abs(math.log(d_model / n_layer / 64))
            if best is None or score < best[0]:
                best = (score, {"n_layer": n_layer, "d_model": d_model, "n_head": d_model // 64, "params": n})
    if best is None:
        raise PlanError(f"no GPT-style shape has about {n_params:.3g} parameters (vocab {vocab_size} alone is more)")
    if best[1]["params"] < n_params / 1.5:  # the grid's largest shape is far smaller than asked for
        raise PlanError(f"{n_params:.3g} parameters is beyond the largest shape considered ({MAX_LAYERS} layers x "
                        f"width {MAX_WIDTH}: {best[1]['params']:.3g}); ask for fewer parameters")
    return best[1]


def make_plan(*, params: float | None = None, tokens: float | None = None, flops: float | None = None,
              hours: float | None = None, device: str = "h100", gpus: int = 1, mfu: float = 0.4,
              precision: str = "bf16", peak_tflops: float | None = None, power_w: float | None = None,
              price: float | None = None, carbon_intensity: float = 0.4, vocab_size: int = 50257,
              seq_len: int = 1024) -> Plan:
    budgets = (("params", params), ("tokens", tokens), ("flops", flops), ("hours", hours))
    given = [k for k, v in budgets if v is not None]
    if len(given) != 1:
        raise PlanError(f"give exactly one of --params, --tokens, --flops, --hours (got {', '.join(given) or 'none'})")
    numbers = (*budgets, ("mfu", mfu), ("peak-tflops", peak_tflops), ("power-w", power_w), ("price", price),
               ("carbon-intensity", carbon_intensity))
    for name, value in numbers:
        if value is not None and not math.isfinite(value):
            raise PlanError(f"--{name} must be a finite number (got {value})")
    if not next(v for _, v in budgets if v is not None) > 0:
        raise PlanError(f"--{given[0]} must be positive")
    if peak_tflops is not None and peak_tflops <= 0:
        raise PlanError(f"--peak-tflops must be positive (got {peak_tflops})")
    for name, value in numbers[-3:]:
        if value is not None and value < 0:
            raise PlanError(f"--{name} must be >= 0 (got {value})")
    if vocab_size < 1 or seq_len < 1:
        raise PlanError(f"--vocab-size ({vocab_size}) and --seq-len ({seq_len}) must be positive")
    if device not in DEVICES and peak_tflops is None:
        raise PlanError(f"unknown device {device!r}; use one of {', '.join(DEVICES)} or give --peak-tflops")
    if not 0 < mfu <= 1 or gpus < 1:
        raise PlanError(f"need 0 < mfu <= 1 (got {mfu}) and gpus >= 1 (got {gpus})")
    key, default_power, default_price = DEVICES.get(device, (None, None, None))  # unknown: not a guess of 0
    peak = peak_tflops * 1e12 if peak_tflops is not None else PEAK_FLOPS[key].get(precision)
    if not peak:
        raise PlanError(f"no {precision} peak for {device}; give --peak-tflops")
    throughput = gpus * peak * mfu  # FLOP/s the run sustains
    if hours:
        flops = hours * 3600 * throughput
    if flops:
        params = math.sqrt(flops / (6 * TOKENS_PER_PARAM))  # C = 6 N (20 N)
    elif tokens:
        params = tokens / TOKENS_PER_PARAM
    tokens = tokens or TOKENS_PER_PARAM * params
    flops = 6 * params * tokens
    run_hours = flops / throughput / 3600
    power = power_w if power_w is not None else default_power
    price = price if price is not None else default_price
    kwh = gpus * power * run_hours / 1000 if power is not None else None
    return Plan(params=params, tokens=tokens, flops=flops, model=model_shape(params, vocab_size, seq_len),
                device=device, gpus=gpus, mfu=mfu, hours=run_hours, energy_kwh=kwh,
                cost_usd=gpus * run_hours * price if price is not None else None,
                co2_kg=kwh * carbon_intensity if kwh is not None else None)


def format_plan(p: Plan) -> str:
    m = p.model
    return "\n".join([
        f"model:   {p.params / 1e6:,.1f}M parameters -> n_layer {m['n_layer']}, d_model {m['d_model']}, "
        f"n_head {m['n_head']} ({m['params'] / 1e6:,.1f}M)",
        f"data:    {p.tokens / 1e9:,.3f}B tokens ({p.tokens / p.params:.0f} per parameter)",
        f"compute: {p.flops:.3e} FLOPs (6 N D)",
        f"time:    {p.hours:,.2f} h on {p.gpus} x {p.device} at {p.mfu:.0%} MFU (estimate)",
        "energy:  " + (f"{p.energy_kwh:,.1f} kWh, ~{p.co2_kg:,.1f} kg CO2" if p.energy_kwh is not None
                       else "unknown for this device (give --power-w)")
        + "; cost " + (f"~${p.cost_usd:,.0f} (assumed prices)" if p.cost_usd is not None else "unknown (give --price)"),
    ])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pyllm plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_argument_group("budget (exactly one)")
    budget.add_argument("--params", help="parameter count, e.g. 124M")
    budget.add_argument("--tokens", help="training tokens, e.g. 10B")
    budget.add_argument("--flops", help="training compute in FLOPs, e.g. 1e21")
    budget.add_argument("--hours", type=float, help="wall-clock hours on the devices")
    ap.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICES)} (default h100)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "tf32", "fp32"))
    ap.add_argument("--peak-tflops", type=float, help="device peak, overrides the table (needed for CPUs)")
    ap.add_argument("--power-w", type=float, help="board power per device in W (default: data-sheet TDP)")
    ap.add_argument("--price", type=float, help="$ per device-hour (default: a typical on-demand price)")
    ap.add_argument("--carbon-intensity", type=float, default=0.4, help="kg CO2 per kWh (default 0.4)")
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    try:
        plan = make_plan(params=parse_count(a.params) if a.params is not None else None,
                         tokens=parse_count(a.tokens) if a.tokens is not None else None,
                         flops=parse_count(a.flops) if a.flops is not None else None, hours=a.hours, device=a.device,
                         gpus=a.gpus, mfu=a.mfu, precision=a.precision, peak_tflops=a.peak_tflops,
                         power_w=a.power_w, price=a.price, carbon_intensity=a.carbon_intensity,
                         vocab_size=a.vocab_size, seq_len=a.seq_len)
    except PlanError as e:
        print(f"pyllm plan: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        import json

        print(json.dumps(asdict(plan), indent=1))
    else:
        print(format_plan(plan))
    return 0
