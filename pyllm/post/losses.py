"""The objectives of post-training, as plain tensor functions (no models, no loops).

Shapes: B sequences (or pairs), T token positions. ``mask`` (B, T) is 1.0 on the tokens a loss counts
(the response / completion) and 0.0 elsewhere. Log-probabilities are of the token actually taken.

- Bradley-Terry reward loss (Ouyang et al. 2022, InstructGPT), optional margin (Touvron et al. 2023, Llama 2).
- DPO (Rafailov et al. 2023) with the sigmoid, IPO (Azar et al. 2023) and hinge (SLiC, Zhao et al. 2023) forms.
- PPO clipped policy and value losses (Schulman et al. 2017), GAE (Schulman et al. 2016), reward whitening,
  the per-token KL penalty to a frozen reference and the adaptive KL controller (Ziegler et al. 2019).
- GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_VARIANTS = ("sigmoid", "ipo", "hinge")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under ``logits``: logits (B, T, V), tokens (B, T) -> (B, T), in fp32.
    Tokens outside [0, V) (e.g. ignore_index) get 0."""
    safe = tokens.clamp(0, logits.shape[-1] - 1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(tokens == safe, logp, torch.zeros_like(logp))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over all elements, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked elements (unbiased variance); with ``shift_mean=False`` the mean
    is added back (reward whitening keeps the sign of the reward, advantage whitening centres it)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean).square() * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


# ----------------------------------------------------------------------------------- reward model


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None):
    """-log sigmoid(r_chosen - r_rejected - margin), per pair (B,). Returns (loss (B,), correct (B,) bool)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff), r_chosen > r_rejected


# -------------------------------------------------------------------------------------------- DPO


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1,
             variant: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO-family loss per pair from sequence log-probs (B,) of the chosen and rejected responses under
    the policy and the reference (sums, or per-token means for the length-normalised form).

    h = (pi_c - ref_c) - (pi_r - ref_r), the difference of implicit rewards divided by beta:
      sigmoid: -log sigmoid(beta h)  (with label smoothing e: conservative DPO, -(1-e) ls(beta h) - e ls(-beta h))
      ipo:     (h - 1 / (2 beta))^2
      hinge:   max(0, 1 - beta h)
    Returns (loss (B,), chosen_reward (B,), rejected_reward (B,)), rewards = beta * log-ratio (detached).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"dpo_loss: variant={variant!r}; use one of {DPO_VARIANTS}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if variant == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif variant == "ipo":
        loss = (h - 1.0 / (2.0 * beta)).square()
    else:
        loss = torch.relu(1.0 - beta * h)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# -------------------------------------------------------------------------------------------- PPO


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens (Schulman's
    estimators): "k1" = logp - ref_logp (unbiased, can be negative), "k3" = exp(-d) - 1 + d with
    d = logp - ref_logp (unbiased and >= 0; GRPO's choice)."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        return torch.exp(-d) - 1.0 + d
    raise ValueError(f"kl_penalty: kind={kind!r}; use 'k1' or 'k3'")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens. rewards, values, mask (B, T); the
    episode ends after the last masked token (value 0 beyond it).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
    Returns (advantages, returns), both (B, T), zero where mask is 0.
    """
    B, T = rewards.shape
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)
    next_adv = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # positions outside the response pass the running values through unchanged
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked tokens, then over sequences (GRPO's 1/G sum_i 1/|o_i| sum_t):
    every response weighs the same whatever its length."""
    return masked_mean(x, mask, dim=1).mean()


def ppo_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2, per_sequence: bool = False):
    """Clipped surrogate: mean over masked tokens of max(-A r, -A clip(r, 1-c, 1+c)), r = exp(logp - old)
    (``per_sequence``: the mean per sequence, then over sequences).
    Returns (loss, clip_fraction, approx_kl) with approx_kl the k3 estimate of KL(old || new)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = sequence_mean(per_token, mask) if per_sequence else masked_mean(per_token, mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_penalty(old_logp, logp.detach(), "k3"), mask)
    return loss, clip_frac, approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 * mean over masked tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.maximum((values - returns).square(), (clipped - returns).square())
    return 0.5 * masked_mean(loss, mask)


@dataclass
class AdaptiveKLController:
    """Adapts the KL coefficient toward a target KL (Ziegler et al. 2019, eq. 2):
    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_steps / horizon."""

    coef: float
    """Current KL penalty coefficient."""
    target: float | None = 6.0
    """Target KL per sequence (nats); None keeps the coefficient fixed."""
    horizon: int = 10000
    """Number of sequences over which the coefficient may change by a factor of about e^(0.2)."""

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


# ------------------------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: rewards (B,) laid out as B / group_size consecutive groups of samples
    of one prompt; A = (r - mean_group) / (std_group + eps) (unbiased std), or r - mean_group when
    ``scale`` is False (Dr. GRPO, Liu et al. 2025). Returns (B,)."""
    if rewards.numel() % group_size:
        raise ValueError(f"grpo_advantages: {rewards.numel()} rewards is not a multiple of group_size={group_size}")
    g = rewards.float().view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
        adv = adv / (std + eps)
    return adv.reshape(-1)
