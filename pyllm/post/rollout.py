"""On-policy RL (PPO, GRPO) as a batch source for the Trainer.

The Trainer asks for batches; ``RolloutBatches`` answers from a rollout buffer. When the buffer is
empty it samples a new rollout from the CURRENT policy (batched generation with the KV cache), scores
it (a Python reward function or a reward model), computes what the loss needs (old log-probs,
reference log-probs, advantages) and queues ``epochs`` shuffled passes of minibatches over it. So one
rollout feeds several optimiser steps, the policy moves between them, and the clipped ratio does its
job, while the training loop itself stays the Trainer's.

Rows are prompt + response, right-padded: ``tokens`` (N, L); ``train`` (N, L) marks response tokens;
per-token quantities are aligned with ``tokens[:, 1:]`` (N, L-1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .chat import ChatTemplate
from .datasets import Example, task_reward
from .heads import RewardModel
from .judge import RewardModelJudge, load_python_function
from .packing import Encoded
from .sequences import collate, generate_responses, response_logprobs

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class Rollout:
    tensors: dict[str, torch.Tensor]
    """Per-sample tensors, first dim N."""
    stats: dict[str, float]
    """Rollout statistics logged with every minibatch drawn from it (mean reward, KL...)."""


class RolloutBatches:
    """Trainer batch source over rollouts made by ``make_rollout(round)``."""

    def __init__(self, make_rollout: Callable[[int], Rollout], minibatch_size: int, epochs: int, seed: int = 0):
        self.make_rollout, self.minibatch_size, self.epochs, self.seed = make_rollout, minibatch_size, epochs, seed
        self.round = 0
        self._queue: list[dict[str, torch.Tensor]] = []
        self.last_stats: dict[str, float] = {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self._queue:
            rollout = self.make_rollout(self.round)
            self.last_stats = rollout.stats
            n = next(iter(rollout.tensors.values())).shape[0]
            rng = random.Random(self.seed * 1000003 + self.round)
            for _ in range(self.epochs):
                order = list(range(n))
                rng.shuffle(order)
                for s in range(0, n - self.minibatch_size + 1, self.minibatch_size):
                    idx = torch.tensor(order[s:s + self.minibatch_size])
                    self._queue.append({k: v[idx.to(v.device)] for k, v in rollout.tensors.items()})
            self.round += 1
        batch = self._queue.pop(0)
        return {**batch, **{f"rollout_{k}": torch.tensor(v) for k, v in self.last_stats.items()}}

    def state_dict(self) -> dict:
        # a resumed run starts a fresh rollout from the restored policy (the buffer is not saved)
        return {"round": self.round, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.seed = state["round"], state["seed"]
        self._queue = []


def rollout_seed(seed: int, round_: int) -> int:
    """Seed of one rollout: different per round and per data-parallel rank (ranks sample different data)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (seed * 7777 + round_) * 1009 + rank


def make_reward_fn(spec, template: ChatTemplate, seq_len: int, device) -> RewardFn:
    """A batched reward from "task" (exact-match checker of the built-in tasks), "py:module:function" or a
    Python callable f(prompt, response) -> float, or "rm:<dir>" (a reward model's score)."""
    if callable(spec) or spec == "task" or spec.startswith("py:"):
        fn = spec if callable(spec) else task_reward if spec == "task" else load_python_function(spec)
        return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]
    kind, _, path = spec.partition(":")
    if kind == "rm" and path:
        judge = RewardModelJudge(RewardModel.load(path, device).eval(), template, seq_len)
        return lambda prompts, responses: judge.scores(prompts, responses).tolist()
    raise ValueError(f"reward={spec!r}: use 'task' (built-in checker), 'py:module:function', a callable, "
                     "or 'rm:<reward model dir>'")


@torch.no_grad()
def sample(policy, template: ChatTemplate, prompts: list[str], *, max_new_tokens: int, temperature: float,
           seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Generate one response per prompt -> ({"input_ids", "train", "attention"} (N, L) on the policy's
    device, response texts)."""
    p_ids, r_ids, texts, _ = generate_responses(policy, template, prompts, max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, batch_size=len(prompts))
    items = [Encoded(tuple(p + r), (False,) * len(p) + (True,) * len(r)) for p, r in zip(p_ids, r_ids)]
    b = collate(items, template.tokenizer.pad_id, policy.head_weight.device)
    return {"input_ids": b["tokens"], "train": b["train"], "attention": b["attention"]}, texts


@torch.no_grad()
def heldout_metrics(policy, reference, template: ChatTemplate, examples: list[Example], reward_fn: RewardFn,
                    max_new_tokens: int, seed: int = 0) -> dict:
    """Greedy accuracy and mean reward on held-out prompts; on responses sampled at temperature 1 (what
    RL optimises) the mean reward and the KL(policy || reference) per response (sum over tokens of
    log pi - log ref, averaged over prompts)."""
    prompts = [e.prompt for e in examples]
    _, greedy = sample(policy, template, prompts, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    rewards = reward_fn(prompts, greedy)
    accuracy = sum(t.strip() == e.reference for t, e in zip(greedy, examples)) / len(examples)
    sampled, texts = sample(policy, template, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    sampled_rewards = reward_fn(prompts, texts)
    logp, mask = response_logprobs(policy, sampled["input_ids"], sampled["train"])
    ref_logp, _ = response_logprobs(reference, sampled["input_ids"], sampled["train"])
    kl = ((logp - ref_logp) * mask).sum(1).mean().item()
    return {"accuracy": accuracy, "mean_reward": sum(rewards) / len(rewards),
            "sampled_reward": sum(sampled_rewards) / len(sampled_rewards), "kl_to_ref": kl}
