"""Supervised fine-tuning: chat-formatted examples, loss on the assistant's tokens only, packed rows.

Examples are rendered by the chat template, packed several to a row with ``doc_ids`` and restarted
``positions`` (see packing.py) and trained with the Trainer. Held-out examples measure the completion
loss (nats per assistant token) and the exact-match rate of greedy answers, before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import BUILTIN_EXAMPLES, Example, load_examples, resolve, split
from .packing import PackedBatches, encode_examples, pack
from .sequences import completion_loss, exact_match_rate
from .stage import StageConfig, add_lora, export, final_metrics, load_start, run_trainer, write_summary


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning. ``data``: builtin:tasks|add|sort|reverse|docstrings or a JSONL file of
    {"prompt", "completion"} or {"messages": [...]} rows."""

    max_new_tokens: int = 8
    """Tokens generated per held-out prompt for exact match."""
    out_dir: str = "runs/sft"
    """Checkpoints, metrics and the final model (``<out_dir>/final``)."""

    def stage_defaults(self) -> dict:
        return {"lr": 3e-3, "min_lr": 3e-4, "max_steps": 300, "batch_size": 16}


def sft_loss(model, batch):
    """Mean cross-entropy over trained (assistant) tokens of packed rows."""
    loss = model.loss(batch["input_ids"], batch["targets"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    return loss, {}


def sft(cfg: SFTConfig) -> dict:
    """Run SFT; returns held-out completion loss and exact match before/after, and the model path."""
    model, tokenizer, template = load_start(cfg)
    items = resolve(cfg.data, BUILTIN_EXAMPLES, load_examples, cfg.seed)
    train_items, heldout_items = split(items, cfg.heldout_fraction)
    if not train_items or not heldout_items:
        raise ValueError(f"SFTConfig: data {cfg.data!r} gives {len(train_items)} training and "
                         f"{len(heldout_items)} held-out examples; both must be non-empty")
    train_items, heldout_items = train_items[:cfg.max_train], heldout_items[:cfg.max_heldout]
    train_enc = encode_examples(template, train_items, cfg.seq_len)
    heldout_enc = encode_examples(template, heldout_items, cfg.seq_len)
    rows = pack(train_enc, cfg.seq_len, tokenizer.pad_id)
    batches = PackedBatches(rows, cfg.train_config().micro_batch(), seed=cfg.seed)
    qa = [e for e in heldout_items if isinstance(e, Example)]  # single-turn items have a reference answer

    def measure(m) -> dict:
        return {"completion_loss": completion_loss(m, heldout_enc, tokenizer.pad_id),
                "exact_match": exact_match_rate(m, template, qa, cfg.max_new_tokens)}

    model.eval()
    before = measure(model)
    params = add_lora(cfg, model)
    train = run_trainer(cfg, model, batches, sft_loss, eval_fn=measure)
    after = final_metrics(train, measure, model)
    summary = {"stage": "sft", "data": cfg.data, "train_examples": len(train_items), "heldout_examples": len(heldout_items),
               "packed_rows": int(rows["input_ids"].shape[0]), "before": before, "after": after, **params,
               "train": train, "model_dir": export(cfg, model, tokenizer)}
    return write_summary(cfg, summary)
