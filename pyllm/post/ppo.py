"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), on pyllm's Trainer.

Per rollout: sample responses (KV cache, batched), score them (reward model or Python function),
optionally whiten the scores, build per-token rewards = -kl_coef * (log pi - log ref) on every response
token plus the score on the last one, estimate advantages with GAE from the value head, whiten the
advantages. Per minibatch: clipped policy loss + vf_coef * clipped value loss. After each rollout the
adaptive controller moves kl_coef toward ``kl_target``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .heads import PolicyWithValue
from .losses import AdaptiveKLController, gae, masked_whiten, ppo_policy_loss, ppo_value_loss, token_logprobs
from .rollout import RLConfig, Rollout, RolloutBatches, heldout_metrics, rl_setup, rollout_seed, sample
from .sequences import response_logprobs
from .stage import (add_lora, data_parallel, export, final_metrics, initial_metrics, mean_over_processes, micro_batch,
                    run_trainer, write_summary)


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value head, a frozen reference and an adaptive KL penalty."""

    value_clip: float = 0.2
    """Clip range of the value update around the rollout's values."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    kl_target: float | None = 1.0
    """Target KL per response for the adaptive controller; None keeps kl_coef fixed."""
    kl_horizon: int = 2000
    """Controller horizon in samples (Ziegler et al.)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    shared_value_trunk: bool = False
    """True: the value loss also trains the transformer (one shared trunk); False: the value head reads
    detached hidden states. Shared, PPO against a reward model with kl_coef 3 diverged: the value loss grew
    with the KL-penalised returns (3 -> 1800) and swamped the clipped gradient (README)."""
    whiten_rewards: bool = True
    """Normalise each rollout's scores to unit variance (mean kept) before the KL penalty is added."""
    prompts_per_rollout: int = 256
    """Prompts sampled per rollout (one response each)."""
    out_dir: str = "runs/ppo"
    """Checkpoints, metrics and the final policy (``<out_dir>/final``)."""

    def __post_init__(self):
        super().__post_init__()  # first: the field types (pyllm.typecheck)
        checks = [(self.kl_target is None or self.kl_target > 0,
                   f"kl_target={self.kl_target} must be positive (or None: a fixed kl_coef)"),
                  (self.kl_horizon > 0, f"kl_horizon={self.kl_horizon} must be positive"),
                  (self.value_clip > 0, f"value_clip={self.value_clip} must be positive"),
                  (self.vf_coef >= 0, f"vf_coef={self.vf_coef} must be >= 0"),
                  (0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
                   f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"PPOConfig: {msg}")
        self.check_minibatch()

    def stage_defaults(self) -> dict:
        # measured (README): 2 epochs of minibatches of 128 over rollouts of 256, with a warmup
        return {"lr": 5e-4, "min_lr": 5e-4, "max_steps": 300, "batch_size": 128, "warmup_steps": 20,
                "schedule": "constant"}


def _forward(model: PolicyWithValue, tokens, temperature: float = 1.0):
    """-> (logp (N, L-1) of tokens[:, 1:] under softmax(logits / temperature), the sampling
    distribution; values (N, L-1) of the states before them)."""
    logits, values = model(tokens[:, :-1])
    return token_logprobs(logits.float() / temperature, tokens[:, 1:]), values


def ppo(cfg: PPOConfig) -> dict:
    """Run PPO; returns held-out accuracy, mean reward and KL to the reference before/after."""
    policy, reference, tokenizer, template, prompts, heldout, reward_fn = rl_setup(cfg)
    n_prompts = cfg.prompts_per_process(len(prompts))
    info = data_parallel(cfg)
    model = PolicyWithValue(policy, cfg.shared_value_trunk).to(policy.head_weight.device)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    @torch.no_grad()
    def make_rollout(round_: int) -> Rollout:
        seed = rollout_seed(cfg.seed, round_)
        rng = random.Random(seed)
        chosen = rng.sample(prompts, n_prompts)
        batch, texts = sample(policy, template, chosen, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=seed)
        scores = torch.tensor(reward_fn(chosen, texts), dtype=torch.float32)
        old_logp, values = _forward(model, batch["input_ids"], cfg.temperature)
        mask = batch["train"][:, 1:]
        ref_logp, _ = response_logprobs(reference, batch["input_ids"], batch["train"], cfg.temperature)
        kl = (old_logp - ref_logp) * mask  # (N, L-1) per-token k1
        s = scores.to(kl.device)
        if cfg.whiten_rewards and len(chosen) > 1:
            s = masked_whiten(s, torch.ones_like(s), shift_mean=False)
        rewards = -kl_ctl.coef * kl
        last = (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(1)  # last response token
        rewards[torch.arange(len(chosen)), last] += s
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)
        seq_kl = kl.sum(1).mean().item()
        stats = {"reward": scores.mean().item(), "kl": seq_kl, "kl_coef": kl_ctl.coef}
        # the controller sees every process's rollout, so its coefficient stays the same on all of them
        kl_ctl.update(mean_over_processes(cfg, seq_kl), len(chosen) * info.world_size)
        return Rollout({**batch, "old_logp": old_logp, "old_values": values, "advantages": adv,
                        "returns": returns}, stats)

    def loss_fn(m: PolicyWithValue, batch):
        logp, values = _forward(m, batch["input_ids"], cfg.temperature)
        mask = batch["train"][:, 1:]
        pg, clip_frac, approx_kl = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        vf = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        return pg + cfg.vf_coef * vf, {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clip_frac": clip_frac,
                                       "approx_kl": approx_kl, "reward": batch["rollout_reward"],
                                       "kl_ref": batch["rollout_kl"], "kl_coef": batch["rollout_kl_coef"]}

    def measure(m: PolicyWithValue):
        return heldout_metrics(m.policy, reference, template, heldout, reward_fn, cfg.max_new_tokens, cfg.seed,
                               cfg.heldout_samples, info)

    before = initial_metrics(cfg, measure, model)
    params = add_lora(cfg, policy, model)
    batches = RolloutBatches(make_rollout, micro_batch(cfg), cfg.epochs, cfg.seed,
                             stateful={"kl_controller": kl_ctl})
    train = run_trainer(cfg, model, batches, loss_fn, eval_fn=measure)
    after = final_metrics(train)
    summary = {"stage": "ppo", "data": cfg.data, "reward": str(cfg.reward), "rollouts": batches.round,
               "final_kl_coef": kl_ctl.coef, "heldout_prompts": len(heldout), "before": before, "after": after,
               **params, "train": train, "model_dir": export(cfg, policy, tokenizer)}
    return write_summary(cfg, summary)
