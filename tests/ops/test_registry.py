"""The backend registry: selection (argument > use_backend > PYLLM_BACKEND > auto), fallback with one
warning, strict mode, unknown names. Fake implementations of a private op record which backend ran,
so these tests do not depend on which real backends this machine has built."""

import warnings

import pytest
import torch

from pyllm import ops
from pyllm.model import ModelConfig
from pyllm.ops import registry

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def probe(monkeypatch):
    """Op "probe" implemented by every backend; each returns its own name. Backends count as loaded."""
    monkeypatch.delenv("PYLLM_BACKEND", raising=False)
    monkeypatch.delenv("PYLLM_STRICT_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_WARNED", set())
    for b in registry.BACKENDS:
        monkeypatch.setitem(registry._LOAD_ERRORS, b, None)
    impls = {b: (lambda name: lambda x: name)(b) for b in registry.BACKENDS}
    monkeypatch.setitem(registry._IMPLS, "probe", impls)
    return impls


def run(backend=None, device=CPU):
    return registry.dispatch("probe", device, backend, None)


def test_selection_order(probe, monkeypatch):
    assert run() == "cpu"  # auto on a CPU tensor
    assert run(device=CUDA) == "triton"  # auto on a CUDA tensor
    monkeypatch.setenv("PYLLM_BACKEND", "cuda")
    assert run() == "cuda"  # environment beats auto
    with ops.use_backend("triton"):
        assert run() == "triton"  # context beats environment
        with ops.use_backend("torch"):
            assert run() == "torch"  # innermost context wins
        assert run() == "triton"
        assert run(backend="cpu") == "cpu"  # argument beats context
    assert run() == "cuda"
    with ops.use_backend(None):  # None defers to the environment
        assert run() == "cuda"
    with ops.use_backend("auto"):  # "auto" overrides the environment
        assert run() == "cpu"


def test_auto_order_and_silent_auto_fallback(probe):
    def unsupported(x):
        raise ops.Unsupported("not on this input")

    probe["cpu"] = unsupported
    probe["triton"] = unsupported
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto moving past a backend is not a warning
        assert run() == "torch"
        assert run(device=CUDA) == "cuda"


def test_explicit_fallback_warns_once_per_reason(probe):
    reason = ["fp16 only"]

    def unsupported(x):
        raise ops.Unsupported(reason[0])

    probe["triton"] = unsupported
    with pytest.warns(RuntimeWarning, match=r"pyllm.ops.probe: backend 'triton' not used \(fp16 only\)"):
        assert run("triton") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run("triton") == "torch"  # same reason: silent
    reason[0] = "head dim 7"
    with pytest.warns(RuntimeWarning, match="head dim 7"):
        assert run("triton") == "torch"


def test_unavailable_backend_falls_back_with_its_load_error(probe, monkeypatch):
    monkeypatch.setitem(registry._LOAD_ERRORS, "cuda", "ImportError: no module named pyllm._C")
    with pytest.warns(RuntimeWarning, match="no module named pyllm._C"):
        assert run("cuda") == "torch"
    del probe["cpu"]
    with pytest.warns(RuntimeWarning, match="op not implemented by this backend"):
        assert run("cpu") == "torch"


def test_strict_mode_raises(probe, monkeypatch):
    def unsupported(x):
        raise ops.Unsupported("bf16 not supported")

    probe["triton"] = unsupported
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")
    with pytest.raises(ops.BackendError, match="'triton' cannot run these inputs: bf16 not supported"):
        run("triton")
    monkeypatch.setitem(registry._LOAD_ERRORS, "cuda", "OSError: libcudart.so missing")
    with pytest.raises(ops.BackendError, match="libcudart.so missing"):
        run("cuda")
    assert run() == "cpu"  # auto never raises
    assert run("torch") == "torch"


def test_environment_changes_are_seen_by_the_next_call(probe, monkeypatch):
    # the dispatcher reads os.environ's own dict on every call (registry._env): no value may be cached
    for value in ("torch", "cuda", "cpu"):
        monkeypatch.setenv("PYLLM_BACKEND", value)
        assert run() == value
    monkeypatch.delenv("PYLLM_BACKEND")
    assert run(device=CUDA) == "triton"

    def unsupported(x):
        raise ops.Unsupported("never")

    probe["triton"] = unsupported
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")
    with pytest.raises(ops.BackendError):
        run("triton")
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "0")
    with pytest.warns(RuntimeWarning, match="never"):
        assert run("triton") == "torch"


def test_unknown_backend_lists_valid_ones(monkeypatch):
    x = torch.randn(3)
    valid = "valid backends are: torch, triton, cuda, cpu, auto"
    with pytest.raises(ValueError, match=f"unknown backend 'tpu'; {valid}"):
        ops.softmax(x, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with ops.use_backend("tpu"):
            pass
    monkeypatch.setenv("PYLLM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        ops.softmax(x)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        ModelConfig(backend="tpu")
    with pytest.raises(ValueError, match="valid backends are: torch, triton, cuda, cpu$"):
        ops.register("softmax", "auto")


def test_backends_and_ops_table():
    status = ops.backends()
    assert list(status) == ["torch", "triton", "cuda", "cpu"]
    assert status["torch"] == "available"
    assert all(s == "available" or s.startswith("unavailable (") for s in status.values())
    table = ops.ops_table()
    public = {"attention", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "rope", "softmax", "matmul", "linear",
              "cross_entropy", "linear_cross_entropy", "adamw_step", "unscale_and_check_", "update_loss_scale_"}
    assert public <= set(table)
    assert all("torch" in table[op] for op in public)


def test_requested_backend(monkeypatch):
    monkeypatch.delenv("PYLLM_BACKEND", raising=False)
    assert ops.requested_backend() == "auto"
    monkeypatch.setenv("PYLLM_BACKEND", "triton")
    assert ops.requested_backend() == "triton"
    assert ops.requested_backend("cpu") == "cpu"


def test_explicit_torch_backend_runs_the_reference():
    x = torch.randn(4, 9)
    assert torch.equal(ops.softmax(x, backend="torch"), ops.reference.softmax(x))
