"""The training configuration: one typed dataclass, named presets, and ``--key value`` overrides.

``TrainConfig`` covers what the loop needs (optimiser, schedule, precision, checkpoints, logging,
distribution) plus what ``train(cfg)`` needs to build a model and data (``data``, ``tokenizer``,
``model_preset`` and ``model`` overrides). Overrides on the command line look like ``--lr 3e-4`` and
``--model.n_layer 6``; an unknown key is a one-line error with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from pyllm.model import PRESETS as MODEL_PRESETS
from pyllm.model import ModelConfig
from pyllm.typecheck import check_fields

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the half precisions' dtypes (fp32: none)
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line that says what to change."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults are nanoGPT's CPU shakespeare-char run."""

    # ---- data (used by train(cfg); a Trainer is handed its batches directly)
    data: str = "builtin"
    """A text file, a folder of .txt/.md files, a token-shard directory (manifest.json), or "builtin"
    (the Python interpreter's own documentation topics, always available offline)."""
    tokenizer: str = "char"
    """Tokenizer for text data: "char" (one id per character seen) or "byte" (UTF-8 bytes)."""
    val_fraction: float = 0.1
    """Fraction of the text (its tail) held out for validation."""
    seq_len: int = 64
    """Tokens per training sequence (the context length trained on)."""
    batch_size: int = 12
    """Sequences per optimiser step, summed over gradient-accumulation steps and all ranks."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on one rank; None: batch_size / world_size (no accumulation)."""

    # ---- model (used by train(cfg))
    model_preset: str = "tiny"
    """Name of a pyllm.model preset the model starts from (vocab_size always comes from the tokenizer)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of ModelConfig fields, e.g. {"n_layer": 6} (CLI: --model.n_layer 6)."""

    # ---- optimisation
    max_steps: int = 2000
    """Optimiser steps to train for."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 1e-4
    """Floor the schedule decays to."""
    warmup_steps: int = 100
    """Steps of linear warmup from ~0 to lr."""
    schedule: str = "cosine"
    """After warmup: "cosine" or "linear" decay to min_lr at max_steps, "constant", or "wsd"
    (warmup-stable-decay: constant, then linear decay over the last decay_fraction of steps)."""
    decay_fraction: float = 0.2
    """For schedule="wsd": the fraction of max_steps spent decaying."""
    weight_decay: float = 0.1
    """Decoupled AdamW weight decay, applied to matrices only (never to norms, biases, embeddings)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.99
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    # ---- precision
    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" autocast; fp16 uses the dynamic loss scaler below."""
    master_weights: bool = False
    """Keep the model's weights in the low precision and fp32 master copies in the optimiser."""
    init_scale: float = 2.0 ** 16
    """fp16: initial loss scale."""
    growth_factor: float = 2.0
    """fp16: multiply the scale by this after growth_interval steps without overflow."""
    backoff_factor: float = 0.5
    """fp16: multiply the scale by this on an overflow (that step is skipped)."""
    growth_interval: int = 2000
    """fp16: overflow-free steps before the scale grows."""

    # ---- execution
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    compile: bool = False
    """torch.compile the loss computation (model forward + loss)."""
    distributed: str = "auto"
    """"none", "ddp", "fsdp" (FSDP2 fully_shard per block), or "auto" (ddp under torchrun)."""
    seed: int = 1337
    """Seeds initialisation and data sampling; equal seeds give equal runs. In [0, 2**63)."""
    threads: int | None = None
    """CPU intra-op threads for train(cfg) (torch.set_num_threads); None keeps torch's default. On a
    loaded machine 1 can be much faster for small models."""
    keep_host_memory: bool = True
    """On a CPU device with glibc: keep freed host memory in the process for reuse instead of returning it
    to the OS and faulting it back in every step (see pyllm/train/host_memory.py: nanoGPT's CPU step
    21 -> 18.5 ms). The process then keeps its peak heap size until it exits."""

    # ---- evaluation, checkpoints, logging
    eval_every: int = 250
    """Steps between evaluations (and at the end); 0 disables periodic evaluation."""
    eval_batches: int = 20
    """Validation batches of ``batch_size`` sequences per evaluation (train(cfg)'s built-in eval): the same
    sequences whatever the micro-batch size and number of processes, evaluated in micro-batches shared out
    over the processes. With micro-batches of the whole batch this is nanoGPT's eval_iters."""
    best_metric: str = "val_loss"
    """Evaluation metric (lower is better) that picks the "best" checkpoint, among the checkpoints written
    at evaluation steps (make ckpt_every a multiple of eval_every)."""
    out_dir: str = "runs/train"
    """Where checkpoints, metrics.jsonl and the final model go."""
    ckpt_every: int = 0
    """Steps between checkpoints; 0: only at the end of the run."""
    keep_last: int = 2
    """How many of the latest checkpoints to keep (the best one is kept in addition)."""
    resume: bool = True
    """Continue from the newest valid checkpoint in out_dir if there is one."""
    log_every: int = 10
    """Steps between metric records (each costs one host sync)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the tensorboard package)."""
    peak_tflops: float | None = None
    """The device's peak dense TFLOP/s for MFU in this precision; None: looked up for known GPUs."""
    carbon_intensity: float = 0.4
    """kg CO2 per kWh for the energy report (0.4 is about the world grid average)."""

    def __post_init__(self):
        # first: a NaN fails every comparison below with a misleading message; Python API callers' types (the CLI
        # parses by type): max_steps=2.5 ran 3 steps with no final checkpoint, lr="1e-3" failed in the optimiser
        check_fields(self, ConfigError)
        checks = [
            (self.data.strip() != "",
             f"data={self.data!r} is empty: give a text file, a folder, a token-shard directory or 'builtin'"),
            (self.tokenizer in ("char", "byte"), f"tokenizer={self.tokenizer!r}: use 'char' or 'byte'"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction={self.val_fraction} must be in (0, 1)"),
            (self.seq_len > 0, f"seq_len={self.seq_len} must be positive"),
            (self.batch_size > 0, f"batch_size={self.batch_size} must be positive"),
            (self.micro_batch_size is None or self.micro_batch_size > 0,
             f"micro_batch_size={self.micro_batch_size} must be positive (or None)"),
            (self.model_preset in MODEL_PRESETS,
             f"model_preset={self.model_preset!r}: use one of {', '.join(MODEL_PRESETS)}"),
            (self.max_steps > 0, f"max_steps={self.max_steps} must be positive"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr}), lr > 0"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}"),
            (0.0 < self.decay_fraction <= 1.0, f"decay_fraction={self.decay_fraction} must be in (0, 1]"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas ({self.beta1}, {self.beta2}) must be in [0, 1)"),
            (self.eps > 0, f"eps={self.eps} must be positive"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}"),
            (not self.master_weights or self.precision != "fp32",
             "master_weights=True needs precision 'bf16' or 'fp16' (fp32 weights are already masters)"),
            (self.init_scale > 0 and self.growth_factor > 1 and 0 < self.backoff_factor < 1,
             "loss scaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1"),
            (self.growth_interval > 0, f"growth_interval={self.growth_interval} must be positive"),
            (self.distributed in DISTRIBUTED, f"distributed={self.distributed!r}: use one of {', '.join(DISTRIBUTED)}"),
            (0 <= self.seed < 2 ** 63, f"seed={self.seed} must be in [0, 2**63)"),
            (self.eval_every >= 0 and self.ckpt_every >= 0, "eval_every and ckpt_every must be >= 0"),
            (self.eval_batches > 0, f"eval_batches={self.eval_batches} must be positive"),
            (self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1"),
            (self.log_every > 0, f"log_every={self.log_every} must be positive"),
            (self.threads is None or self.threads > 0, f"threads={self.threads} must be positive (or None)"),
            (self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops={self.peak_tflops} must be positive"),
            (self.carbon_intensity >= 0, f"carbon_intensity={self.carbon_intensity} must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"TrainConfig: {msg}")
        problem = device_problem(self.device)
        if problem:
            raise ConfigError(f"TrainConfig: {problem}")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.model:
            if key not in model_fields:
                raise ConfigError(f"TrainConfig: unknown model field {key!r}{_suggest(key, model_fields)}")
        try:  # the model the overrides describe (any vocabulary: the tokenizer sets it later)
            self.model_config(vocab_size=256)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"TrainConfig: model: {e}") from None

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per optimiser step; a one-line error if the sizes do not divide."""
        micro = self.micro_batch_size or self.batch_size // world_size
        if micro == 0 or self.batch_size % (micro * world_size):
            raise ConfigError(f"TrainConfig: batch_size={self.batch_size} is not divisible by micro_batch_size "
                              f"({micro}) x world_size ({world_size}); change batch_size or micro_batch_size")
        return self.batch_size // (micro * world_size)

    def micro_batch(self, world_size: int = 1) -> int:
        self.grad_accum_steps(world_size)
        return self.micro_batch_size or self.batch_size // world_size

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model this run trains: the preset, the overrides, the tokenizer's vocabulary."""
        return MODEL_PRESETS[self.model_preset](**{**self.model, "vocab_size": vocab_size,
                                                   "max_seq_len": max(self.seq_len, self.model.get("max_seq_len", 0))})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot be this machine's training device (None: it can)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"device={name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device={name!r} but this machine has no usable CUDA device; use 'cpu' or 'auto'"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def _suggest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid: {', '.join(prefix + v for v in sorted(valid))}"


# ------------------------------------------------------------------------------------------ presets


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16; AMX machines have them too)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def cpu_has_native_fp16() -> bool:
    """True when this CPU has fp16 matrix instructions (AMX-FP16)."""
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return bool(probe and probe())


def shakespeare_char_cpu(**overrides) -> TrainConfig:
    """nanoGPT's published CPU run: char-level, block 64, batch 12, 4 layers x 4 heads x 128, 2000 steps,
    lr 1e-3 cosine to 1e-4, no dropout, no biases.

    Precision is bf16 autocast (fp32 weights, optimiser and loss; bf16 matmuls with fp32 accumulation)
    on a CPU with native bf16 dot products, where a bf16 matmul of this model's shapes runs ~4x faster
    than fp32 (measured on AVX512-BF16), and fp32 elsewhere, where bf16 would be emulated and slower."""
    model = {"n_layer": 4, "n_head": 4, "d_model": 128, "dropout": 0.0, "bias": False}
    return TrainConfig(**{"tokenizer": "char", "seq_len": 64, "batch_size": 12, "max_steps": 2000, "lr": 1e-3,
                          "min_lr": 1e-4, "warmup_steps": 100, "beta2": 0.99, "eval_every": 250,
                          "precision": "bf16" if cpu_has_native_bf16() else "fp32",
                          "model": model, **overrides})


def smoke(**overrides) -> TrainConfig:
    """A run of a few seconds on a CPU: a 2-layer byte-level model for 50 steps."""
    return TrainConfig(**{"tokenizer": "byte", "seq_len": 32, "batch_size": 8, "max_steps": 50, "warmup_steps": 5,
                          "eval_every": 25, "eval_batches": 4, "log_every": 5,
                          "model": {"n_layer": 2, "n_head": 2, "d_model": 64}, **overrides})


def gpt2_small_bf16(**overrides) -> TrainConfig:
    """GPT-2 124M at sequence 1024 in bf16 on a GPU (llm.c's setting: 0.5M-token batches, lr 6e-4)."""
    return TrainConfig(**{"model_preset": "gpt2_small", "tokenizer": "byte", "seq_len": 1024, "batch_size": 512,
                          "micro_batch_size": 16, "max_steps": 10000, "lr": 6e-4, "min_lr": 6e-5,
                          "warmup_steps": 700, "beta2": 0.95, "precision": "bf16", "compile": True,
                          "eval_every": 500, "ckpt_every": 1000, **overrides})


PRESETS = {f.__name__: f for f in (shakespeare_char_cpu, smoke, gpt2_small_bf16)}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown train preset {name!r}{_suggest(name, PRESETS)}")
    return PRESETS[name](**overrides)


# ---------------------------------------------------------------------------------------- overrides


def _coerce(name: str, text: str, typ) -> Any:
    """Parse ``text`` as the annotated type ``typ`` of field ``name``."""
    args = typing.get_args(typ)
    if args and type(None) in args:  # Optional[X]
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: {text!r} is not a boolean (use true/false)")
    if typ in (int, float):
        try:
            return typ(float(text)) if typ is int and float(text).is_integer() else typ(text)
        except ValueError:
            raise ConfigError(f"--{name}: {text!r} is not a valid {typ.__name__}") from None
    return text


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "3e-4", "--model.n_layer=6"]`` -> {"lr": 3e-4, "model": {"n_layer": 6}}, typed by the
    dataclass annotations. Unknown keys: one-line ConfigError with the closest valid key."""
    train_types, model_types = _field_types(TrainConfig), _field_types(ModelConfig)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --lr 3e-4 or --model.n_layer=6")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            value, i = args[i + 1], i + 1
        i += 1
        key = key.replace("-", "_")
        if key.startswith("model."):
            sub = key[len("model."):]
            if sub not in model_types:
                raise ConfigError(f"unknown config key 'model.{sub}'{_suggest(sub, model_types, 'model.')}")
            out.setdefault("model", {})[sub] = _coerce(key, value, model_types[sub])
        else:
            if key not in train_types or key == "model":
                valid = set(train_types) - {"model"}
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, valid)}")
            out[key] = _coerce(key, value, train_types[key])
    return out


def build_config(preset_name: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """A preset (or the defaults) with ``overrides`` applied; model overrides merge into the preset's."""
    base = preset(preset_name) if preset_name else TrainConfig()
    merged = {**base.to_dict(), **overrides}
    merged["model"] = {**base.model, **overrides.get("model", {})}
    return TrainConfig(**merged)
