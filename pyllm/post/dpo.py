"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge / length-normalised forms.

The reference is the starting policy. With ``precompute_ref`` its sequence log-probs for every pair are
computed once before training and looked up by pair index, so no second model is held in memory;
otherwise a frozen copy runs beside the policy. Held-out metrics: implicit-reward accuracy (share of
pairs with beta * log-ratio higher for chosen), the mean chosen-minus-rejected implicit-reward margin,
and the policy's own preference accuracy (higher per-token log-prob for the chosen response).

``sft_coef`` adds the chosen responses' per-token negative log-likelihood to the loss (DPO + NLL, the
"RPO" of Pang et al. 2024): the DPO loss alone can lower the chosen answers' likelihood along with the
rejected ones' (only their difference matters to it), which shows up as lower greedy task accuracy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .judge import DEFAULT_PRINCIPLE
from .lora import BaseModelView
from .losses import DPO_VARIANTS, dpo_loss
from .reward import PairBatches, encode_pairs, load_preferences
from .sequences import collate, response_logprobs, sequence_logprob
from .stage import (StageConfig, add_lora, autocast_of, data_parallel, device_of, export, final_metrics, gather_shares,
                    heldout_share, initial_metrics, load_start, micro_batch, run_trainer, write_summary)


@dataclass
class DPOConfig(StageConfig):
    """DPO on preference pairs. ``data``: builtin:tasks|docstrings or a JSONL of {prompt, chosen, rejected}."""

    beta: float = 0.1
    """Strength of the implicit KL constraint (the reward scale)."""
    variant: str = "sigmoid"
    """"sigmoid" (DPO), "ipo" (squared loss to 1 / (2 beta)) or "hinge" (SLiC)."""
    length_normalize: bool = False
    """Use per-token mean log-probs instead of sums (length-normalised DPO; IPO's usual form)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a label is flipped (sigmoid variant)."""
    sft_coef: float = 0.0
    """Weight of the chosen responses' per-token NLL added to the loss (0: plain DPO)."""
    precompute_ref: bool = True
    """Compute the reference log-probs once and cache them instead of keeping a reference model."""
    judge: str | None = None
    """Relabel the training pairs first: "rule", "py:module:function", "rm:<dir>" or "model:<dir>"
    (see RewardConfig.judge)."""
    judge_principle: str = DEFAULT_PRINCIPLE
    """The principle a "model:" judge is asked to apply."""
    out_dir: str = "runs/dpo"
    """Checkpoints, metrics and the final policy (``<out_dir>/final``)."""

    def __post_init__(self):
        super().__post_init__()  # first: the field types (pyllm.typecheck)
        if self.variant not in DPO_VARIANTS:
            raise ValueError(f"DPOConfig: variant={self.variant!r}; use one of {DPO_VARIANTS}")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig: beta={self.beta} must be positive")
        if self.sft_coef < 0:
            raise ValueError(f"DPOConfig: sft_coef={self.sft_coef} must be >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig: label_smoothing={self.label_smoothing} must be in [0, 0.5)")

    def stage_defaults(self) -> dict:
        return {"lr": 5e-4, "min_lr": 5e-5, "max_steps": 100, "batch_size": 16}


def _pair_logprobs(model, tokens, train, length_normalize):
    """Sequence log-probs of 2B rows (chosen then rejected) -> (chosen (B,), rejected (B,))."""
    logp, mask = response_logprobs(model, tokens, train)
    seq = sequence_logprob(logp, mask, length_normalize)
    B = seq.shape[0] // 2
    return seq[:B], seq[B:]


@torch.no_grad()
def reference_logprobs(model, chosen, rejected, pad_id, length_normalize, batch_size: int = 64):
    """Cached reference: (chosen (N,), rejected (N,)) sequence log-probs of every pair, in order."""
    device = model.head_weight.device
    out_c, out_r = [torch.zeros(0, device=device)], [torch.zeros(0, device=device)]  # (none for no pairs)
    for s in range(0, len(chosen), batch_size):
        b = collate(chosen[s:s + batch_size] + rejected[s:s + batch_size], pad_id, device)
        c, r = _pair_logprobs(model, b["tokens"], b["train"], length_normalize)
        out_c.append(c)
        out_r.append(r)
    return torch.cat(out_c), torch.cat(out_r)


@torch.no_grad()
def preference_values(model, chosen, rejected, ref_c, ref_r, pad_id, beta, length_normalize) -> list[torch.Tensor]:
    """Per pair (N,) each: the implicit-reward margin, 1 where the chosen response's implicit reward is the
    higher, 1 where the policy gives the chosen response the higher log-prob per token."""
    pol_c, pol_r = reference_logprobs(model, chosen, rejected, pad_id, length_normalize)
    reward_c, reward_r = beta * (pol_c - ref_c.to(pol_c.device)), beta * (pol_r - ref_r.to(pol_r.device))
    # the policy's own preference is judged per token so that length does not decide it
    mean_c, mean_r = reference_logprobs(model, chosen, rejected, pad_id, True)
    return [reward_c - reward_r, (reward_c > reward_r).float(), (mean_c > mean_r).float()]


def preference_metrics(margin, reward_win, logp_win) -> dict:
    """Held-out DPO metrics from the ``preference_values`` of all pairs."""
    return {"reward_accuracy": reward_win.float().mean().item(), "reward_margin": margin.mean().item(),
            "logp_accuracy": logp_win.float().mean().item()}


def dpo_objective(cfg: DPOConfig, logp, mask, ref_c, ref_r):
    """The training loss from the policy's token log-probs ``logp``/``mask`` (2B, L-1) of B chosen rows
    then B rejected rows, and the reference's sequence log-probs (B,) each -> (loss, metrics)."""
    pol_c, pol_r = sequence_logprob(logp, mask, cfg.length_normalize).chunk(2)
    loss, reward_c, reward_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=cfg.beta, variant=cfg.variant,
                                        label_smoothing=cfg.label_smoothing)
    metrics = {"reward_accuracy": (reward_c > reward_r).float().mean(), "reward_margin": (reward_c - reward_r).mean()}
    loss = loss.mean()
    if cfg.sft_coef:  # per-token NLL of the chosen rows: keeps their likelihood up while the margin grows
        B = pol_c.shape[0]
        nll = -sequence_logprob(logp[:B], mask[:B], length_normalize=True).mean()
        loss, metrics["chosen_nll"] = loss + cfg.sft_coef * nll, nll.detach()
    return loss, metrics


def dpo(cfg: DPOConfig) -> dict:
    """Run DPO; returns held-out implicit-reward accuracy and margin before/after, and the model path."""
    policy, tokenizer, template = load_start(cfg)
    device = device_of(cfg)
    policy.eval()
    train_pairs, heldout_pairs, judge_report = load_preferences(cfg, template, device, cfg.judge)
    chosen, rejected = encode_pairs(template, train_pairs, cfg.seq_len)
    h_chosen, h_rejected = encode_pairs(template, heldout_pairs, cfg.seq_len)
    pad = tokenizer.pad_id
    info = data_parallel(cfg)
    mine = heldout_share(h_chosen, info), heldout_share(h_rejected, info)  # the held-out pairs this process scores
    with autocast_of(cfg):  # in the precision the policy's log-probs are computed in during training
        h_ref = reference_logprobs(policy, *mine, pad, cfg.length_normalize)
        cached = reference_logprobs(policy, chosen, rejected, pad, cfg.length_normalize) if cfg.precompute_ref else None
    if cfg.precompute_ref:
        reference = None
    else:
        reference = BaseModelView(policy) if cfg.lora_rank else copy.deepcopy(policy).requires_grad_(False)

    def loss_fn(model, batch):
        logp, mask = response_logprobs(model, batch["input_ids"], batch["train"])  # (2B, L-1), chosen first
        if reference is None:
            idx = batch["index"].to(cached[0].device)
            ref_c, ref_r = cached[0][idx].to(logp.device), cached[1][idx].to(logp.device)
        else:
            with torch.no_grad():
                ref_c, ref_r = _pair_logprobs(reference, batch["input_ids"], batch["train"], cfg.length_normalize)
        return dpo_objective(cfg, logp, mask, ref_c, ref_r)

    def measure(m):
        values = preference_values(m, *mine, *h_ref, pad, cfg.beta, cfg.length_normalize)
        return preference_metrics(*gather_shares(values, len(h_chosen), info, device))

    before = initial_metrics(cfg, measure, policy)
    params = add_lora(cfg, policy)
    batches = PairBatches(chosen, rejected, micro_batch(cfg), pad, cfg.seed, info.rank, info.world_size)
    train = run_trainer(cfg, policy, batches, loss_fn, eval_fn=measure)
    after = final_metrics(train)
    summary = {"stage": "dpo", "data": cfg.data, "variant": cfg.variant, "beta": cfg.beta,
               "length_normalize": cfg.length_normalize, "sft_coef": cfg.sft_coef,
               "precompute_ref": cfg.precompute_ref,
               "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs), "before": before, "after": after,
               **judge_report, **params, "train": train, "model_dir": export(cfg, policy, tokenizer)}
    return write_summary(cfg, summary)
