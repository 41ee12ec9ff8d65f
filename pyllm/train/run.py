"""``train(cfg)``: build the tokenizer, data, model and validation loss from a TrainConfig, train, and
save the final model (pyllm.model.save_model format) under ``<out_dir>/final``."""

from __future__ import annotations

from pathlib import Path

import torch

from pyllm.model import Transformer, save_model
from pyllm.tokenizer import Tokenizer, load_tokenizer

from . import data, distributed
from .config import TrainConfig
from .trainer import Trainer


def build_data(cfg: TrainConfig, rank: int, world_size: int):
    """(tokenizer, training batch source, validation batches) for cfg.data."""
    micro = cfg.micro_batch(world_size)
    if cfg.data != data.BUILTIN and data.is_shard_dir(cfg.data):
        from pyllm.data.loader import ShardLoader

        try:
            tokenizer = load_tokenizer(cfg.data)
            train_src = ShardLoader(cfg.data, cfg.seq_len, micro, cfg.seed, rank=rank, world_size=world_size,
                                    split="train")
            val_src = ShardLoader(cfg.data, cfg.seq_len, micro, cfg.seed, split="val")
        except (ValueError, FileNotFoundError) as e:
            raise data.DataError(str(e)) from None
        return tokenizer, train_src, [val_src.next_batch() for _ in range(cfg.eval_batches)]
    docs = data.read_documents(cfg.data)
    tokenizer = data.build_tokenizer(cfg.tokenizer, docs)
    tokens = data.tokenize_documents(tokenizer, docs)
    source = "built-in text" if cfg.data == data.BUILTIN else cfg.data
    train_tokens, val_tokens = data.split_tokens(tokens, cfg.val_fraction, cfg.seq_len, source)
    train_src = data.RandomWindows(train_tokens, cfg.seq_len, micro, cfg.seed, rank, world_size)
    val_batches = data.fixed_batches(val_tokens, cfg.seq_len, micro, cfg.eval_batches, cfg.seed)
    return tokenizer, train_src, val_batches


def val_loss_fn(val_batches: list[dict]):
    """eval_fn: mean loss over the same validation batches at every call (identical on every rank)."""

    @torch.no_grad()
    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        total = torch.zeros((), device=device)
        for b in val_batches:
            total += model.loss(b["input_ids"].to(device), b["targets"].to(device), doc_ids=b.get("doc_ids")).float()
        return {"val_loss": (total / len(val_batches)).item()}

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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = distributed.setup_for(cfg.device)
    tokenizer, batches, val_batches = build_data(cfg, info.rank, info.world_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config(tokenizer.vocab_size))
    trainer = Trainer(model, cfg, batches, eval_fn=val_loss_fn(val_batches))
    summary = trainer.fit()
    model_dir = Path(cfg.out_dir) / "final"
    export(trainer, model_dir, tokenizer)
    return {**summary, "model_dir": str(model_dir)}
