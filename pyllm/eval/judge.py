"""Reward-model judging: how often model A's response beats model B's under a reward model.

The reward model is any callable ``reward_fn(prompt, response) -> float`` (post-training's reward model
plugs in here). A win counts 1, a tie (equal rewards within ``tie_margin``) 1/2, a loss 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .generation import generate_text
from .runner import unwrap

RewardFn = Callable[[str, str], float]


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], reward_fn: RewardFn,
             *, tie_margin: float = 0.0) -> dict:
    """Win rate of A over B, with win/tie/loss counts and the mean reward of each side."""
    if not (len(prompts) == len(responses_a) == len(responses_b)) or not prompts:
        raise ValueError(f"win_rate: need equal, non-zero numbers of prompts ({len(prompts)}), responses_a "
                         f"({len(responses_a)}) and responses_b ({len(responses_b)})")
    if tie_margin < 0:
        raise ValueError(f"win_rate: tie_margin={tie_margin} must be >= 0")
    wins = ties = 0
    sum_a = sum_b = 0.0
    for p, a, b in zip(prompts, responses_a, responses_b):
        ra, rb = float(reward_fn(p, a)), float(reward_fn(p, b))
        sum_a, sum_b = sum_a + ra, sum_b + rb
        if abs(ra - rb) <= tie_margin:
            ties += 1
        elif ra > rb:
            wins += 1
    n = len(prompts)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "reward_a": sum_a / n, "reward_b": sum_b / n, "n": n}


def judge_models(model_a, model_b, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, *,
                 max_new_tokens: int = 64, stop: Sequence[str] = (), temperature: float = 0.0) -> dict:
    """Generate a response to each prompt with both models (same decoding settings), then ``win_rate``."""
    kw = dict(max_new_tokens=max_new_tokens, stop=stop, temperature=temperature)
    return win_rate(prompts, generate_text(unwrap(model_a), tokenizer, prompts, **kw),
                    generate_text(unwrap(model_b), tokenizer, prompts, **kw), reward_fn)
