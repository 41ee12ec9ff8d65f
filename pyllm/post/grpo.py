"""GRPO (Shao et al. 2024): PPO's clipped objective without a value model.

Each prompt is sampled ``group_size`` times; a response's advantage is its reward relative to its
group, (r - mean) / std, given to every one of its tokens. The KL to the frozen reference is a loss term
(the k3 estimator, per token) rather than a reward penalty. Rewards are verifiable: the exact-match
checker of the built-in tasks, or a reward model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .losses import grpo_advantages, kl_penalty, ppo_policy_loss, sequence_mean
from .rollout import RLConfig, Rollout, RolloutBatches, heldout_metrics, rl_setup, rollout_seed, sample
from .sequences import response_logprobs
from .stage import (add_lora, data_parallel, export, final_metrics, initial_metrics, micro_batch, run_trainer,
                    write_summary)


@dataclass
class GRPOConfig(RLConfig):
    """GRPO on verifiable tasks."""

    group_size: int = 8
    """Samples per prompt; advantages are relative to the group."""
    scale_rewards: bool = True
    """Divide by the group's std (GRPO); False keeps r - mean (Dr. GRPO)."""
    prompts_per_rollout: int = 64
    """Prompts sampled per rollout (each group_size times)."""
    epochs: int = 2
    """Passes of minibatch updates over each rollout."""
    kl_coef: float = 0.04
    """Weight of the per-token k3 KL to the reference in the loss."""
    out_dir: str = "runs/grpo"
    """Checkpoints, metrics and the final policy (``<out_dir>/final``)."""

    def __post_init__(self):
        super().__post_init__()  # first: the field types (pyllm.typecheck)
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig: group_size={self.group_size} must be >= 2 (advantages are relative)")
        self.check_minibatch()

    def samples_per_prompt(self) -> int:
        return self.group_size

    def stage_defaults(self) -> dict:
        # measured on the 125k-parameter byte model (README): with minibatches of 64 or no warmup the
        # sampled reward first dipped, with lr >= 1e-3 it fell; 500 steps = 125 rollouts of 64 x 8
        return {"lr": 5e-4, "min_lr": 5e-4, "max_steps": 500, "batch_size": 256, "warmup_steps": 30,
                "schedule": "constant"}


def grpo(cfg: GRPOConfig) -> dict:
    """Run GRPO; returns held-out accuracy, mean reward and KL to the reference before/after."""
    policy, reference, tokenizer, template, prompts, heldout, reward_fn = rl_setup(cfg)
    n_prompts = cfg.prompts_per_process(len(prompts))

    @torch.no_grad()
    def make_rollout(round_: int) -> Rollout:
        seed = rollout_seed(cfg.seed, round_)
        rng = random.Random(seed)
        chosen = rng.sample(prompts, n_prompts)
        group = [p for p in chosen for _ in range(cfg.group_size)]  # consecutive groups
        batch, texts = sample(policy, template, group, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=seed)
        rewards = torch.tensor(reward_fn(group, texts), dtype=torch.float32)
        old_logp, mask = response_logprobs(policy, batch["input_ids"], batch["train"], cfg.temperature)
        ref_logp, _ = response_logprobs(reference, batch["input_ids"], batch["train"], cfg.temperature)
        adv = grpo_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards).to(old_logp.device)
        kl = ((old_logp - ref_logp) * mask).sum(1).mean().item()
        return Rollout({**batch, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": adv},
                       {"reward": rewards.mean().item(), "kl": kl})

    def loss_fn(model, batch):
        logp, mask = response_logprobs(model, batch["input_ids"], batch["train"], cfg.temperature)
        adv = batch["advantages"][:, None].expand_as(logp)
        pg, clip_frac, _ = ppo_policy_loss(logp, batch["old_logp"], adv, mask, cfg.clip, per_sequence=True)
        kl = sequence_mean(kl_penalty(logp, batch["ref_logp"], "k3"), mask)
        return pg + cfg.kl_coef * kl, {"clip_frac": clip_frac, "kl_ref": kl.detach(),
                                       "reward": batch["rollout_reward"]}

    info = data_parallel(cfg)

    def measure(m):
        return heldout_metrics(m, reference, template, heldout, reward_fn, cfg.max_new_tokens, cfg.seed,
                               cfg.heldout_samples, info)

    before = initial_metrics(cfg, measure, policy)
    params = add_lora(cfg, policy)
    batches = RolloutBatches(make_rollout, micro_batch(cfg), cfg.epochs, cfg.seed)
    train = run_trainer(cfg, policy, batches, loss_fn, eval_fn=measure)
    after = final_metrics(train)
    summary = {"stage": "grpo", "data": cfg.data, "reward": str(cfg.reward), "group_size": cfg.group_size,
               "rollouts": batches.round, "heldout_prompts": len(heldout), "before": before, "after": after,
               **params, "train": train, "model_dir": export(cfg, policy, tokenizer)}
    return write_summary(cfg, summary)
