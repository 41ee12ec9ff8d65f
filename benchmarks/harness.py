"""The shared harness: what an op benchmark declares, and how every one of them is checked and timed.

A ``bench_<op>.py`` file declares an ``OpBench``: its shapes per suite, how to build inputs, and the
bytes and FLOPs one call moves and computes. The harness does the rest, identically for every op:

1. builds the inputs once per (shape, dtype);
2. checks each provider against the truth before timing it: the reference in fp32 is the truth, the
   reference in the benchmark dtype gives the error plain PyTorch already makes, and the rule of
   ``pyllm.ops.tolerance`` decides (outputs, and gradients under one shared upstream gradient). A wrong
   provider is recorded as "wrong" and never timed; one that cannot run is "skipped" with the reason;
3. times the forward, the backward (``autograd.grad`` on a retained graph) and both, and derives GB/s or
   TFLOP/s, the roofline percentage against this run's calibration, and peak memory on GPU.

Suites: "short" (a few small CPU shapes, few repetitions: CI), "cpu" (a fuller CPU sweep), "gpu" (shapes
of real models: GPT-2 124M/350M, Llama 1B/8B widths, vocabularies 50k-128k, sequences up to 16k).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from pyllm import ops
from pyllm.ops import tolerance

from .timing import DTYPES, dtype_context, time_fn

SUITES = ("short", "cpu", "gpu")
MODES = ("fwd", "bwd", "fwd+bwd")
TF32_ON_CPU = "tf32 is a CUDA-only dtype (TensorFloat-32 tensor-core matmuls): not measured on a CPU"

# timing budget per measurement and repetitions, by suite: CI must stay short, GPU numbers must be stable
_BUDGET = {"short": dict(budget_s=0.05, warmup_s=0.01, min_reps=3, max_reps=10),
           "cpu": dict(budget_s=0.5, warmup_s=0.1, min_reps=5, max_reps=50),
           "gpu": dict(budget_s=0.3, warmup_s=0.05, min_reps=10, max_reps=200)}


@dataclass(frozen=True)
class Case:
    """One shape of one op: a label a reader recognises and the sizes it stands for."""

    label: str
    """E.g. "gpt2-124M (8x1024 tokens, d=768)"."""
    shape: dict
    """The sizes, e.g. {"rows": 8192, "cols": 768}; recorded with every result."""


@dataclass
class Inputs:
    """Arguments of one call: ``op(*args, **kwargs)``; ``grad_args`` index the args that get gradients."""

    args: list
    kwargs: dict = field(default_factory=dict)
    grad_args: tuple[int, ...] = ()


class OpBench:
    """Base of every op benchmark. Subclasses set ``op`` and ``metric`` and implement ``cases``,
    ``make_inputs`` and ``bytes_moved`` or ``flops``."""

    op: str = ""
    metric: str = "gbps"  # "gbps" (memory-bound) or "tflops" (compute-bound)
    differentiable: bool = True
    gpu_dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")  # add "tf32" where matmuls run inside

    def cases(self, suite: str) -> list[Case]:
        raise NotImplementedError

    def make_inputs(self, case: Case, dtype: torch.dtype, device: str) -> Inputs:
        raise NotImplementedError

    def bytes_moved(self, case: Case, dtype: torch.dtype, mode: str) -> float | None:
        """Least bytes a call must read and write (the memory-bound figure); None if not counted."""
        return None

    def flops(self, case: Case, mode: str) -> float | None:
        return None

    def outputs(self, ret, inputs: Inputs) -> list[torch.Tensor]:
        """The tensors to check: the return value by default; in-place ops return what they changed."""
        return [t for t in (ret if isinstance(ret, (tuple, list)) else (ret,)) if torch.is_tensor(t)]

    def externals(self, device: str) -> dict[str, Callable | str]:
        """External baselines: name -> callable with the op's signature, or the reason it is absent."""
        return {}

    def kernel_ops(self) -> tuple[str, ...]:
        """The pyllm.ops functions a backend must implement to be benchmarked on this op."""
        return (self.op,)

    def pyllm_fn(self, backend: str) -> Callable:
        """The op through pyllm.ops on one backend."""
        return lambda *a, **k: getattr(ops, self.op)(*a, backend=backend, **k)

    def reference_fn(self) -> Callable:
        """The unfused reference, plain (what torch.compile is given)."""
        return getattr(ops.reference, self.op)

    def cast(self, inputs: Inputs, dtype: torch.dtype, grad: bool) -> Inputs:
        """A fresh copy of the fp32 inputs in the benchmark dtype (ops with fp32 state override this)."""
        return cast_inputs(inputs, dtype, grad)

    def call(self, fn: Callable, inputs: Inputs):
        return fn(*inputs.args, **inputs.kwargs)


def bytes_of(*numels_and_dtypes) -> float:
    """Sum of numel * element size over (numel, dtype) pairs."""
    return float(sum(n * torch.empty((), dtype=d).element_size() for n, d in numels_and_dtypes))


# -------------------------------------------------------------------------------------------- providers


PYLLM_BACKENDS = {"pyllm-triton": "triton", "pyllm-cuda": "cuda", "pyllm-cpu": "cpu"}


def providers(bench: OpBench, device: str) -> dict[str, Callable | str]:
    """Every provider for this op on this device: a callable, or the reason it is not run."""
    out: dict[str, Callable | str] = {"torch eager": bench.pyllm_fn("torch")}
    # what the compiler makes of the unfused program; the caller resets Dynamo per shape so that a
    # recompile limit never silently falls back to eager
    out["torch.compile"] = torch.compile(bench.reference_fn(), dynamic=False)
    status = ops.backends()
    table = ops.ops_table()
    for name, backend in PYLLM_BACKENDS.items():
        missing = [op for op in bench.kernel_ops() if backend not in table.get(op, [])]
        if not status[backend].startswith("available"):
            out[name] = f"backend {backend!r} {status[backend]}"
        elif missing:
            out[name] = f"backend {backend!r} does not implement {', '.join(missing)}"
        elif backend == "triton" and device != "cuda":
            out[name] = "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): correct but not worth timing"
        elif backend == "cuda" and device != "cuda":
            out[name] = "needs a CUDA device"
        elif backend == "cpu" and device != "cpu":
            out[name] = "the cpu backend runs on CPU tensors only"
        else:
            out[name] = bench.pyllm_fn(backend)
    out.update(bench.externals(device))
    return out


# ------------------------------------------------------------------------------------------- inputs


def _cast(x, dtype, requires_grad):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.detach().to(dtype).requires_grad_(requires_grad)
    if isinstance(x, list):
        return [_cast(t, dtype, False) for t in x]
    return x.clone() if torch.is_tensor(x) else x


def cast_inputs(inputs: Inputs, dtype: torch.dtype, grad: bool) -> Inputs:
    """A fresh copy of ``inputs`` in ``dtype`` (integer tensors kept), with grads on ``grad_args``."""
    args = [_cast(a, dtype, grad and i in inputs.grad_args) for i, a in enumerate(inputs.args)]
    kwargs = {k: _cast(v, dtype, False) for k, v in inputs.kwargs.items()}
    return Inputs(args, kwargs, inputs.grad_args)


def _grads(bench: OpBench, fn: Callable, inputs: Inputs, upstream: list[torch.Tensor]):
    """(outputs, gradients of the grad args) for one call under the shared upstream gradients."""
    outs = bench.outputs(bench.call(fn, inputs), inputs)
    if not bench.differentiable or not inputs.grad_args:
        return [o.detach() for o in outs], []
    diff = [(o, u) for o, u in zip(outs, upstream) if o.requires_grad]
    wrt = [inputs.args[i] for i in inputs.grad_args]
    grads = torch.autograd.grad([o for o, _ in diff], wrt, [u.to(o.dtype) for o, u in diff], allow_unused=True)
    return [o.detach() for o in outs], [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, wrt)]


@dataclass
class Truth:
    """The reference in fp32 (truth) and in the benchmark dtype, outputs and gradients."""

    out32: list
    grads32: list
    out_ref: list
    grads_ref: list
    upstream: list


def reference_truth(bench: OpBench, base: Inputs, dtype: torch.dtype, dtype_name: str, device: str) -> Truth:
    ref = bench.pyllm_fn("torch")
    with dtype_context("fp32"):
        probe_inputs = bench.cast(base, torch.float32, False)
        probe = bench.outputs(bench.call(ref, probe_inputs), probe_inputs)
        gen = torch.Generator(device=device).manual_seed(1)
        upstream = [torch.randn(o.shape, generator=gen, device=device) for o in probe]
        del probe
        out32, grads32 = _grads(bench, ref, bench.cast(base, torch.float32, True), upstream)
    with dtype_context(dtype_name):
        out_ref, grads_ref = _grads(bench, ref, bench.cast(base, dtype, True), upstream)
    return Truth(out32, grads32, out_ref, grads_ref, upstream)


def check(bench: OpBench, fn: Callable, base: Inputs, dtype: torch.dtype, dtype_name: str,
          truth: Truth) -> tuple[float, float]:
    """Raise AssertionError if ``fn`` is wrong; return (worst error / bound, worst error)."""
    with dtype_context(dtype_name):
        outs, grads = _grads(bench, fn, bench.cast(base, dtype, True), truth.upstream)
    if len(outs) != len(truth.out32):
        raise AssertionError(f"{len(outs)} outputs, the reference returns {len(truth.out32)}")
    pairs = [(f"output {i}", o, t, r) for i, (o, t, r) in enumerate(zip(outs, truth.out32, truth.out_ref))]
    pairs += [(f"grad of arg {i}", g, t, r) for i, g, t, r in zip(base.grad_args, grads, truth.grads32, truth.grads_ref)]
    worst_ratio, worst_err = 0.0, 0.0
    for name, got, t32, ref in pairs:
        tolerance.assert_close(got, t32, ref, name)
        bound = tolerance.error_bound(t32, ref, got.dtype if got.dtype in tolerance.FLOOR else torch.float32)
        err = (got.double() - t32.double()).abs().max().item() if got.numel() else 0.0
        worst_ratio, worst_err = max(worst_ratio, err / bound if bound else 0.0), max(worst_err, err)
    return worst_ratio, worst_err


# ------------------------------------------------------------------------------------------- timing


def timed_call(bench: OpBench, fn: Callable, inputs: Inputs, mode: str, upstream: list) -> Callable[[], object]:
    """The zero-argument callable that ``mode`` times."""
    if mode == "fwd" or not bench.differentiable:
        return lambda: bench.call(fn, inputs)
    wrt = [inputs.args[i] for i in inputs.grad_args]
    cast = {}  # the upstream gradients in each output's dtype, converted once: not part of what is timed

    def in_dtype(i: int, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if (i, dtype) not in cast:
            cast[(i, dtype)] = u.to(dtype)
        return cast[(i, dtype)]

    def backward_of(outs):
        diff = [(o, in_dtype(i, u, o.dtype)) for i, (o, u) in enumerate(zip(outs, upstream)) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in diff], wrt, [u for _, u in diff], retain_graph=True,
                                   allow_unused=True)

    if mode == "bwd":
        outs = bench.outputs(bench.call(fn, inputs), inputs)
        return lambda: backward_of(outs)
    return lambda: backward_of(bench.outputs(bench.call(fn, inputs), inputs))


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call allocates beyond what is already held (GPU only; None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclass
class RunOptions:
    """What one benchmark run covers."""

    suite: str = "short"
    """"short" (CI), "cpu" (fuller CPU sweep) or "gpu" (real-model shapes)."""
    device: str = "cpu"
    """"cpu" or "cuda"."""
    modes: tuple[str, ...] = MODES
    """Subset of fwd, bwd, fwd+bwd."""
    dtypes: tuple[str, ...] | None = None
    """Subset of fp32, tf32, fp16, bf16; None: fp32 on CPU, the op's GPU dtypes on GPU."""
    providers: tuple[str, ...] | None = None
    """Provider names to run; None: all (torch.compile excluded from the short suite: compile time)."""
    cases: tuple[str, ...] | None = None
    """Only cases whose label contains one of these strings."""

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ValueError(f"suite {self.suite!r}: use one of {', '.join(SUITES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: use 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes {bad}: use a subset of {', '.join(MODES)}")
        bad = [d for d in (self.dtypes or ()) if d not in DTYPES]
        if bad:
            raise ValueError(f"dtypes {bad}: use a subset of {', '.join(DTYPES)}")

    def dtypes_for(self, bench: OpBench) -> list[str]:
        if self.dtypes is not None:
            return [d for d in self.dtypes if d not in self.dtypes_not_run(bench)]
        return list(bench.gpu_dtypes) if self.device == "cuda" else ["fp32"]

    def dtypes_not_run(self, bench: OpBench) -> dict[str, str]:
        """The --dtypes ``bench`` does not measure here, each with the reason the runner prints."""
        out = {}
        for d in self.dtypes or ():
            if d == "tf32" and self.device != "cuda":
                out[d] = TF32_ON_CPU
            elif d != "fp32" and d not in bench.gpu_dtypes:
                out[d] = f"{bench.op} is not measured in {d} (its dtypes: {', '.join(bench.gpu_dtypes)})"
        return out

    def check_providers(self, benches: list) -> None:
        """A --providers name no selected op has is a typo: it would measure nothing and still say "complete"."""
        if self.providers is None:
            return
        # (the train_step benchmark names its training backends as the op benchmarks name them)
        valid = {n for b in benches
                 for n in (providers(b, self.device) if isinstance(b, OpBench) else b.provider_backends)}
        bad = [p for p in self.providers if p not in valid]
        if bad and valid:
            raise ValueError(f"unknown provider {', '.join(map(repr, bad))}; valid: {', '.join(sorted(valid))}")

    def selection(self, bench: OpBench) -> dict[str, list[str]]:
        """The providers and modes a (case, dtype) of ``bench`` runs under these options; a case_done record
        carries it so that --resume skips a case only when an earlier run covered at least as much."""
        return {"providers": sorted(n for n in providers(bench, self.device) if self.selects(n)),
                "modes": [m for m in self.modes if bench.differentiable or m == "fwd"]}

    def selects_case(self, label: str) -> bool:
        """Whether a case runs: all by default, else those whose label contains one of ``cases``."""
        return not self.cases or any(s in label for s in self.cases)

    def selects(self, provider: str) -> bool:
        """Whether ``provider`` runs: all by default, except torch.compile in the short suite (compile time)."""
        if self.providers is not None:
            return provider in self.providers
        return not (self.suite == "short" and provider == "torch.compile")


def run_op(bench: OpBench, opts: RunOptions, calib: dict, emit: Callable[[dict], None],
           skip: Callable[[str, str], bool] = lambda label, dtype: False) -> None:
    """Check and time every (case, dtype, mode, provider) of ``bench``; ``emit`` receives each record.

    ``skip(label, dtype)`` says a (case, dtype) was already measured (resuming an interrupted run)."""
    budget = _BUDGET[opts.suite]
    selection = opts.selection(bench)
    modes = selection["modes"]
    # the backward mode re-runs one retained graph; torch.compile donates its saved buffers to the first
    # backward unless told not to
    with strict_backends(), torch._functorch.config.patch(donated_buffer=False):
        for case in bench.cases(opts.suite):
            if not opts.selects_case(case.label):
                continue
            for dtype_name in opts.dtypes_for(bench):
                if skip(case.label, dtype_name):
                    continue
                torch._dynamo.reset()  # fresh compile caches per shape (no silent recompile-limit fallback)
                _run_case(bench, case, dtype_name, modes, opts, calib, budget, emit)
                # marks the (case, dtype) complete: a resumed run redoes a case cut off half-way
                emit({"kind": "case_done", "op": bench.op, "case": case.label, "dtype": dtype_name, "suite": opts.suite,
                      "selection": selection})


@contextlib.contextmanager
def strict_backends():
    """PYLLM_STRICT_BACKEND=1 inside: a fallback to the reference must never be timed as the kernel."""
    prev = os.environ.get("PYLLM_STRICT_BACKEND")
    os.environ["PYLLM_STRICT_BACKEND"] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("PYLLM_STRICT_BACKEND", None)
        else:
            os.environ["PYLLM_STRICT_BACKEND"] = prev


def _run_case(bench, case, dtype_name, modes, opts, calib, budget, emit):
    device, dtype = opts.device, DTYPES[dtype_name]
    torch.manual_seed(0)
    base = bench.make_inputs(case, torch.float32, device)
    truth = reference_truth(bench, base, dtype, dtype_name, device)
    common = dict(op=bench.op, case=case.label, shape=case.shape, dtype=dtype_name, suite=opts.suite)
    for name, fn in providers(bench, device).items():
        if not opts.selects(name):
            continue
        if isinstance(fn, str):
            for mode in modes:
                emit({**common, "mode": mode, "provider": name, "status": "skipped", "reason": fn})
            continue
        try:
            err_ratio, err = check(bench, fn, base, dtype, dtype_name, truth)
        except AssertionError as e:
            for mode in modes:
                emit({**common, "mode": mode, "provider": name, "status": "wrong", "reason": str(e)})
            continue
        except Exception as e:  # an external library rejecting the shape, a BackendError in strict mode
            for mode in modes:
                emit({**common, "mode": mode, "provider": name, "status": "skipped",
                      "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
            continue
        inputs = bench.cast(base, dtype, True)
        for mode in modes:
            try:
                with dtype_context(dtype_name):
                    call = timed_call(bench, fn, inputs, mode, truth.upstream)
                    stats = time_fn(call, device, **budget)
                    mem = peak_memory_mb(call, device)
            except Exception as e:  # e.g. out of memory at a size the check passed at
                emit({**common, "mode": mode, "provider": name, "status": "error",
                      "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
                continue
            emit({**common, "mode": mode, "provider": name, "status": "ok", "reason": None,
                  **derived(bench, case, dtype, dtype_name, mode, stats, calib),
                  "peak_mem_mb": mem, "err": err, "err_over_bound": err_ratio, **stats})
        del inputs


def derived(bench: OpBench, case: Case, dtype, dtype_name: str, mode: str, stats: dict, calib: dict) -> dict:
    """GB/s or TFLOP/s and the roofline percentage against this run's calibration."""
    seconds = stats["median_ms"] / 1e3
    out = {"gbps": None, "tflops": None, "roofline_pct": None}
    nbytes, nflops = bench.bytes_moved(case, dtype, mode), bench.flops(case, mode)
    if nbytes:
        out["gbps"] = nbytes / seconds / 1e9
    if nflops:
        out["tflops"] = nflops / seconds / 1e12
    if bench.metric == "gbps" and out["gbps"] and calib.get("copy_gbps"):
        out["roofline_pct"] = 100 * out["gbps"] / calib["copy_gbps"]
    peak = calib.get("matmul_tflops", {}).get(dtype_name)
    if bench.metric == "tflops" and out["tflops"] and peak:
        out["roofline_pct"] = 100 * out["tflops"] / peak
    return out
