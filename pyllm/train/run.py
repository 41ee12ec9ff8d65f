"""``train(cfg)``: build the tokenizer, data, model and validation loss from a TrainConfig, train, and
save the final model (pyllm.model.save_model format) under ``<out_dir>/final``."""

from __future__ import annotations

from pathlib import Path

import torch

from pyllm.model import Transformer, save_model
from pyllm.tokenizer import Tokenizer, load_tokenizer

from . import data, distributed
from .config import ConfigError, TrainConfig
from .trainer import Trainer


def build_data(cfg: TrainConfig, rank: int, world_size: int):
    """(tokenizer, training batch source, validation batches) for cfg.data. The validation set is the first
    ``eval_batches`` x ``batch_size`` sequences of the validation split's seeded stream, in micro-batches:
    the same sequences whatever the micro-batch size and number of processes."""
    micro = cfg.micro_batch(world_size)
    n_val = cfg.eval_batches * cfg.batch_size // micro  # a multiple of world_size (batch_size divides)
    if cfg.data != data.BUILTIN and data.is_shard_dir(cfg.data):
        from pyllm.data.loader import ShardLoader

        try:
            tokenizer = load_tokenizer(cfg.data)
            train_src = ShardLoader(cfg.data, cfg.seq_len, micro, cfg.seed, rank=rank, world_size=world_size,
                                    split="train", vocab_size=tokenizer.vocab_size)
            # one stream on every process, read micro windows at a time (the same windows for any micro)
            val_src = ShardLoader(cfg.data, cfg.seq_len, 1, cfg.seed, split="val", vocab_size=tokenizer.vocab_size)
        except (ValueError, FileNotFoundError) as e:
            raise data.DataError(str(e)) from None
        return tokenizer, train_src, [val_src.windows(val_src.take(micro)) for _ in range(n_val)]
    docs = data.read_documents(cfg.data)
    tokenizer = data.build_tokenizer(cfg.tokenizer, docs)
    tokens = data.tokenize_documents(tokenizer, docs)
    source = "built-in text" if cfg.data == data.BUILTIN else cfg.data
    train_tokens, val_tokens = data.split_tokens(tokens, cfg.val_fraction, cfg.seq_len, source)
    train_src = data.RandomWindows(train_tokens, cfg.seq_len, micro, cfg.seed, rank, world_size)
    val_batches = data.fixed_batches(val_tokens, cfg.seq_len, micro, n_val, cfg.seed)
    return tokenizer, train_src, val_batches


VAL_METRICS = ("val_loss",)  # what val_loss_fn's evaluation returns


def val_loss_fn(val_batches: list[dict], rank: int = 0, world_size: int = 1):
    """eval_fn: mean loss over the same validation batches (of equal size) at every call. With several
    processes each evaluates every ``world_size``-th batch and the sums are all-reduced (every process calls
    the model equally often when ``world_size`` divides the count, as FSDP needs)."""
    if len(val_batches) % world_size:
        raise ValueError(f"{len(val_batches)} validation batches do not split evenly over {world_size} processes")

    @torch.no_grad()
    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        total = torch.zeros((), device=device)
        for b in val_batches[rank::world_size]:
            total += model.loss(b["input_ids"].to(device), b["targets"].to(device), doc_ids=b.get("doc_ids")).float()
        distributed.all_reduce_(total, "sum", distributed.DistInfo(rank, world_size))
        return {VAL_METRICS[0]: (total / len(val_batches)).item()}

    return evaluate


def export(trainer: Trainer, directory: Path, tokenizer: Tokenizer | None) -> None:
    """Write the trained model (unsharded) with save_model from rank 0."""
    full = trainer.full_state_dict()
    if trainer.dist.is_main:
        model = Transformer(trainer.model.cfg)
        model.load_state_dict({k: v.cpu() for k, v in full.items()}, strict=False)
        save_model(model.to(next(iter(full.values())).dtype), directory, tokenizer)
    distributed.barrier(trainer.dist)


def train(cfg: TrainConfig) -> dict:
    """Train a model as ``cfg`` says; returns the Trainer's summary plus ``model_dir``."""
    if cfg.best_metric not in VAL_METRICS:  # found now, not at the first evaluation
        raise ConfigError(f"TrainConfig: best_metric={cfg.best_metric!r} is not a metric train() evaluates; "
                          f"use one of {', '.join(VAL_METRICS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = distributed.setup_for(cfg.device)
    tokenizer, batches, val_batches = build_data(cfg, info.rank, info.world_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config(tokenizer.vocab_size))
    trainer = Trainer(model, cfg, batches, eval_fn=val_loss_fn(val_batches, info.rank, info.world_size))
    summary = trainer.fit()
    model_dir = Path(cfg.out_dir) / "final"
    export(trainer, model_dir, tokenizer)
    return {**summary, "model_dir": str(model_dir)}
