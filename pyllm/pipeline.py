"""``pyllm pipeline``: every stage end to end on the built-in data, then a report.

    data -> pretrain -> sft -> rm -> dpo, grpo -> eval -> report

``data`` curates the interpreter's standard library, trains a BPE tokenizer and packs shards
(``pyllm.data.run``); ``pretrain`` trains a model on the shards (``pyllm.train.train``); ``sft``, ``rm``
(reward model), ``dpo`` and ``grpo`` (or ``ppo``) are ``pyllm.post``'s stages on its built-in data (DPO
and RL each start from the SFT model by default: two alignments, both evaluated);
``eval`` measures every checkpoint the same way (``pyllm.eval`` plus held-out task answers, reward and
KL to the SFT model); ``report`` writes ``report/report.md`` with plots (``pyllm.report``).

Each stage is cached by a hash of its own settings and of the stages it reads from: re-running skips
finished stages, a changed setting re-runs that stage and the ones after it, and an interrupted stage
resumes (training stages from their last checkpoint). No download, no GPU needed; presets scale from a
one-minute smoke run to GPU-sized runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyllm
from pyllm.data.jsonl import read_json_lines, strict_json
from pyllm.data.shards import write_atomic
from pyllm.typecheck import check_fields

STAGES = ("data", "pretrain", "sft", "rm", "dpo", "rl", "eval", "report")


class StageUnavailable(RuntimeError):
    """A stage whose API is not in this build of pyllm; the pipeline reports it and goes on."""


@dataclass
class PipelineConfig:
    """One end-to-end run. The per-stage dicts override the fields of that stage's own config."""

    out_dir: str = "runs/pipeline"
    """Every stage's output goes in a sub-directory; report/report.md is the summary."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    precision: str = "fp32"
    """Training precision of every stage: "fp32", "bf16" or "fp16"."""
    data: dict[str, Any] = field(default_factory=dict)
    """pyllm.data.DataConfig fields, e.g. {"max_documents": 400, "tokenizer": {"vocab_size": 2048}}."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """pyllm.train.TrainConfig fields (model_preset, model, max_steps, seq_len, batch_size, lr...)."""
    sft: dict[str, Any] = field(default_factory=dict)
    """pyllm.post SFT config fields (data, seq_len, train={...})."""
    rm: dict[str, Any] = field(default_factory=dict)
    """pyllm.post reward-model config fields."""
    dpo: dict[str, Any] = field(default_factory=dict)
    """pyllm.post DPO config fields."""
    rl: str = "grpo"
    """Online RL: "grpo" (verifiable task reward), "ppo" (reward model) or "none"."""
    rl_from: str = "sft"
    """The model RL starts from: "sft" (DPO and RL are two alignments of the SFT model, both evaluated)
    or "dpo" (RL after DPO)."""
    rl_cfg: dict[str, Any] = field(default_factory=dict)
    """pyllm.post GRPO/PPO config fields."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Evaluation sizes: {"limit": items per task, "heldout": task prompts, "samples": prompts shown}."""
    skip: tuple[str, ...] = ()
    """Stages not to run (their dependants are skipped too), e.g. ("rm", "rl")."""

    def __post_init__(self):
        check_fields(self)
        from pyllm.train.config import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"PipelineConfig: precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.rl_from not in ("sft", "dpo"):
            raise ValueError(f"PipelineConfig: rl_from={self.rl_from!r}: use 'sft' or 'dpo'")
        if self.rl not in ("grpo", "ppo", "none"):
            raise ValueError(f"PipelineConfig: rl={self.rl!r}: use 'grpo', 'ppo' or 'none'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"PipelineConfig: device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():  # else the data stage runs first and pretraining fails deep inside
                raise ValueError("PipelineConfig: device='cuda' but CUDA is not available here: use 'cpu' or 'auto'")
        if not str(self.out_dir).strip():  # "" would write every stage into the current directory
            raise ValueError("PipelineConfig: out_dir is empty: name a directory")
        bad = [s for s in self.skip if s not in STAGES]
        if bad:
            raise ValueError(f"PipelineConfig: skip={bad}: stages are {', '.join(STAGES)}")
        if "data" in self.skip or "pretrain" in self.skip:
            raise ValueError("PipelineConfig: 'data' and 'pretrain' cannot be skipped (every later stage needs them)")


# ------------------------------------------------------------------------------------------ presets


def smoke(**overrides) -> PipelineConfig:
    """About a minute on a 2-core CPU: every stage runs, on very little data; the numbers mean little."""
    return PipelineConfig(**_merge(dict(
        out_dir="runs/pipeline-smoke",
        data={"max_documents": 40, "tokenizer": {"vocab_size": 512}, "classifier": {"enabled": False},
              "shards": {"val_fraction": 0.1}, "report": False},
        pretrain={"model_preset": "tiny", "model": {"n_layer": 2, "d_model": 64, "n_head": 4},
                  "seq_len": 64, "batch_size": 8, "max_steps": 20, "warmup_steps": 4, "eval_every": 10,
                  "eval_batches": 2, "log_every": 5, "lr": 3e-3},
        sft={"seq_len": 64, "max_heldout": 16, "pretrain_mix": 0.25,
             "train": {"max_steps": 15, "batch_size": 8, "log_every": 5}},
        rm={"seq_len": 64, "max_heldout": 16, "train": {"max_steps": 6, "batch_size": 8, "log_every": 3}},
        dpo={"seq_len": 64, "max_heldout": 16, "sft_coef": 1.0,
             "train": {"max_steps": 6, "batch_size": 8, "log_every": 3}},
        rl_cfg={"seq_len": 64, "max_heldout": 16, "prompts_per_rollout": 8,
                "train": {"max_steps": 3, "batch_size": 8, "log_every": 1}},
        eval={"limit": 12, "heldout": 16, "samples": 4, "max_new_tokens": 6},
    ), overrides))


RL_PROMPTS_FROM = 1200
"""The default preset's split of the built-in task prompts: SFT trains on those before this index, RL
samples those from it on."""


def default(**overrides) -> PipelineConfig:
    """The README's run: about 5-6 min on an otherwise idle 2-core AVX-512 CPU (5 min 26 s at b9f5627, 6 min
    1 s at d561513, 4 min 42 s at bb6f448 and f004124), about 9 on a 2-core AVX2-only one (run as such a CPU runs it:
    8 min 18 s at cfd0489, 8 min 59 s at d561513)."""
    return PipelineConfig(**_merge(dict(
        out_dir="runs/pipeline",
        data={"max_documents": 2000, "tokenizer": {"vocab_size": 2048}, "shards": {"val_fraction": 0.05}},
        pretrain={"model_preset": "tiny", "model": {"n_layer": 4, "d_model": 128, "n_head": 4},
                  "seq_len": 128, "batch_size": 16, "max_steps": 2500, "warmup_steps": 100, "eval_every": 250,
                  "eval_batches": 8, "log_every": 25, "lr": 2e-3, "min_lr": 2e-4, "ckpt_every": 500},
        # A quarter of every SFT batch replays pretraining text. Measured on this preset's pretrained model
        # (150 held-out prompts): SFT on all training prompts without replay took bits/byte on held-out text
        # 2.01 -> 8.13 (forgetting) at task accuracy 0.80; with replay 2.01 -> 2.20 at 0.87.
        # SFT sees the first 1200 of the 2426 training prompts and RL samples the others (skip_train): on
        # prompts SFT memorised every sample is right, so GRPO's groups have no reward spread to learn from
        # (from the all-prompts SFT model GRPO's rollout reward stayed at 0.97 and held-out accuracy fell
        # 0.87 -> 0.78). With 1200 prompts: bits/byte 2.20, task accuracy 0.61.
        sft={"seq_len": 96, "max_heldout": 150, "pretrain_mix": 0.25, "max_train": RL_PROMPTS_FROM,
             "train": {"max_steps": 1000, "batch_size": 16, "ckpt_every": 250}},
        rm={"seq_len": 96, "max_heldout": 150, "train": {"max_steps": 300, "batch_size": 16}},
        # DPO + NLL on the chosen answers: from an SFT model at task accuracy 0.67, plain DPO cut it to 0.60
        # (lr 1e-4 .. 3e-5 and IPO did the same); with sft_coef 1 the same run gave 0.71
        dpo={"seq_len": 96, "max_heldout": 150, "sft_coef": 1.0,
             "train": {"max_steps": 150, "batch_size": 16, "lr": 1e-4, "min_lr": 1e-5}},
        # GRPO on the prompts SFT never saw, with Dr. GRPO advantages (r - group mean, not divided by the
        # group's std, which inflates groups that are all but unanimous): steps of 64 samples, one pass over
        # each rollout of 64 prompts x 8, every held-out prompt scored (574; one s.e. of a rate ~0.02).
        # Measured at 3e4e91e from two SFT models (this preset's, run with the avx512 kernels and oneDNN
        # GEMMs and with the avx2 kernels and MKL, as on an AVX2-only machine), GRPO seeds 0-4, change in
        # the held-out sampled reward (4 sampling seeds each): 600 steps at the GRPO default kl_coef 0.04
        # -0.010 .. +0.032 (mean +0.005 over 5 runs; the avx2 pipeline failed its check, 0.620 -> 0.611),
        # at kl_coef 0.01 +0.002 .. +0.046 (mean +0.021 over 9; greedy -0.002 .. +0.065); 1200 steps at
        # kl_coef 0.01 +0.030 .. +0.066 (mean +0.046 over 8; greedy +0.027 .. +0.075, KL 1.28-1.68 nats).
        # lr 3e-4 fell (-0.058) and lr 5e-4 collapsed.
        rl_cfg={"seq_len": 96, "max_heldout": 600, "skip_train": RL_PROMPTS_FROM, "scale_rewards": False, "epochs": 1,
                "kl_coef": 0.01,
                "train": {"max_steps": 1200, "batch_size": 64, "lr": 2e-4, "min_lr": 2e-4, "warmup_steps": 0}},
        eval={"limit": 100, "heldout": 600, "samples": 6, "max_new_tokens": 8},
    ), overrides))


def gpu(**overrides) -> PipelineConfig:
    """A GPT-2-small-sized run for one GPU (bf16): the whole standard library, 5000 steps."""
    return PipelineConfig(**_merge(dict(
        out_dir="runs/pipeline-gpu", device="cuda", precision="bf16",
        data={"include_stdlib_tests": True, "tokenizer": {"vocab_size": 16384}},
        pretrain={"model_preset": "gpt2_small", "seq_len": 1024, "batch_size": 32, "max_steps": 5000,
                  "warmup_steps": 200, "eval_every": 500, "lr": 6e-4, "ckpt_every": 1000},
        sft={"seq_len": 256, "pretrain_mix": 0.25, "train": {"max_steps": 1000, "batch_size": 64, "lr": 1e-4}},
        rm={"seq_len": 256, "train": {"max_steps": 500, "batch_size": 64, "lr": 1e-5}},
        dpo={"seq_len": 256, "train": {"max_steps": 500, "batch_size": 64, "lr": 1e-6}},
        rl_cfg={"seq_len": 256, "train": {"max_steps": 200, "batch_size": 64, "lr": 1e-6}},
        eval={"limit": 1000, "heldout": 500, "samples": 8, "max_new_tokens": 16},
    ), overrides))


def gpu_large(**overrides) -> PipelineConfig:
    """GPT-2 medium (350M) on one large GPU (bf16), 10000 pretraining steps."""
    return gpu(**_merge(dict(
        out_dir="runs/pipeline-gpu-large",
        pretrain={"model_preset": "gpt2_medium", "max_steps": 10000, "lr": 3e-4, "batch_size": 64},
    ), overrides))


PRESETS: dict[str, Callable[..., PipelineConfig]] = {"smoke": smoke, "default": default, "gpu": gpu,
                                                     "gpu_large": gpu_large}


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict merge: overrides win, nested dicts are merged key by key."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------ stage caching


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    """``<out_dir>/<stage>/stage.json``: the inputs' hash, whether it finished, its summary."""

    key: str
    finished: bool = False
    status: str = "running"  # "done", "unavailable", "skipped"
    seconds: float = 0.0
    """Wall time from the first attempt's start to the end (interruptions included)."""
    cpu_seconds: float = 0.0
    """CPU time of the last attempt (this process and its workers)."""
    started: float = 0.0
    """Epoch time the first attempt started."""
    attempts: int = 0
    """1 + the number of times an interrupted run of this stage was resumed."""
    summary: dict = field(default_factory=dict)


def _read_record(path: Path) -> StageRecord | None:
    """The stage's record, or None when there is none or it cannot be read (cut short by a kill or a full
    disk): the stage then re-runs from a cleared directory."""
    try:
        return StageRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(path: Path, rec: StageRecord) -> None:
    """Write stage.json atomically: a kill mid-write leaves the old record or the new one, never half."""
    write_atomic(path, json.dumps(dataclasses.asdict(rec), default=str).encode())


def _clear(directory: Path) -> None:
    """Remove a stage directory. It is first renamed aside in one step: a kill during the (slow) delete then
    leaves a ``*.stale-*`` sibling that the next run removes, never a record-less half directory whose
    checkpoints would be resumed."""
    if not directory.exists():
        return
    stale = directory.with_name(f"{directory.name}.stale-{os.getpid()}")
    if stale.exists():  # this pid's leftover from an earlier killed run: os.replace cannot overwrite it
        shutil.rmtree(stale)
    os.replace(directory, stale)
    shutil.rmtree(stale)


class Pipeline:
    """Runs the stages of one PipelineConfig, skipping those whose inputs have not changed."""

    def __init__(self, cfg: PipelineConfig, force: tuple[str, ...] = (), log: Callable[[str], None] = print):
        self.cfg, self.force, self.log = cfg, set(force), log
        self.out = Path(cfg.out_dir)
        self.records: dict[str, StageRecord] = {}
        self.keys: dict[str, str] = {}

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def identity(self, name: str) -> str:
        """What a dependent stage's key takes from stage ``name``: its inputs' hash and when the run that made its
        output started, so that a re-run of ``name`` (``--force``) re-runs its dependents too."""
        return f"{self.keys[name]}@{self.records[name].started!r}"

    def run_stage(self, name: str, settings: dict, needs: tuple[str, ...], fn: Callable[[Path], dict]) -> StageRecord:
        """Run ``fn(stage_dir) -> summary`` unless a finished record with the same inputs' hash exists."""
        import resource

        n = STAGES.index(name) + 1
        missing = [d for d in needs if self.records.get(d) is None or self.records[d].status != "done"]
        if name in self.cfg.skip or missing:
            why = "skipped by the configuration" if name in self.cfg.skip else f"needs {', '.join(missing)}"
            self.log(f"[{n}/{len(STAGES)}] {name}: skipped ({why})")
            rec = StageRecord(key="", finished=True, status="skipped", summary={"reason": why})
            self.records[name] = rec
            return rec
        key = _key(name, settings, [self.identity(d) for d in needs], pyllm.__version__)
        self.keys[name] = key
        directory = self.stage_dir(name)
        path = directory / "stage.json"
        old = _read_record(path)
        if old is not None and old.key == key and old.finished and old.status == "done" and name not in self.force:
            self.log(f"[{n}/{len(STAGES)}] {name}: cached ({old.seconds:.0f} s when run; inputs unchanged)")
            self.records[name] = old
            return old
        rec = StageRecord(key=key, started=time.time(), attempts=1)
        if old is None or old.key != key or name in self.force:
            # different inputs, or content no readable record vouches for: stale checkpoints must not be resumed
            _clear(directory)
        else:
            self.log(f"[{n}/{len(STAGES)}] {name}: resuming an interrupted run")
            rec.started, rec.attempts = old.started or rec.started, old.attempts + 1
        directory.mkdir(parents=True, exist_ok=True)
        _write_record(path, rec)
        self.log(f"[{n}/{len(STAGES)}] {name}: running")
        c0 = _cpu_seconds(resource)
        try:
            rec.summary, rec.status = fn(directory), "done"
        except StageUnavailable as e:
            rec.summary, rec.status = {"reason": str(e)}, "unavailable"
            self.log(f"[{n}/{len(STAGES)}] {name}: unavailable ({e})")
        rec.seconds, rec.cpu_seconds, rec.finished = time.time() - rec.started, _cpu_seconds(resource) - c0, True
        _write_record(path, rec)
        if rec.status == "done":
            self.log(f"[{n}/{len(STAGES)}] {name}: done in {rec.seconds:.0f} s")
        self.records[name] = rec
        return rec

    def run(self) -> dict[str, StageRecord]:
        from . import report

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.stale-*"):  # left by a run killed while clearing a stage directory
            shutil.rmtree(stale, ignore_errors=True)
        if _device(cfg) == "cpu":
            measured_matmul_tflops("cpu", cfg.precision)  # the MFU reference, taken while the machine is idle
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        S = self.records
        self.run_stage("data", cfg.data, (), lambda d: run_data(cfg, d))
        self.run_stage("pretrain", {**cfg.pretrain, "precision": cfg.precision, "device": _device(cfg)}, ("data",),
                       lambda d: run_pretrain(cfg, d, S["data"].summary))
        self.run_stage("sft", cfg.sft, ("pretrain",),
                       lambda d: run_sft(cfg, d, S["pretrain"].summary, S["data"].summary))
        self.run_stage("rm", cfg.rm, ("sft",), lambda d: run_rm(cfg, d, S["sft"].summary))
        self.run_stage("dpo", cfg.dpo, ("sft",), lambda d: run_dpo(cfg, d, S["sft"].summary))
        rl_needs = (cfg.rl_from,) + (("rm",) if cfg.rl == "ppo" else ())
        if cfg.rl == "none":
            S["rl"] = StageRecord(key="", finished=True, status="skipped", summary={"reason": "rl='none'"})
        else:
            self.run_stage("rl", {"algorithm": cfg.rl, **cfg.rl_cfg}, rl_needs,
                           lambda d: run_rl(cfg, d, S[cfg.rl_from].summary, S.get("rm")))
        ckpts = {name: S[name].summary["model_dir"] for name in ("pretrain", "sft", "dpo", "rl")
                 if S.get(name) and S[name].status == "done" and S[name].summary.get("model_dir")}
        # the reward column is the rm stage's judge: a retrained (or now skipped) reward model re-runs eval
        rm_key = self.identity("rm") if S.get("rm") and S["rm"].status == "done" else None
        self.run_stage("eval", {**cfg.eval, "checkpoints": sorted(ckpts), "rm": rm_key}, tuple(ckpts),
                       lambda d: run_eval(cfg, d, ckpts, S.get("rm")))
        # the report is cheap and reads everything: always rewritten
        t0 = time.perf_counter()
        path = report.write_pipeline_report(cfg, S, self.stage_dir("report"))
        self.log(f"[{len(STAGES)}/{len(STAGES)}] report: {path} ({time.perf_counter() - t0:.0f} s)")
        return S


def _cpu_seconds(resource) -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def run(cfg: PipelineConfig, force: tuple[str, ...] = ()) -> dict[str, StageRecord]:
    """Run the pipeline; returns each stage's record (status, seconds, summary)."""
    return Pipeline(cfg, force).run()


# --------------------------------------------------------------------------------------------- stages
# One function per stage: the only place that stage's API is called.


def _device(cfg: PipelineConfig) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def run_data(cfg: PipelineConfig, directory: Path) -> dict:
    """Curate the standard library, train the tokenizer, pack shards (pyllm.data.run)."""
    from pyllm.data import DataConfig
    from pyllm.data import run as run_data_pipeline

    result = run_data_pipeline(DataConfig.from_dict({**cfg.data, "out_dir": str(directory)}))
    cur, pack = result.stats["curate"], result.stats["pack"]
    # the funnel: documents left after each filter, in the order the filters run
    funnel, left = [("read", cur["documents_in"])], cur["documents_in"]
    for stage in ("clean", "quality", "classifier", "dedup"):
        left -= sum(cur["dropped"].get(stage, {}).values())
        funnel.append((stage, left))
    return {"shard_dir": str(result.shard_dir), "tokenizer_dir": str(result.tokenizer_dir),
            "data_report": str(result.report) if result.report else None, "funnel": funnel,
            "dropped": cur["dropped"], "bytes_in": cur["bytes_in"], "bytes_out": cur["bytes_out"],
            "tokens": pack["tokens"], "bytes_per_token": pack["bytes_per_token"], "splits": pack["totals"],
            "curate_seconds": cur["seconds"], "pack_seconds": pack["seconds"]}


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(device: str, precision: str) -> float:
    """The best fp32/bf16/fp16 matmul rate this device shows (TFLOP/s): the peak MFU is judged against
    where no data-sheet figure exists (CPUs). Measured once per process, before any stage runs (a
    measurement taken while another stage's workers wind down reads several times too low)."""
    import torch

    from pyllm.train.metrics import half_matmul_emulated, peak_matmul_candidates

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # many short repetitions after a warm-up, the fastest kept: on a shared CPU a long one is preempted
    n = 4096 if device == "cuda" else (128 if half_matmul_emulated(dtype, device) else 512)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for gemm in peak_matmul_candidates(a, b):
        for _ in range(3):
            gemm()
        for _ in range(30):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            gemm()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _history(directory: Path) -> list[dict]:
    """Every record of a Trainer's metrics.jsonl (training and evaluation lines), in order."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for _, record in read_json_lines(path)]


def run_pretrain(cfg: PipelineConfig, directory: Path, data: dict) -> dict:
    """Pretrain on the shards (pyllm.train.train); the final model lands in <dir>/final."""
    import torch

    from pyllm.model.flops import peak_flops
    from pyllm.train import TrainConfig, train

    device = _device(cfg)
    # MFU needs a peak: the data sheet's for known GPUs (the Trainer looks it up), else measured here
    known = device == "cuda" and peak_flops(torch.cuda.get_device_name(), cfg.precision) is not None
    peak = None if known else measured_matmul_tflops(device, cfg.precision)
    tcfg = TrainConfig(**{**cfg.pretrain, "data": data["shard_dir"], "out_dir": str(directory), "device": device,
                          "precision": cfg.precision, "peak_tflops": peak, "distributed": "none"})
    summary = train(tcfg)
    return {**{k: v for k, v in summary.items() if k != "history"}, "peak_tflops_used": peak,
            "params": _num_params(summary["model_dir"]), "history": _history(directory)}


def _num_params(model_dir: str) -> int:
    from pyllm.model import load_model

    return load_model(model_dir).num_params()


def _post_stage(stage: str, module: str, config: str, function: str, settings: dict, cfg: PipelineConfig,
                directory: Path, start_model: str, **extra) -> dict:
    """Run one pyllm.post stage from ``start_model``; StageUnavailable if this build lacks it."""
    import importlib

    try:
        mod = importlib.import_module(module)
        config_cls, fn = getattr(mod, config), getattr(mod, function)
    except (ImportError, AttributeError) as e:
        raise StageUnavailable(f"{module}.{config}/{function} not found ({type(e).__name__}: {e})") from None
    device = _device(cfg)
    train_overrides = {**settings.get("train", {}), "device": device, "precision": cfg.precision}
    if device == "cpu":  # no data-sheet peak for a CPU: MFU against the matmul rate measured now
        train_overrides["peak_tflops"] = measured_matmul_tflops(device, cfg.precision)
    stage_cfg = config_cls(**{**settings, **extra, "model": start_model, "out_dir": str(directory),
                              "train": train_overrides})
    summary = fn(stage_cfg)
    return {**{k: v for k, v in summary.items() if k != "train"},
            "train": {k: v for k, v in summary.get("train", {}).items() if k != "history"},
            "history": _history(directory), "stage": stage}


def run_sft(cfg: PipelineConfig, directory: Path, pretrain: dict, data: dict) -> dict:
    """SFT of the pretrained model; the pretraining shards are its replay data (``pretrain_mix``) and
    its held-out text metric unless the preset names others."""
    return _post_stage("sft", "pyllm.post.sft", "SFTConfig", "sft", {"pretrain_data": data["shard_dir"], **cfg.sft},
                       cfg, directory, pretrain["model_dir"])


def run_rm(cfg: PipelineConfig, directory: Path, sft: dict) -> dict:
    return _post_stage("rm", "pyllm.post.reward", "RewardConfig", "train_reward_model", cfg.rm, cfg, directory,
                       sft["model_dir"])


def run_dpo(cfg: PipelineConfig, directory: Path, sft: dict) -> dict:
    return _post_stage("dpo", "pyllm.post.dpo", "DPOConfig", "dpo", cfg.dpo, cfg, directory, sft["model_dir"])


def _rl_settings(cfg: PipelineConfig) -> dict:
    """``rl_cfg`` without the fields only the other algorithm has (a preset tuned for GRPO, e.g. its
    ``scale_rewards``, still runs with ``--rl ppo``); fields neither has are left for the config to reject."""
    from pyllm.post.grpo import GRPOConfig
    from pyllm.post.ppo import PPOConfig

    ours, other = (GRPOConfig, PPOConfig) if cfg.rl == "grpo" else (PPOConfig, GRPOConfig)
    foreign = {f.name for f in dataclasses.fields(other)} - {f.name for f in dataclasses.fields(ours)}
    return {k: v for k, v in cfg.rl_cfg.items() if k not in foreign}


def run_rl(cfg: PipelineConfig, directory: Path, start: dict, rm: StageRecord | None) -> dict:
    if cfg.rl == "grpo":
        summary = _post_stage("grpo", "pyllm.post.grpo", "GRPOConfig", "grpo", _rl_settings(cfg), cfg, directory,
                              start["model_dir"])
    else:
        summary = _post_stage("ppo", "pyllm.post.ppo", "PPOConfig", "ppo", _rl_settings(cfg), cfg, directory,
                              start["model_dir"], reward=f"rm:{rm.summary['model_dir']}")
    return {**summary, "start": cfg.rl_from}


def run_eval(cfg: PipelineConfig, directory: Path, checkpoints: dict[str, str], rm: StageRecord | None) -> dict:
    """Every checkpoint measured the same way (columns explained in pyllm.report)."""
    import torch

    from pyllm.eval import builtin_task, run_tasks
    from pyllm.model import load_model
    from pyllm.post.chat import ChatTemplate
    from pyllm.post.datasets import split, task_examples, task_reward
    from pyllm.post.rollout import sample, sampled_kl
    from pyllm.post.sequences import generate_responses
    from pyllm.tokenizer import load_tokenizer

    device, settings = _device(cfg), cfg.eval
    limit, max_new = settings.get("limit", 100), settings.get("max_new_tokens", 8)
    # held-out task prompts: the same hash split SFT/RL use, so none of these was trained on
    heldout = split(task_examples(), cfg.sft.get("heldout_fraction", 0.2))[1][:settings.get("heldout", 100)]
    prompts = [e.prompt for e in heldout]
    tasks = [builtin_task("stdlib_ppl", limit=limit), builtin_task("stdlib_name", limit=limit),
             builtin_task("stdlib_doc", limit=limit)]
    judge = _reward_judge(rm, device)
    reference = load_model(checkpoints["sft"], device=device) if "sft" in checkpoints else None
    results, samples, items = {}, {}, {}
    for name, path in checkpoints.items():
        model, tok = load_model(path, device=device), load_tokenizer(path)
        template = ChatTemplate(tok)
        with torch.no_grad():
            scores = run_tasks(model, tok, tasks)
            # items evaluated per task (the same for every checkpoint): a task may hold fewer than the limit
            items = {task: m.get("n", m.get("documents")) for task, m in scores.items()}
            _, _, greedy, _ = generate_responses(model, template, prompts, max_new_tokens=max_new, temperature=0.0)
            row = {"bits_per_byte": scores["stdlib_ppl"]["bits_per_byte"],
                   "mc_name_acc": scores["stdlib_name"]["acc"], "mc_doc_acc": scores["stdlib_doc"]["acc_norm"],
                   "task_acc": sum(task_reward(p, r) for p, r in zip(prompts, greedy)) / len(prompts)}
            if judge is not None:
                row["reward"] = judge.scores(prompts, greedy).mean().item()
            if reference is not None and name not in ("pretrain",):
                # the estimator RL's held-out KL uses, on one response per prompt (seed 0)
                sampled, _ = sample(model, template, prompts, max_new_tokens=max_new, temperature=1.0, seed=0)
                row["kl_to_sft"] = sampled_kl(model, reference, sampled)
        results[name] = row
        samples[name] = dict(zip(prompts[:settings.get("samples", 4)], greedy))
        del model
    eval_json = strict_json({"checkpoints": results, "samples": samples})  # a NaN metric: null, not bare NaN
    (directory / "eval.json").write_text(json.dumps(eval_json, indent=1))
    return {"checkpoints": results, "samples": samples, "heldout_prompts": len(prompts), "task_limit": limit,
            "task_items": items}


def _reward_judge(rm: StageRecord | None, device: str):
    """The trained reward model as a scorer of (prompt, response), or None when there is none."""
    if rm is None or rm.status != "done":
        return None
    from pyllm.post.chat import ChatTemplate
    from pyllm.post.heads import RewardModel
    from pyllm.post.judge import RewardModelJudge
    from pyllm.tokenizer import load_tokenizer

    directory = rm.summary["model_dir"]
    model = RewardModel.load(directory, device=device).eval()
    return RewardModelJudge(model, ChatTemplate(load_tokenizer(directory)), model.body.cfg.max_seq_len)


# ---------------------------------------------------------------------------------------------- CLI


def _make_out_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):  # an existing directory mkdir accepts but no stage could write to
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pyllm pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="smoke (~1 min CPU), default (~5-10 min on a 2-core CPU), gpu, gpu_large")
    parser.add_argument("--out-dir", help="where the stages and the report go (default: the preset's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--rl", choices=("grpo", "ppo", "none"))
    parser.add_argument("--rl-from", choices=("sft", "dpo"), help="the model RL starts from (default sft)")
    parser.add_argument("--skip", default="", help=f"comma-separated stages not to run ({', '.join(STAGES[2:-1])})")
    parser.add_argument("--force", default="",
                        help="comma-separated stages to re-run even if cached (the stages that read them re-run too)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("out_dir", args.out_dir), ("device", args.device),
                                   ("precision", args.precision), ("rl", args.rl), ("rl_from", args.rl_from))
                 if v is not None}
    if args.skip:
        overrides["skip"] = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    force = tuple(s.strip() for s in args.force.split(",") if s.strip())
    try:
        cfg = PRESETS[args.preset](**overrides)
        bad = [s for s in force if s not in STAGES]
        if bad:
            raise ValueError(f"--force {bad}: stages are {', '.join(STAGES)}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would curate and write the same files
            raise ValueError("runs in one process (not under torchrun); run `pyllm train` or a post-training "
                             "stage under torchrun for data parallelism")
    except ValueError as e:
        print(f"pyllm pipeline: {e}", file=sys.stderr)
        return 2
    try:  # a bad --out-dir (a file, a path under a file, no permission) fails here in one line, not in a stage
        _make_out_dir(Path(cfg.out_dir))
    except OSError as e:
        print(f"pyllm pipeline: {cfg.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    records = run(cfg, force)
    failed = [n for n, r in records.items() if r.status == "unavailable"]
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; report: {Path(cfg.out_dir) / 'report' / 'report.md'}"
          + (f"; unavailable stages: {', '.join(failed)}" if failed else ""))
    return 0
