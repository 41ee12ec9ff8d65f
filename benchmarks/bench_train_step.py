"""End to end: one optimiser step of ``pyllm.train.Trainer`` (forward, loss, backward, clipping, the
fused AdamW step; the loss scaler in fp16) per op backend and precision, in tokens/s and MFU.

This is the total that fusion and low precision buy, not a sum of per-op numbers. Unlike the op
benchmarks it does not run strictly: a backend that lacks a kernel for one op falls back to the
reference for that op, as in real training, and the record lists those fallbacks (``fallbacks``).
MFU uses PaLM's FLOP count (``pyllm.model.flops``) over the matmul peak measured in the same run.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch

from pyllm.model import Transformer, preset
from pyllm.ops import registry
from pyllm.model.flops import flops_per_token
from pyllm.train.config import cpu_has_native_bf16

from .harness import PYLLM_BACKENDS, TF32_ON_CPU, Case, RunOptions
from .timing import dtype_context, time_fn

# (label, model preset, overrides, batch, sequence)
_MODELS = {
    "short": [("tiny GPT (4L, d=128)", "tiny", {}, 4, 64)],
    "cpu": [("tiny GPT (4L, d=128)", "tiny", {}, 8, 256),
            ("tiny Llama (4L, d=128, GQA)", "tiny_llama", {}, 8, 256)],
    "gpu": [("GPT-2 124M", "gpt2_small", {}, 8, 1024),
            ("GPT-2 350M", "gpt2_medium", {}, 8, 1024),
            ("Llama 1B", "llama_1b", {"max_seq_len": 2048}, 4, 2048)],
}
_BUDGET = {"short": dict(budget_s=0.2, warmup_s=0.05, min_reps=3, max_reps=5),
           "cpu": dict(budget_s=3.0, warmup_s=1.0, min_reps=3, max_reps=10),
           "gpu": dict(budget_s=3.0, warmup_s=2.0, min_reps=5, max_reps=30)}


class _FixedBatches:
    """The same random batch every step: data loading is not what this benchmark measures."""

    def __init__(self, vocab: int, batch: int, seq: int):
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        self.batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class TrainStepBench:
    op = "train_step"

    def cases(self, suite: str) -> list[Case]:
        return [Case(f"{label} (B={b}, T={t})", {"preset": p, "overrides": o, "batch": b, "seq": t})
                for label, p, o, b, t in _MODELS[suite]]

    # the op benchmarks' names of the training backends (harness.providers), so that one --providers selects
    # both: provider -> (backend, under torch.compile)
    provider_backends = {"torch eager": ("torch", False), "torch.compile": ("torch", True),
                         **{name: (backend, False) for name, backend in PYLLM_BACKENDS.items()}}

    def _trained(self, opts: RunOptions) -> list[tuple[str, bool]]:
        """(backend, compile) pairs this device and suite train, whatever --providers says."""
        backends = ["torch", "triton", "cuda"] if opts.device == "cuda" else ["torch", "cpu"]
        return [(b, False) for b in backends] + ([("torch", True)] if opts.suite != "short" else [])

    def variants(self, opts: RunOptions) -> list[tuple[str, str, bool]]:
        """(backend, precision, compile) combinations for this device and the selected providers."""
        if opts.device == "cuda":
            default = ("fp32", "tf32", "bf16", "fp16")
        else:  # bf16 autocast where the CPU has bf16 dot products (emulated elsewhere: ~500x slower matmuls)
            default = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)
        not_run = self.not_run(opts)
        precisions = [p for p in (opts.dtypes or default) if p not in not_run]
        named = {v: n for n, v in self.provider_backends.items()}
        return [(b, p, c) for b, c in self._trained(opts) if opts.selects(named[(b, c)]) for p in precisions]

    def not_run(self, opts: RunOptions) -> dict[str, str]:
        """The --dtypes and --providers with no training step here, each with the reason the runner prints."""
        out = {}
        for p in opts.dtypes or ():
            if p == "tf32" and opts.device != "cuda":
                out[p] = TF32_ON_CPU
            elif p == "fp16" and opts.device != "cuda":
                out[p] = "fp16 training (autocast with the loss scaler) is measured on CUDA only"
        trained = self._trained(opts)
        for name in opts.providers or ():
            if name not in self.provider_backends:
                out[name] = "an op-level baseline, not a training backend"
            elif self.provider_backends[name] not in trained:
                backend, compile_ = self.provider_backends[name]
                out[name] = ("the short suite trains no torch.compile variant (compile time)" if compile_
                             else f"backend {backend!r} has no training step on {opts.device}")
        return out

    def measure(self, case: Case, backend: str, precision: str, compile_: bool, opts: RunOptions, calib: dict) -> dict:
        from pyllm.train import Trainer, TrainConfig

        s = case.shape
        cfg = preset(s["preset"], backend=backend, **s["overrides"])
        torch.manual_seed(0)
        model = Transformer(cfg)
        registry._WARNED.clear()  # the registry warns once per process: let every variant report its own fallbacks
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            tcfg = TrainConfig(seq_len=s["seq"], batch_size=s["batch"], precision="fp32" if precision == "tf32" else precision,
                               device=opts.device, compile=compile_, distributed="none", out_dir=tmp, progress=False,
                               max_steps=10**6, eval_every=0, resume=False, model_preset=s["preset"])
            trainer = Trainer(model, tcfg, _FixedBatches(cfg.vocab_size, s["batch"], s["seq"]))
            with dtype_context(precision):
                stats = time_fn(lambda: trainer.train_step(1e-4), opts.device, flush_l2=False, **_BUDGET[opts.suite])
                if opts.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    trainer.train_step(1e-4)
                    torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20 if opts.device == "cuda" else None
        fallbacks = sorted({str(w.message).split(":")[0] for w in caught if "falling back" in str(w.message)})
        tokens = s["batch"] * s["seq"]
        tokens_per_s = tokens / (stats["median_ms"] / 1e3)
        peak_tflops = calib.get("matmul_tflops", {}).get(precision)
        mfu = 100 * tokens_per_s * flops_per_token(cfg, s["seq"]) / (peak_tflops * 1e12) if peak_tflops else None
        return {"tokens": tokens, "tokens_per_s": tokens_per_s, "mfu_pct": mfu, "peak_mem_mb": peak,
                "params": model.num_params(), "fallbacks": fallbacks, **stats}

    def run(self, opts: RunOptions, calib: dict, emit, skip=lambda label, dtype: False) -> None:
        for case in self.cases(opts.suite):
            if not opts.selects_case(case.label):
                continue
            for backend, precision, compile_ in self.variants(opts):
                if skip(case.label, f"{backend}-{precision}{'-compile' if compile_ else ''}"):
                    continue
                name = f"{backend}{' + torch.compile' if compile_ else ''}"
                common = dict(op=self.op, kind="train_step", case=case.label, shape=case.shape, model=case.label,
                              backend=name, precision=precision, dtype=f"{backend}-{precision}{'-compile' if compile_ else ''}",
                              mode="train step", provider=name, suite=opts.suite)
                try:
                    emit({**common, "status": "ok", "reason": None,
                          **self.measure(case, backend, precision, compile_, opts, calib)})
                except Exception as e:  # a backend that cannot load, a compile failure
                    emit({**common, "status": "skipped", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})


BENCH = TrainStepBench()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_train_step(benchmark, backend):
    """pytest-benchmark form: one training step of the first model of the suite, fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (backend in ("triton", "cuda")) != (device == "cuda"):
        pytest.skip(f"backend {backend!r} is not run on {device}")
    from pyllm.train import Trainer, TrainConfig

    case = BENCH.cases("gpu" if device == "cuda" else "short")[0]
    s = case.shape
    cfg = preset(s["preset"], backend=backend, **s["overrides"])
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(seq_len=s["seq"], batch_size=s["batch"], device=device, distributed="none", out_dir=tmp,
                           progress=False, max_steps=10**6, eval_every=0, resume=False, model_preset=s["preset"])
        trainer = Trainer(Transformer(cfg), tcfg, _FixedBatches(cfg.vocab_size, s["batch"], s["seq"]))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        benchmark.pedantic(lambda: (trainer.train_step(1e-4), sync()), rounds=5, warmup_rounds=1)
