"""What every post-training stage shares: the config fields, the start model, the Trainer run, the export.

A stage is ``config dataclass -> function -> summary dict``. The summary holds the held-out metrics
before and after training, the Trainer's own summary (steps, tokens/s, time) and where the model went.
Training goes through ``pyllm.train.Trainer`` with the stage's ``loss_fn``, batch source and
``eval_fn``: precision, clipping, the LR schedule, checkpoints and logging are the Trainer's.

Under ``torchrun`` a stage is data-parallel (DDP): ``train['batch_size']`` is the global batch, each
process draws its own share of it (``RankBatches``; RL: its share of each rollout's prompts), and process
0 alone writes the model and summary. Held-out metrics are shared out too: process r evaluates the items
r, r + world_size, ... (``heldout_share``), and the results come back together in one float64 all-reduce,
as sums and counts (``sum_shares``) or as the per-item values of all items in their order
(``gather_shares``), from which every process computes the metric as one process does. So every process
reports what one process evaluating every item reports, up to rounding (an item's forward pass sits in
another batch); sampled responses draw the random numbers they draw in the batch of all prompts
(``generate``'s ``batch_rows``), so they do not depend on the number of processes either.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyllm.data.jsonl import strict_json
from pyllm.model import Transformer, load_model, save_model
from pyllm.tokenizer import ByteTokenizer, load_tokenizer
from pyllm.train import distributed
from pyllm.train.config import TrainConfig
from pyllm.train.trainer import Trainer, precision_autocast, resolve_device
from pyllm.typecheck import check_fields

from .chat import ChatTemplate
from .datasets import HELDOUT_FRACTION
from .lora import LoRAConfig, apply_lora, merge_lora, trainable_parameters

# A CPU-sized default: a 2-layer, width-64 byte-level model learns the built-in tasks in seconds.
TINY_MODEL = {"n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 128}


@dataclass
class StageConfig:
    """Fields every stage has. ``train`` holds TrainConfig overrides (lr, max_steps, batch_size...)."""

    model: str | None = None
    """Directory of the model to start from (``save_model`` format, tokenizer inside); None: a fresh
    model of ``train['model_preset']`` + ``train['model']`` with the byte tokenizer."""
    data: str = "builtin:tasks"
    """``builtin:<name>`` or a JSONL file."""
    chat_template: str | None = None
    """A Jinja chat-template file replacing the default (see pyllm.post.chat)."""
    seq_len: int = 128
    """Longest example (prompt + response) in tokens; longer ones are errors naming file and line."""
    heldout_fraction: float = HELDOUT_FRACTION
    """Share of prompts held out for evaluation (hash split; never trained on)."""
    max_heldout: int = 300
    """At most this many held-out items are evaluated (the first, in a fixed order)."""
    max_train: int | None = None
    """Use at most this many training items (the first, in a fixed order); None: all."""
    lora_rank: int = 0
    """0: full fine-tuning; r > 0: LoRA adapters of rank r on attention qkv/proj and MLP fc/proj,
    merged into the weights on export."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (update scaled by alpha / rank)."""
    seed: int = 0
    """Seeds data generation, shuffling and sampling."""
    out_dir: str = "runs/post"
    """Checkpoints, metrics.jsonl, summary.json and the final model (``<out_dir>/final``)."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig overrides, e.g. {"lr": 1e-3, "max_steps": 200}; merged over the stage's defaults."""

    def __post_init__(self):
        check_fields(self)
        checks = [
            (self.seq_len > 1, f"seq_len={self.seq_len} must be > 1"),
            (0.0 < self.heldout_fraction < 1.0, f"heldout_fraction={self.heldout_fraction} must be in (0, 1)"),
            (self.max_heldout > 0, f"max_heldout={self.max_heldout} must be positive"),
            (self.max_train is None or self.max_train > 0, f"max_train={self.max_train} must be positive or None"),
            (self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)"),
            (self.model is None or Path(self.model, "config.json").exists(),
             f"model={self.model!r} is not a pyllm model directory (no config.json); give the out_dir/final "
             "of an earlier stage, or None for a fresh model"),
            (self.chat_template is None or Path(self.chat_template).exists(),
             f"chat_template={self.chat_template!r}: file not found"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")
        # validates the overrides now, not after data preparation; FSDP under torchrun is refused here, where
        # every process finds it alike (the command line prints it once), as data_parallel would later
        if self.train_config().distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(_no_fsdp(self))

    def stage_defaults(self) -> dict:
        """TrainConfig values this stage uses unless ``train`` overrides them."""
        return {}

    def train_config(self) -> TrainConfig:
        base = {"seq_len": self.seq_len, "seed": self.seed, "out_dir": self.out_dir, "model": dict(TINY_MODEL),
                "tokenizer": "byte", "weight_decay": 0.0, "warmup_steps": 10, "log_every": 10, "eval_every": 0,
                **self.stage_defaults()}
        merged = {**base, **self.train}
        merged["model"] = {**base["model"], **self.train.get("model", {})}
        return TrainConfig(**merged)


def load_start(cfg: StageConfig) -> tuple[Transformer, Any, ChatTemplate]:
    """(model on the training device, tokenizer, chat template) the stage starts from."""
    tcfg = cfg.train_config()
    # the seed decides everything random from here on: a fresh model, the heads and LoRA adapters the stage
    # adds (a reward model's head is random), dropout; it was set only for a fresh model, so a stage
    # starting from a checkpoint depended on whatever the process had drawn before
    torch.manual_seed(tcfg.seed)
    if cfg.model is None:
        tokenizer = ByteTokenizer()
        model = Transformer(tcfg.model_config(tokenizer.vocab_size))
    else:
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
    if model.cfg.max_seq_len < cfg.seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context ({model.cfg.max_seq_len}); lower seq_len")
    template = ChatTemplate.from_file(tokenizer, cfg.chat_template) if cfg.chat_template else ChatTemplate(tokenizer)
    return model.to(device_of(cfg)), tokenizer, template


def add_lora(cfg: StageConfig, model: Transformer, whole: torch.nn.Module | None = None) -> dict:
    """Apply LoRA to ``model`` when asked; returns the trainable-parameter report of ``whole`` (the model
    with any heads) for the summary."""
    if cfg.lora_rank:
        apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha))
    trainable, total = trainable_parameters(whole if whole is not None else model)
    return {"trainable_params": trainable, "total_params": total, "lora_rank": cfg.lora_rank}


def data_parallel(cfg: StageConfig) -> distributed.DistInfo:
    """This process's rank among torchrun's processes (it joins their group; alone: rank 0 of 1)."""
    info = distributed.setup_for(cfg.train_config().device)
    if info.world_size > 1 and cfg.train_config().distributed == "fsdp":
        raise ValueError(_no_fsdp(cfg))
    return info


def _no_fsdp(cfg: StageConfig) -> str:
    return (f"{type(cfg).__name__}: post-training stages run data-parallel with DDP (train['distributed'] 'auto' "
            "or 'ddp'); FSDP is for pretraining")


def micro_batch(cfg: StageConfig) -> int:
    """Rows (pairs, samples) per forward pass on this process."""
    return cfg.train_config().micro_batch(data_parallel(cfg).world_size)


def mean_over_processes(cfg: StageConfig, value: float) -> float:
    """The mean of ``value`` over the data-parallel processes (itself in one process)."""
    info = data_parallel(cfg)
    if info.world_size == 1:
        return value
    return distributed.all_reduce_(torch.tensor([value], dtype=torch.float64, device=device_of(cfg)), "avg",
                                   info).item()


def heldout_share(items: list, info: distributed.DistInfo) -> list:
    """This process's share of the held-out ``items``: every world_size-th from its rank (all of them in one
    process; none for the last processes when there are fewer items than processes)."""
    return items[info.rank::info.world_size]


def sum_shares(values: list[float], info: distributed.DistInfo, device) -> list[float]:
    """Sums over processes of this process's sums over its ``heldout_share`` (``values`` itself in one
    process), added in float64."""
    if info.world_size == 1:
        return values
    return distributed.all_reduce_(torch.tensor(values, dtype=torch.float64, device=device), "sum", info).tolist()


def gather_shares(columns: list[torch.Tensor], n: int, info: distributed.DistInfo, device) -> list[torch.Tensor]:
    """Per-item values of all ``n`` held-out items, in their order, from every process's values of its
    ``heldout_share`` (each column (n_r,) -> (n,)). One process: the columns themselves, untouched (same
    values, dtype and layout); several: float64, exact (each item's value is added to zeros)."""
    if info.world_size == 1:
        return columns
    full = torch.zeros(len(columns), n, dtype=torch.float64, device=device)
    for row, column in zip(full, columns):
        row[info.rank::info.world_size] = column.to(full)
    return list(distributed.all_reduce_(full, "sum", info).unbind())


def device_of(cfg: StageConfig) -> torch.device:
    return resolve_device(cfg.train_config().device, data_parallel(cfg).local_rank)


def run_trainer(cfg: StageConfig, module: torch.nn.Module, batches, loss_fn, eval_fn=None) -> dict:
    """Train with pyllm's Trainer; returns its summary (steps, tokens/s, history...)."""
    # what makes a checkpoint in out_dir this run's: another stage's (same shapes) must not be resumed
    run = {"stage": type(cfg).__name__.removesuffix("Config").lower(), "model": cfg.model, "data": cfg.data}
    # the stage's own settings, which a resume compares and names when they changed (the TrainConfig's are
    # compared already; run's fields must match); a Python reward function by its name
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "out_dir", *run)}
    settings = json.loads(json.dumps(settings, default=lambda o: getattr(o, "__qualname__", repr(o))))
    return Trainer(module, cfg.train_config(), batches, loss_fn=loss_fn, eval_fn=eval_fn, run=run,
                   settings=settings).fit()


def autocast_of(cfg: StageConfig):
    """The autocast context of the stage's precision, in which the Trainer computes its losses, batches and
    evaluations: what is compared with them (a cached reference, the metrics before training) is computed in it
    too, or a bf16 run would compare its bf16 figures with fp32 ones."""
    return precision_autocast(cfg.train_config().precision, device_of(cfg))


def initial_metrics(cfg: StageConfig, measure, model: torch.nn.Module) -> dict:
    """Held-out metrics before training, measured as the Trainer measures them after it (eval mode, the run's
    autocast), so that before and after differ by the training alone."""
    model.eval()
    with autocast_of(cfg):
        return measure(model)


def final_metrics(train: dict) -> dict:
    """Held-out metrics after training: the Trainer's final evaluation (a run resumed at its last step makes it
    too)."""
    return train["eval"]


def on_main(cfg: StageConfig, write) -> None:
    """``write()`` on process 0 only, then every process waits for it (files the next step may read)."""
    info = data_parallel(cfg)
    if info.is_main:
        write()
    distributed.barrier(info)


def export(cfg: StageConfig, model: Transformer, tokenizer) -> str:
    """Merge LoRA adapters (if any) and write ``<out_dir>/final`` in the inter-stage format."""
    merge_lora(model)  # on every process: their weights stay equal
    directory = Path(cfg.out_dir) / "final"
    on_main(cfg, lambda: save_model(model, directory, tokenizer))
    return str(directory)


def write_summary(cfg: StageConfig, summary: dict) -> dict:
    """Write ``<out_dir>/post_summary.json`` (history excluded; strict JSON) and return the summary."""
    def write():
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "post_summary.json").write_text(json.dumps(
            strict_json({k: v for k, v in summary.items() if k != "history"}), indent=1, default=str))

    on_main(cfg, write)
    return summary
