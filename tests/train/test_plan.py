"""pyllm plan: Chinchilla sizing (20 tokens/param, C = 6 N D) and the time/energy arithmetic."""

import math

import pytest

from pyllm.train.plan import PlanError, main, make_plan, parse_count


def test_params_budget_sizes_gpt2_small():
    p = make_plan(params=124e6, device="h100", gpus=8, mfu=0.5, price=2.0, power_w=700)
    assert p.tokens == 20 * 124e6 and p.flops == pytest.approx(6 * 124e6 * 20 * 124e6)
    assert (p.model["n_layer"], p.model["d_model"], p.model["n_head"]) == (12, 768, 12)  # GPT-2 small
    assert p.hours == pytest.approx(p.flops / (8 * 989e12 * 0.5) / 3600)
    assert p.energy_kwh == pytest.approx(8 * 0.7 * p.hours) and p.cost_usd == pytest.approx(8 * 2.0 * p.hours)


def test_compute_and_time_budgets_are_compute_optimal():
    p = make_plan(flops=1e21, device="a100")
    assert p.tokens / p.params == pytest.approx(20) and 6 * p.params * p.tokens == pytest.approx(1e21)
    q = make_plan(hours=10, device="a100", gpus=4, mfu=0.4)
    assert q.hours == pytest.approx(10) and q.flops == pytest.approx(10 * 3600 * 4 * 312e12 * 0.4)
    assert abs(math.log(q.model["params"] / q.params)) < 0.2


def test_bad_plans(capsys):
    assert parse_count("1.5B") == 1.5e9
    with pytest.raises(PlanError, match="exactly one of"):
        make_plan(params=1e6, tokens=1e9)
    assert main(["--params", "10M", "--device", "tpu9"]) == 2
    assert capsys.readouterr().err.startswith("pyllm plan: error: unknown device 'tpu9'")
    assert main(["--params", "0"]) == 2  # a zero budget is a bad budget, not a missing one
    assert capsys.readouterr().err.startswith("pyllm plan: error: --params must be positive")


@pytest.mark.parametrize("args,message", [
    (["--params", "1T"], "1e+12 parameters is beyond the largest shape considered (128 layers x width 16384"),
    (["--params", "inf"], "--params must be a finite number (got inf)"),
    (["--hours", "nan"], "--hours must be a finite number (got nan)"),
    (["--params", "124M", "--vocab-size", "0"], "--vocab-size (0) and --seq-len (1024) must be positive"),
    (["--params", "124M", "--seq-len", "0"], "--vocab-size (50257) and --seq-len (0) must be positive"),
    (["--params", "124M", "--peak-tflops", "0"], "--peak-tflops must be positive (got 0.0)"),
    (["--params", "124M", "--peak-tflops", "-1"], "--peak-tflops must be positive (got -1.0)"),
    (["--params", "124M", "--power-w", "-100"], "--power-w must be >= 0 (got -100.0)"),
    (["--params", "124M", "--price", "nan"], "--price must be a finite number (got nan)"),
])
def test_odd_plan_inputs_are_one_line_errors(capsys, args, message):
    """Each was a silently wrong plan (a 413B shape for 1T, negative hours, $nan, the table's peak for 0) or a
    traceback (math domain error, ModelConfig)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyllm plan: error: {message}") and err.count("\n") == 1


def test_unknown_device_energy_and_cost_are_unknown_not_zero(capsys):
    # a device outside the table with only its peak given: power and price are not guessed as 0
    assert main(["--params", "10M", "--device", "my-npu", "--peak-tflops", "100"]) == 0
    out = capsys.readouterr().out
    assert "energy:  unknown for this device (give --power-w); cost unknown (give --price)" in out, out
    assert main(["--params", "10M", "--device", "my-npu", "--peak-tflops", "100", "--power-w", "500",
                      "--price", "2"]) == 0
    assert "kWh" in capsys.readouterr().out
