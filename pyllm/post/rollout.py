"""On-policy RL (PPO, GRPO) as a batch source for the Trainer.

The Trainer asks for batches; ``RolloutBatches`` answers from a rollout buffer. When the buffer is
empty it samples a new rollout from the CURRENT policy (batched generation with the KV cache), scores
it (a Python reward function or a reward model), computes what the loss needs (old log-probs,
reference log-probs, advantages) and queues ``epochs`` shuffled passes of minibatches over it. So one
rollout feeds several optimiser steps, the policy moves between them, and the clipped ratio does its
job, while the training loop itself stays the Trainer's. ``RLConfig`` and ``rl_setup`` are what PPO
and GRPO share (prompts, reference, reward).

Rows are prompt + response, right-padded: ``input_ids`` (N, L); ``train`` (N, L) marks response tokens;
per-token quantities are aligned with ``input_ids[:, 1:]`` (N, L-1).
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from pyllm.train.checkpoint import CheckpointError
from pyllm.train.distributed import DistInfo

from .chat import ChatTemplate
from .datasets import BUILTIN_EXAMPLES, Example, exact_match, load_examples, resolve, split, task_reward
from .heads import RewardModel
from .judge import RewardModelJudge, finite_reward, load_python_function, reward_where, rule_score
from .lora import BaseModelView
from .packing import Encoded
from .sequences import collate, generate_responses, response_logprobs
from .stage import StageConfig, data_parallel, device_of, gather_shares, heldout_share, load_start

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class Rollout:
    tensors: dict[str, torch.Tensor]
    """Per-sample tensors, first dim N."""
    stats: dict[str, float]
    """Rollout statistics logged with every minibatch drawn from it (mean reward, KL...)."""


class RolloutBatches:
    """Trainer batch source over rollouts made by ``make_rollout(round)``.

    Its state (``state_dict``, saved in every Trainer checkpoint) holds the current rollout and how many
    of its minibatches were served, so a killed and resumed run serves the same remaining minibatches
    and then samples the same next rollout (rollouts are seeded by round) as an uninterrupted one.
    ``stateful`` names other objects whose state changes with rollouts (PPO's KL controller); they are
    saved and restored with it.
    """

    def __init__(self, make_rollout: Callable[[int], Rollout], minibatch_size: int, epochs: int, seed: int = 0,
                 stateful: dict | None = None):
        self.make_rollout, self.minibatch_size, self.epochs, self.seed = make_rollout, minibatch_size, epochs, seed
        self.stateful = stateful or {}
        self.round = 0  # rollouts made so far
        self.rollout: Rollout | None = None
        self.served = 0  # minibatches of ``rollout`` handed out
        self._queue: list[dict[str, torch.Tensor]] = []

    @property
    def last_stats(self) -> dict[str, float]:
        return self.rollout.stats if self.rollout is not None else {}

    def _minibatches(self, rollout: Rollout, round_: int) -> list[dict[str, torch.Tensor]]:
        """``epochs`` shuffled passes over the rollout (order seeded by seed and round)."""
        n = next(iter(rollout.tensors.values())).shape[0]
        rng = random.Random(self.seed * 1000003 + round_)
        out = []
        for _ in range(self.epochs):
            order = list(range(n))
            rng.shuffle(order)
            for s in range(0, n - self.minibatch_size + 1, self.minibatch_size):
                idx = torch.tensor(order[s:s + self.minibatch_size])
                out.append({k: v[idx.to(v.device)] for k, v in rollout.tensors.items()})
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self._queue:
            self.rollout = self.make_rollout(self.round)
            self._queue = self._minibatches(self.rollout, self.round)
            self.round += 1
            self.served = 0
        batch = self._queue.pop(0)
        self.served += 1
        return {**batch, **{f"rollout_{k}": torch.tensor(v) for k, v in self.last_stats.items()}}

    def state_dict(self) -> dict:
        """Round, seed, the current rollout (its tensors as tensors: the Trainer's checkpoint stores them
        in state.safetensors), the minibatches already served from it, and the ``stateful`` objects' states."""
        rollout = None if self.rollout is None else {"stats": self.rollout.stats, "tensors": self.rollout.tensors}
        return {"round": self.round, "seed": self.seed, "served": self.served, "minibatch_size": self.minibatch_size,
                "rollout": rollout, "stateful": {k: v.state_dict() for k, v in self.stateful.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.seed = state["round"], state["seed"]
        for k, v in state.get("stateful", {}).items():
            self.stateful[k].load_state_dict(v)
        self.rollout, self._queue, self.served = None, [], 0
        saved = state.get("rollout")
        if saved is None:  # a checkpoint without a buffer: continue with a fresh rollout
            return
        if not all(torch.is_tensor(v) for v in saved["tensors"].values()):
            raise CheckpointError("this checkpoint keeps the rollout buffer as JSON lists (written by an older "
                                  "pyllm); resuming it is not supported: start the stage in another out_dir")
        self.rollout = Rollout(dict(saved["tensors"]), saved["stats"])
        # served counts minibatches of the saved size; the samples they hold are the same shuffled passes
        # whatever the size, so a resume with another micro-batch continues at the same sample
        samples = state["served"] * state.get("minibatch_size", self.minibatch_size)
        if samples % self.minibatch_size:
            raise CheckpointError(f"the checkpoint is {samples} samples into its rollout, not a whole number of "
                                  f"minibatches of {self.minibatch_size}; resume with a micro-batch that divides it")
        self.served = samples // self.minibatch_size
        self._queue = self._minibatches(self.rollout, self.round - 1)[self.served:]


def rollout_seed(seed: int, round_: int) -> int:
    """Seed of one rollout: different per round and per data-parallel rank (ranks sample different data)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (seed * 7777 + round_) * 1009 + rank


def make_reward_fn(spec, template: ChatTemplate, seq_len: int, device) -> RewardFn:
    """A batched reward from "task" (exact-match checker of the built-in tasks), "py:module:function" or a
    Python callable f(prompt, response) -> float, or "rm:<dir>" (a reward model's score)."""
    if callable(spec) or spec == "task" or spec.startswith("py:"):
        fn = spec if callable(spec) else task_reward if spec == "task" else load_python_function(spec)
        name = spec if isinstance(spec, str) else None
        return lambda prompts, responses: [rule_score(fn, p, r, name) for p, r in zip(prompts, responses)]
    kind, _, path = spec.partition(":")
    if kind == "rm" and path:
        judge = RewardModelJudge(RewardModel.load(path, device).eval(), template, seq_len)

        def rm_reward(prompts, responses):
            scores = judge.scores(prompts, responses).tolist()
            return [finite_reward(s, reward_where(spec, p, r)) for p, r, s in zip(prompts, responses, scores)]

        return rm_reward
    raise ValueError(f"reward={spec!r}: use 'task' (built-in checker), 'py:module:function', a callable, "
                     "or 'rm:<reward model dir>'")


@torch.no_grad()
def sample(policy, template: ChatTemplate, prompts: list[str], *, max_new_tokens: int, temperature: float,
           seed: int, batch_rows: tuple[int, list[int]] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Generate one response per prompt -> ({"input_ids", "train", "attention"} (N, L) on the policy's
    device, response texts). ``batch_rows``: the prompts are these rows of a larger batch (see ``generate``)."""
    p_ids, r_ids, texts, _ = generate_responses(policy, template, prompts, max_new_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed, batch_size=len(prompts),
                                                batch_rows=batch_rows)
    items = [Encoded(tuple(p + r), (False,) * len(p) + (True,) * len(r)) for p, r in zip(p_ids, r_ids)]
    b = collate(items, template.tokenizer.pad_id, policy.head_weight.device)
    return {"input_ids": b["tokens"], "train": b["train"], "attention": b["attention"]}, texts


@torch.no_grad()
def heldout_metrics(policy, reference, template: ChatTemplate, examples: list[Example], reward_fn: RewardFn,
                    max_new_tokens: int, seed: int = 0, samples: int = 1, info: DistInfo | None = None) -> dict:
    """Greedy accuracy and mean reward on held-out prompts; on ``samples`` responses per prompt sampled at
    temperature 1 (what RL optimises; seeds seed .. seed + samples - 1) the mean reward and the
    KL(policy || reference) per response (sum over tokens of log pi - log ref, averaged over responses).

    Data-parallel (``info``): each process generates for its ``heldout_share`` of the prompts and the
    per-prompt values of all come back in their order (``gather_shares``), so every process returns what
    one process returns for all prompts: a sampled response draws the random numbers it draws in the batch
    of all prompts (``batch_rows``), whatever the number of processes."""
    info = info or DistInfo()
    mine = heldout_share(list(range(len(examples))), info)
    whole = (len(examples), mine) if info.world_size > 1 else None
    prompts = [examples[i].prompt for i in mine]
    # per prompt: greedy answer right, its reward, then each sample's reward; then each sample's KL
    columns, kls = [[], []] + [[] for _ in range(samples)], [torch.zeros(0)] * samples
    if prompts:  # (a process has none when there are fewer prompts than processes)
        _, greedy = sample(policy, template, prompts, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        columns[0] = [float(exact_match(t, examples[i].reference)) for t, i in zip(greedy, mine)]
        columns[1] = reward_fn(prompts, greedy)
        for k in range(samples):
            sampled, texts = sample(policy, template, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                                    seed=seed + k, batch_rows=whole)
            columns[2 + k], kls[k] = reward_fn(prompts, texts), response_kls(policy, reference, sampled)
    device = policy.head_weight.device
    values = gather_shares([torch.tensor(c, dtype=torch.float64, device=device) for c in columns] + kls,
                           len(examples), info, device)
    right, rewards, *sampled_rewards = [v.tolist() for v in values[:2 + samples]]
    sampled_rewards = [r for per_sample in sampled_rewards for r in per_sample]
    kl_means = [v.mean().item() for v in values[2 + samples:]]  # per sample: the mean over prompts
    return {"accuracy": sum(right) / len(examples), "mean_reward": sum(rewards) / len(rewards),
            "sampled_reward": sum(sampled_rewards) / len(sampled_rewards), "kl_to_ref": sum(kl_means) / samples}


@torch.no_grad()
def response_kls(policy, reference, sampled: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_t log pi(y_t) - log ref(y_t) of each response (N,) of a batch from ``sample`` (0 when empty)."""
    logp, mask = response_logprobs(policy, sampled["input_ids"], sampled["train"])
    ref_logp, _ = response_logprobs(reference, sampled["input_ids"], sampled["train"])
    return ((logp - ref_logp) * mask).sum(1)


def sampled_kl(policy, reference, sampled: dict[str, torch.Tensor]) -> float:
    """KL(policy || reference) per response, estimated on responses sampled from the policy (a batch from
    ``sample``): the mean over responses of sum_t log pi(y_t) - log ref(y_t) (Schulman's k1 estimator; an
    empty response counts as 0)."""
    return response_kls(policy, reference, sampled).mean().item()


@dataclass
class RLConfig(StageConfig):
    """Fields PPO and GRPO share. ``data``: prompts with reference answers (builtin:tasks|add|sort|reverse
    or a JSONL of {prompt, completion}); ``train['batch_size']`` is the minibatch of samples per step."""

    reward: str | Callable[[str, str], float] = "task"
    """"task" (built-in exact-match checker, 1 or 0), "py:module:function" or (Python API) a callable
    f(prompt, response) -> float, or "rm:<dir>" (a reward model's score)."""
    prompts_per_rollout: int = 32
    """Prompts sampled per rollout."""
    epochs: int = 2
    """Passes of minibatch updates over each rollout."""
    clip: float = 0.2
    """Policy-ratio clip range epsilon."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference (PPO: per-token reward penalty; GRPO: loss term)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    max_new_tokens: int = 8
    """Longest response sampled."""
    heldout_samples: int = 4
    """Responses sampled per held-out prompt for the held-out sampled reward and KL (their mean). With one,
    the sampling seed alone moved the measured change of the default pipeline's GRPO run (574 prompts)
    between +0.014 and +0.049 over six seeds, as much as the change itself."""
    skip_train: int = 0
    """Leave out the first N training prompts (in the same fixed order as ``max_train``): RL then samples
    prompts that an SFT run with ``max_train=N`` on the same data never saw (prompts it memorised give
    every sample the same reward, hence no gradient)."""

    def __post_init__(self):
        super().__post_init__()  # first: the field types (pyllm.typecheck)
        checks = [(self.prompts_per_rollout > 0, "prompts_per_rollout must be positive"),
                  (self.epochs > 0, "epochs must be positive"), (self.clip > 0, "clip must be positive"),
                  (self.kl_coef >= 0, "kl_coef must be >= 0"), (self.temperature > 0, "temperature must be > 0"),
                  (self.max_new_tokens > 0, "max_new_tokens must be positive"),
                  (self.heldout_samples > 0, "heldout_samples must be positive"),
                  (self.skip_train >= 0, "skip_train must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")

    def samples_per_prompt(self) -> int:
        return 1

    def check_minibatch(self, world_size: int | None = None, n_prompts: int | None = None) -> None:
        """The rollout splits evenly over ``world_size`` processes (None: torchrun's WORLD_SIZE, else 1), and each
        share into minibatches. ``n_prompts``: the training prompts there are; a process's rollout samples at
        most that many."""
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if self.prompts_per_rollout % world_size:
            raise ValueError(f"{type(self).__name__}: prompts_per_rollout={self.prompts_per_rollout} does not split "
                             f"evenly over {world_size} processes; make it a multiple of {world_size}")
        prompts, why = self.prompts_per_rollout // world_size, ""
        if n_prompts is not None and n_prompts < prompts:  # a smaller rollout: check what will really be sampled
            prompts, why = n_prompts, f" (only {n_prompts} training prompts, fewer than the {prompts} per rollout)"
        samples, mb = prompts * self.samples_per_prompt(), self.train_config().micro_batch(world_size)
        if samples % mb:
            raise ValueError(f"{type(self).__name__}: a rollout of {samples} samples per process{why} is not a "
                             f"multiple of the minibatch ({mb}); change train['batch_size'] or the rollout size")

    def prompts_per_process(self, n_prompts: int) -> int:
        """This process's share of each rollout's prompts (all of them in one process), at most the
        ``n_prompts`` training prompts there are."""
        world_size = data_parallel(self).world_size
        self.check_minibatch(world_size, n_prompts)
        return min(self.prompts_per_rollout // world_size, n_prompts)


def rl_setup(cfg: RLConfig):
    """(policy, frozen reference, tokenizer, template, train prompts, held-out examples, reward_fn)."""
    policy, tokenizer, template = load_start(cfg)
    device = device_of(cfg)
    # with LoRA the frozen base weights are the reference (adapters switched off); otherwise a frozen copy
    reference = BaseModelView(policy) if cfg.lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
    items = resolve(cfg.data, BUILTIN_EXAMPLES, load_examples, cfg.seed)
    train_items, heldout = split([e for e in items if isinstance(e, Example)], cfg.heldout_fraction)
    train_items, heldout = train_items[cfg.skip_train:][:cfg.max_train], heldout[:cfg.max_heldout]
    if not train_items or not heldout:
        raise ValueError(f"{type(cfg).__name__}: data {cfg.data!r} gives {len(train_items)} training prompts "
                         f"(after skip_train={cfg.skip_train}) and {len(heldout)} held-out; both must be non-empty")
    for e in train_items + heldout:  # a prompt that leaves no room to answer is an error, with its origin
        n = len(template.prompt_ids([{"role": "user", "content": e.prompt}]))
        if n + cfg.max_new_tokens > cfg.seq_len:
            raise ValueError(f"{e.origin}: prompt is {n} tokens; with max_new_tokens={cfg.max_new_tokens} it "
                             f"exceeds seq_len={cfg.seq_len}")
    reward_fn = make_reward_fn(cfg.reward, template, cfg.seq_len, device)
    return policy, reference, tokenizer, template, [e.prompt for e in train_items], heldout, reward_fn
