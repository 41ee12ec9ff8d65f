"""Widths of the real models the GPU sweeps are taken from, the small models the CPU trains, and the
token counts of each suite.

GPT-2 124M/350M (Radford et al. 2019) and Llama-3 1B/8B widths, as in ``pyllm.model`` presets.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyllm import pipeline
from pyllm.model import ModelConfig, preset
from pyllm.train.config import TrainConfig, shakespeare_char_cpu

MODELS = {
    "gpt2-124M": preset("gpt2_small"),
    "gpt2-350M": preset("gpt2_medium"),
    "llama-1B": preset("llama_1b"),
    "llama-8B": preset("llama_8b"),
}

# tokens per batch (B * T): 8 sequences of 1024 on GPU; small enough for a 2-core CPU otherwise
TOKENS = {"short": 64, "cpu": 1024, "gpu": 8192}


@dataclass(frozen=True)
class TrainShape:
    """A small model at the shapes of one of its CPU training steps."""

    tokens: int
    """Tokens of one forward (batch x sequence): the rows every per-token op sees."""
    batch: int
    """Sequences per forward (attention-score rows are batch x heads x sequence)."""
    model: ModelConfig
    """Its widths: d_model, d_ff, n_head, vocab_size."""


def _train_shape(cfg: TrainConfig, vocab_size: int) -> TrainShape:
    return TrainShape(cfg.batch_size * cfg.seq_len, cfg.batch_size, cfg.model_config(vocab_size))


def _pipeline_shape() -> TrainShape:
    p = pipeline.default()
    return _train_shape(TrainConfig(**p.pretrain), p.data["tokenizer"]["vocab_size"])


# The models the CPU actually trains (the "cpu" suite measures these next to the GPT-2/Llama rows):
# nanoGPT's shakespeare-char CPU run (12 x 64 tokens, width 128, MLP 512; the text has 65 distinct
# characters), the default pipeline's pretraining (16 x 128 tokens, width 128, BPE vocabulary 2048), and
# the tiny Llama of bench_train_step (8 x 256 tokens, width 128, SwiGLU MLP 384).
CPU_MODELS = {
    "nanoGPT-cpu": _train_shape(shakespeare_char_cpu(), 65),
    "pipeline": _pipeline_shape(),
    "tiny-llama": TrainShape(8 * 256, 8, preset("tiny_llama")),
}
