"""The harness checks before it times: a wrong provider is recorded as wrong and never timed."""

import os

import pytest
import torch

from benchmarks import harness
from benchmarks.bench_adamw import BENCH as ADAMW
from benchmarks.bench_loss_scale import BENCH as LOSS_SCALE
from benchmarks.bench_rms_norm import BENCH as RMS_NORM
from benchmarks.harness import Case, Inputs, OpBench, RunOptions


class SoftmaxToy(OpBench):
    """softmax on one small shape, with extra providers that are wrong, broken and right."""

    op = "softmax"
    timed: list

    def __init__(self):
        self.timed = []

    def cases(self, suite):
        return [Case("toy 7x33", {"rows": 7, "cols": 33})]

    def make_inputs(self, case, dtype, device):
        return Inputs([torch.randn(case.shape["rows"], case.shape["cols"], device=device, dtype=dtype)], grad_args=(0,))

    def bytes_moved(self, case, dtype, mode):
        return 1e6

    def externals(self, device):
        def wrong(x):
            self.timed.append("wrong")
            return torch.softmax(x.float(), -1).to(x.dtype) * 1.01  # 1% off: far outside the fp32 bound

        def broken(x):
            raise NotImplementedError("no such kernel for this shape")

        def right(x):
            self.timed.append("right")
            return torch.softmax(x, -1)

        return {"wrong": wrong, "broken": broken, "right": right}


def _run(bench, **opts):
    records = []
    calib = {"copy_gbps": 10.0, "matmul_tflops": {"fp32": 1.0}}
    harness.run_op(bench, RunOptions(**{"suite": "short", **opts}), calib, records.append)
    done = [r for r in records if r.get("kind") == "case_done"]
    assert len(done) == len(bench.cases("short"))  # each (case, dtype) is marked complete for --resume
    return [r for r in records if r.get("kind") != "case_done"]


def test_wrong_provider_is_recorded_and_not_timed_broken_one_skipped():
    bench = SoftmaxToy()
    records = _run(bench, providers=("torch eager", "wrong", "broken", "right"))
    by = {(r["provider"], r["mode"]): r for r in records}
    for mode in harness.MODES:
        assert by[("wrong", mode)]["status"] == "wrong" and "exceeds bound" in by[("wrong", mode)]["reason"]
        assert by[("broken", mode)]["status"] == "skipped"
        assert "NotImplementedError: no such kernel" in by[("broken", mode)]["reason"]
        ok = by[("right", mode)]
        assert ok["status"] == "ok" and ok["median_ms"] > 0 and ok["err_over_bound"] <= 1
        # GB/s from the declared bytes and the measured median; roofline against the calibration
        assert ok["gbps"] == pytest.approx(1e6 / (ok["median_ms"] / 1e3) / 1e9)
        assert ok["roofline_pct"] == pytest.approx(100 * ok["gbps"] / 10.0)
    # the wrong provider ran for its correctness check only; the right one was also timed (many calls)
    assert bench.timed.count("wrong") == 1 and bench.timed.count("right") > 3
    assert {r["provider"] for r in records} == {"torch eager", "wrong", "broken", "right"}  # only those selected


def test_strict_backend_only_inside_the_run():
    os.environ.pop("PYLLM_STRICT_BACKEND", None)
    seen = []

    class Probe(SoftmaxToy):
        def externals(self, device):
            return {"probe": lambda x: seen.append(os.environ.get("PYLLM_STRICT_BACKEND")) or torch.softmax(x, -1)}

    _run(Probe(), providers=("probe",), modes=("fwd",))
    assert seen and set(seen) == {"1"}
    assert "PYLLM_STRICT_BACKEND" not in os.environ


def test_real_op_checks_the_cpu_kernel_against_the_reference():
    records = _run(RMS_NORM, modes=("fwd+bwd",))
    by = {r["provider"]: r for r in records}
    assert by["torch eager"]["status"] == "ok"
    assert by["pyllm-triton"]["status"] == "skipped" and "interpreter" in by["pyllm-triton"]["reason"]
    # the C++ extension is part of the install, so its kernel must be checked (outputs and gradients) and timed
    cpu = by["pyllm-cpu"]
    assert cpu["status"] == "ok", cpu["reason"]
    assert cpu["median_ms"] > 0 and 0 <= cpu["err_over_bound"] <= 1


def test_inplace_op_benches_keep_their_fp32_state():
    case = ADAMW.cases("short")[0]
    base = ADAMW.make_inputs(case, torch.float32, "cpu")
    low = ADAMW.cast(base, torch.bfloat16, True)
    params, grads, m, v = low.args
    assert params[0].dtype == grads[0].dtype == torch.bfloat16
    assert m[0].dtype == v[0].dtype == low.kwargs["master_params"][0].dtype == torch.float32
    ls_base = LOSS_SCALE.make_inputs(LOSS_SCALE.cases("short")[0], torch.float32, "cpu")
    ls = LOSS_SCALE.cast(ls_base, torch.float16, True)
    grads, inv_scale, found_inf, scale, tracker = ls.args
    assert grads[0].dtype == torch.float16 and scale.dtype == found_inf.dtype == torch.float32
    assert tracker.dtype == torch.int32


def _one_layer(bench):
    """The same bench on a one-layer tiny model's parameter list (fast enough for CI)."""

    class Small(type(bench)):
        def cases(self, suite):
            return [Case("tiny, 1 layer", {"model": "tiny", "n_layer": 1, "params": 0})]

        def bytes_moved(self, case, dtype, mode):
            return None

    return Small()


def test_adamw_and_loss_scale_pass_their_own_check():
    records = (_run(_one_layer(ADAMW), providers=("torch AdamW fused",))
               + _run(_one_layer(LOSS_SCALE), providers=("torch GradScaler kernels",)))
    ok = {(r["op"], r["provider"]): r["status"] for r in records}
    assert ok[("adamw_step", "torch AdamW fused")] == "ok"  # torch's fused AdamW agrees with the reference
    assert ok[("loss_scale", "torch GradScaler kernels")] == "ok"


def test_run_options_name_the_bad_value():
    with pytest.raises(ValueError, match="suite 'huge'"):
        RunOptions(suite="huge")
    with pytest.raises(ValueError, match=r"modes \['backward'\]"):
        RunOptions(modes=("backward",))
    with pytest.raises(ValueError, match=r"dtypes \['fp8'\]"):
        RunOptions(dtypes=("fp8",))


def test_timed_backward_converts_the_upstream_gradient_once(monkeypatch):
    # A bf16 output's upstream gradient is cast from the fp32 one before timing, not inside every timed
    # call (at 1024 x 2048 the two casts cost about as much as the LayerNorm backward being timed).
    bench = SoftmaxToy()
    x = torch.randn(7, 33, dtype=torch.bfloat16, requires_grad=True)
    upstream = [torch.randn(7, 33)]
    seen = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs, **kw):
        seen.append([(g.dtype, g.data_ptr()) for g in grad_outputs])
        return grad(outputs, inputs, grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    for mode in ("bwd", "fwd+bwd"):
        call = harness.timed_call(bench, lambda t: torch.softmax(t, -1), Inputs([x], grad_args=(0,)), mode, upstream)
        call(), call()
    assert len(seen) == 4 and all(s == [(torch.bfloat16, seen[0][0][1])] for s in seen[:2])
    assert seen[2] == seen[3] and seen[2][0][0] == torch.bfloat16
