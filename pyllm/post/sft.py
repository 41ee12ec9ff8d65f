"""Supervised fine-tuning: chat-formatted examples, loss on the assistant's tokens only, packed rows.

Examples are rendered by the chat template, packed several to a row with ``doc_ids`` and restarted
``positions`` (see packing.py) and trained with the Trainer. Held-out examples measure the completion
loss (nats per assistant token) and the exact-match rate of greedy answers, before and after.

Replay (``pretrain_mix``): a small model fine-tuned for many steps on short task answers forgets the
text it was pretrained on (its bits/byte on held-out text can quadruple). Mixing windows of the
pretraining shards into every batch, with their language-model loss weighted by the same share, keeps
it close to the pretrained model on text while it learns the tasks (the "pretraining mix" of
InstructGPT, Ouyang et al. 2022, used there in PPO; here in SFT).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pyllm.train.run import val_loss_fn

from .datasets import BUILTIN_EXAMPLES, Example, load_examples, resolve, split
from .packing import PackedBatches, ReplayBatches, encode_examples, pack
from .sequences import completion_nll, exact_matches
from .stage import (StageConfig, add_lora, data_parallel, device_of, export, final_metrics, heldout_share,
                    initial_metrics, load_start, micro_batch, run_trainer, sum_shares, write_summary)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning. ``data``: builtin:tasks|noisy_tasks|add|sort|reverse|docstrings|judge_tasks or a
    JSONL file of {"prompt", "completion"} or {"messages": [...]} rows."""

    max_new_tokens: int = 8
    """Tokens generated per held-out prompt for exact match."""
    pretrain_mix: float = 0.0
    """Share of each optimiser step's rows that are windows of pretraining text (replay; rounded, whatever
    the micro-batch size and number of processes), and the weight of their language-model loss in the
    total: loss = (1 - mix) * SFT loss + mix * replay loss. 0 disables."""
    pretrain_data: str | None = None
    """The pretraining shard directory (``pyllm data`` output, tokenized with the model's tokenizer):
    its training split is replayed when ``pretrain_mix`` > 0; its validation split gives the held-out
    ``text_loss`` metric whenever it is set."""
    out_dir: str = "runs/sft"
    """Checkpoints, metrics and the final model (``<out_dir>/final``)."""

    def __post_init__(self):
        super().__post_init__()  # first: the field types (pyllm.typecheck)
        from pyllm.train.data import is_shard_dir

        if not 0.0 <= self.pretrain_mix < 1.0:
            raise ValueError(f"SFTConfig: pretrain_mix={self.pretrain_mix} must be in [0, 1)")
        if self.pretrain_mix > 0 and self.pretrain_data is None:
            raise ValueError(f"SFTConfig: pretrain_mix={self.pretrain_mix} needs pretrain_data (a shard directory)")
        if self.pretrain_data is not None and not is_shard_dir(self.pretrain_data):
            raise ValueError(f"SFTConfig: pretrain_data={self.pretrain_data!r} is not a shard directory "
                             "(no manifest.json); give the data stage's shards/")

    def replay_rows(self) -> int:
        """Rows of pretraining text in each optimiser step (the rest are packed SFT rows); how they are shared
        out over micro-batches and processes: pyllm.post.packing.ReplayBatches."""
        rows = self.train_config().batch_size
        n = round(self.pretrain_mix * rows)
        if self.pretrain_mix > 0 and not 1 <= n < rows:
            raise ValueError(f"SFTConfig: pretrain_mix={self.pretrain_mix} of a batch of {rows} rows gives "
                             f"{n} replay rows; it must leave at least one row of each kind")
        return n

    def stage_defaults(self) -> dict:
        return {"lr": 3e-3, "min_lr": 3e-4, "max_steps": 300, "batch_size": 16}


def sft_loss(model, batch):
    """Mean cross-entropy over trained (assistant) tokens of packed rows."""
    loss = model.loss(batch["input_ids"], batch["targets"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    return loss, {}


def replay_loss(mix: float):
    """(1 - mix) * SFT loss of the packed rows + mix * next-token loss of the replayed text rows (the last
    ``replay_rows``), each mean weighed by ``part_weights`` (ReplayBatches: the step's loss is then the
    same however it is split; a part the micro-batch lacks weighs 0); both parts are logged (``sft_loss``,
    ``replay_loss``)."""

    def loss_fn(model, batch):
        def part(lo: int, hi: int, weight):
            if lo == hi:  # a micro-batch without rows of this kind
                return weight.new_zeros(())
            return weight * model.loss(batch["input_ids"][lo:hi], batch["targets"][lo:hi],
                                       positions=batch["positions"][lo:hi], doc_ids=batch["doc_ids"][lo:hi])

        rows, weights = batch["input_ids"].shape[0], batch["part_weights"]
        first = rows - batch["replay_rows"]  # the packed rows come first
        sft_part, text_part = part(0, first, weights[0]), part(first, rows, weights[1])
        metrics = {"sft_loss": sft_part.detach(), "replay_loss": text_part.detach()}
        return (1 - mix) * sft_part + mix * text_part, metrics

    return loss_fn


def _text_replay(cfg: SFTConfig, tokenizer_dir: str | None):
    """The ShardLoader of replayed pretraining windows; the shards must use the model's tokenizer. One
    stream on every process, of batch size 1: ReplayBatches shares its windows out."""
    from pyllm.data.loader import ShardLoader

    cfg.replay_rows()  # a share that leaves rows of both kinds, checked before anything is read
    loader = ShardLoader(cfg.pretrain_data, cfg.seq_len, 1, seed=cfg.seed)
    ours = Path(tokenizer_dir, "tokenizer.json") if tokenizer_dir else None
    if ours is None or not ours.exists() or \
            hashlib.sha256(ours.read_bytes()).hexdigest() != loader.manifest.get("tokenizer_sha256"):
        raise ValueError(f"SFTConfig: pretrain_data={cfg.pretrain_data!r} was tokenized with another tokenizer than "
                         f"the model's ({cfg.model!r}); replay the shards the model was pretrained on")
    return loader


def _text_val_batches(cfg: SFTConfig, n_batches: int = 4, batch_size: int = 16) -> list[dict]:
    """Fixed windows of the shards' validation split (the same at every evaluation)."""
    from pyllm.data.loader import ShardLoader

    loader = ShardLoader(cfg.pretrain_data, cfg.seq_len, batch_size, seed=cfg.seed, split="val")
    return [loader.next_batch() for _ in range(min(n_batches, loader.steps_per_epoch))]



def sft(cfg: SFTConfig) -> dict:
    """Run SFT; returns held-out completion loss and exact match before/after, and the model path."""
    model, tokenizer, template = load_start(cfg)
    text = _text_replay(cfg, cfg.model) if cfg.pretrain_mix else None  # checked before the data is prepared
    items = resolve(cfg.data, BUILTIN_EXAMPLES, load_examples, cfg.seed)
    train_items, heldout_items = split(items, cfg.heldout_fraction)
    if not train_items or not heldout_items:
        raise ValueError(f"SFTConfig: data {cfg.data!r} gives {len(train_items)} training and "
                         f"{len(heldout_items)} held-out examples; both must be non-empty")
    train_items, heldout_items = train_items[:cfg.max_train], heldout_items[:cfg.max_heldout]
    train_enc = encode_examples(template, train_items, cfg.seq_len)
    heldout_enc = encode_examples(template, heldout_items, cfg.seq_len)
    rows = pack(train_enc, cfg.seq_len, tokenizer.pad_id)
    info = data_parallel(cfg)
    n_replay = cfg.replay_rows()
    batches = PackedBatches(rows, micro_batch(cfg), cfg.seed, info.rank, info.world_size)
    loss_fn = sft_loss
    if text is not None:
        batches = ReplayBatches(batches, text, n_replay, cfg.train_config().batch_size)
        loss_fn = replay_loss(cfg.pretrain_mix)
    qa = [e for e in heldout_items if isinstance(e, Example)]  # single-turn items have a reference answer
    text_val_loss = None
    if cfg.pretrain_data:  # its batches are shared out when they split evenly over the processes
        text_batches = _text_val_batches(cfg)
        split_evenly = len(text_batches) % info.world_size == 0
        text_val_loss = val_loss_fn(text_batches, *((info.rank, info.world_size) if split_evenly else (0, 1)))
    # this process's share of the held-out examples; summed token losses, token and match counts are added
    my_enc, my_qa, device = heldout_share(heldout_enc, info), heldout_share(qa, info), device_of(cfg)

    def measure(m) -> dict:
        nll, tokens = completion_nll(m, my_enc, tokenizer.pad_id)
        matches = exact_matches(m, template, my_qa, cfg.max_new_tokens)
        nll, tokens, matches = sum_shares([nll, tokens, float(matches)], info, device)
        out = {"completion_loss": nll / max(tokens, 1.0)}
        if qa:  # chat-only data has no reference answers: no exact match (not a NaN in the JSON files)
            out["exact_match"] = matches / len(qa)
        if text_val_loss:  # what replay protects: next-token loss on held-out pretraining text
            out["text_loss"] = text_val_loss(m)["val_loss"]
        return out

    before = initial_metrics(cfg, measure, model)
    params = add_lora(cfg, model)
    train = run_trainer(cfg, model, batches, loss_fn, eval_fn=measure)
    after = final_metrics(train)
    summary = {"stage": "sft", "data": cfg.data, "train_examples": len(train_items),
               "heldout_examples": len(heldout_items), "packed_rows": int(rows["input_ids"].shape[0]),
               "pretrain_mix": cfg.pretrain_mix, "replay_rows": n_replay, "before": before, "after": after,
               **params, "train": train, "model_dir": export(cfg, model, tokenizer)}
    return write_summary(cfg, summary)
