"""A tiny model and byte-level data for the trainer tests (a few ms per step on a CPU)."""

from __future__ import annotations

import torch

from pyllm.model import Transformer, preset
from pyllm.tokenizer import ByteTokenizer
from pyllm.train import RandomWindows, TrainConfig, Trainer
from pyllm.train.data import builtin_text, fixed_batches, tokenize_documents
from pyllm.train.run import val_loss_fn

TOKENS = tokenize_documents(ByteTokenizer(), [builtin_text()[:20000]])


VAL_BATCHES = fixed_batches(TOKENS[-4000:], 16, 2, 2, seed=0)


def val_eval():
    """eval_fn: validation loss on 2 fixed batches from the tail of the text."""
    return val_loss_fn(VAL_BATCHES)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **{"vocab_size": ByteTokenizer().vocab_size, "n_layer": 2, "n_head": 2,
                                         "d_model": 32, "max_seq_len": 16, **overrides}))


def tiny_config(out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{"seq_len": 16, "batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4,
                          "warmup_steps": 2, "eval_every": 0, "log_every": 1, "progress": False,
                          "out_dir": str(out_dir), "distributed": "none", "device": "cpu", **overrides})


def make_trainer(out_dir, model=None, rank: int = 0, world_size: int = 1, loss_fn=None, eval_fn=None,
                 **overrides) -> Trainer:
    cfg = tiny_config(out_dir, **overrides)
    batches = RandomWindows(TOKENS, cfg.seq_len, cfg.micro_batch(world_size), cfg.seed, rank, world_size)
    return Trainer(model if model is not None else tiny_model(), cfg, batches, loss_fn=loss_fn, eval_fn=eval_fn)


def losses(summary: dict) -> list[float]:
    return [r["loss"] for r in summary["history"]]
