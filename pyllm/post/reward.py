"""Reward model: a scalar head on the transformer trained with the Bradley-Terry loss on preference pairs.

Each batch holds B pairs as 2B right-padded rows (chosen first, then rejected); the score of a row is the
head's output at its last token. Held-out metric: pairwise accuracy (share of pairs with
r(chosen) > r(rejected)) and the mean margin r(chosen) - r(rejected).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets import BUILTIN_PAIRS, Example, Pair, load_pairs, resolve, split
from .heads import RewardModel
from .judge import DEFAULT_PRINCIPLE, judge_from_spec, relabel
from .lora import merge_lora
from .losses import bradley_terry_loss
from .packing import RankBatches, encode_examples
from .sequences import collate
from .stage import (StageConfig, add_lora, data_parallel, device_of, final_metrics, gather_shares, heldout_share,
                    initial_metrics, load_start, micro_batch, on_main, run_trainer, write_summary)


@dataclass
class RewardConfig(StageConfig):
    """Reward-model training. ``data``: builtin:tasks|docstrings or a JSONL of {prompt, chosen, rejected}."""

    margin: float = 0.0
    """Bradley-Terry margin: the loss asks r(chosen) - r(rejected) to exceed it (0: plain BT)."""
    judge: str | None = None
    """Relabel the training pairs with a judge: "rule" (the built-in task checker), "py:module:function"
    (a Python rule f(prompt, response) -> score), "rm:<dir>" (a reward model) or "model:<dir>" (a pyllm
    model asked ``judge_principle``); None: keep the labels."""
    judge_principle: str = DEFAULT_PRINCIPLE
    """The principle a "model:" judge is asked to apply."""
    out_dir: str = "runs/rm"
    """Checkpoints, metrics and the final reward model (``<out_dir>/final``)."""

    def stage_defaults(self) -> dict:
        return {"lr": 1e-3, "min_lr": 1e-4, "max_steps": 200, "batch_size": 16}


class PairBatches(RankBatches):
    """Shuffled, resumable pair batches, split over data-parallel ranks: {"input_ids" (2B, L), "train",
    "attention"}: chosen rows, then rejected; "index" (B,): the pairs' ids."""

    def __init__(self, chosen, rejected, batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.chosen, self.rejected, self.pad_id = chosen, rejected, pad_id
        super().__init__(len(chosen), batch_size, seed, 7919, rank, world_size)

    def collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        b = collate([self.chosen[i] for i in ids] + [self.rejected[i] for i in ids], self.pad_id)
        return {"input_ids": b["tokens"], "train": b["train"], "attention": b["attention"], "index": torch.tensor(ids)}


def encode_pairs(template, pairs: list[Pair], seq_len: int):
    """(chosen Encoded list, rejected Encoded list); errors name the pair's file and line."""
    chosen = encode_examples(template, [Example(p.prompt, p.chosen, origin=p.origin) for p in pairs], seq_len)
    rejected = encode_examples(template, [Example(p.prompt, p.rejected, origin=p.origin) for p in pairs], seq_len)
    return chosen, rejected


def load_preferences(cfg: StageConfig, template, device, judge_spec: str | None):
    """(train pairs, held-out pairs, judge report) from cfg.data, relabelled by the judge when given."""
    pairs = resolve(cfg.data, BUILTIN_PAIRS, load_pairs, cfg.seed)
    train_pairs, heldout_pairs = split(pairs, cfg.heldout_fraction)
    if not train_pairs or not heldout_pairs:
        raise ValueError(f"{type(cfg).__name__}: data {cfg.data!r} gives {len(train_pairs)} training and "
                         f"{len(heldout_pairs)} held-out pairs; both must be non-empty")
    train_pairs = train_pairs[:cfg.max_train]
    heldout_pairs = heldout_pairs[:cfg.max_heldout]
    report = {}
    if judge_spec:
        # only the training pairs are relabelled; held-out pairs keep their reference labels, and the
        # judge's agreement on them (pairs no stage trains on) is reported too
        with torch.no_grad():
            judge = judge_from_spec(judge_spec, template, cfg.seq_len, device, cfg.judge_principle)
            train_pairs, report = relabel(judge, train_pairs)
            report["judge_heldout_agreement"] = relabel(judge, heldout_pairs)[1]["judge_agreement"]
        report["judge"] = judge_spec
    return train_pairs, heldout_pairs, report


@torch.no_grad()
def pairwise_margins(rm: RewardModel, chosen, rejected, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """r(chosen) - r(rejected) of each pair (N,)."""
    device = rm.head.proj.weight.device
    margins = []
    for s in range(0, len(chosen), batch_size):
        c = collate(chosen[s:s + batch_size], pad_id, device)
        r = collate(rejected[s:s + batch_size], pad_id, device)
        margins.append(rm(c["tokens"], c["attention"]) - rm(r["tokens"], r["attention"]))
    return torch.cat(margins) if margins else torch.zeros(0, device=device)


def pairwise_metrics(margins: torch.Tensor) -> dict:
    """Pairwise accuracy (share of pairs ranked right) and mean margin from the margins of all pairs."""
    return {"pairwise_accuracy": (margins > 0).float().mean().item(), "margin": margins.mean().item()}


def train_reward_model(cfg: RewardConfig) -> dict:
    """Train a reward model; returns held-out pairwise accuracy before/after and the model path."""
    body, tokenizer, template = load_start(cfg)
    rm = RewardModel(body).to(device_of(cfg))
    train_pairs, heldout_pairs, judge_report = load_preferences(cfg, template, device_of(cfg), cfg.judge)
    chosen, rejected = encode_pairs(template, train_pairs, cfg.seq_len)
    h_chosen, h_rejected = encode_pairs(template, heldout_pairs, cfg.seq_len)
    info = data_parallel(cfg)
    batches = PairBatches(chosen, rejected, micro_batch(cfg), tokenizer.pad_id, cfg.seed, info.rank, info.world_size)
    margin = cfg.margin or None

    def loss_fn(model: RewardModel, batch):
        scores = model(batch["input_ids"], batch["attention"])  # (2B,)
        B = scores.shape[0] // 2
        loss, correct = bradley_terry_loss(scores[:B], scores[B:], margin)
        return loss.mean(), {"accuracy": correct.float().mean()}

    mine = heldout_share(h_chosen, info), heldout_share(h_rejected, info)  # the held-out pairs this process scores
    device = device_of(cfg)

    def measure(m):
        margins = pairwise_margins(m, *mine, tokenizer.pad_id)
        return pairwise_metrics(*gather_shares([margins], len(h_chosen), info, device))

    before = initial_metrics(cfg, measure, rm)
    params = add_lora(cfg, rm.body, rm)
    train = run_trainer(cfg, rm, batches, loss_fn, eval_fn=measure)
    after = final_metrics(train)
    merge_lora(rm.body)
    model_dir = Path(cfg.out_dir) / "final"
    on_main(cfg, lambda: rm.save(model_dir, tokenizer))
    summary = {"stage": "rm", "data": cfg.data, "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs),
               "before": before, "after": after, **judge_report, **params, "train": train, "model_dir": str(model_dir)}
    return write_summary(cfg, summary)
