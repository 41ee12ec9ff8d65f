"""GRPO and PPO learn: trained on a verifiable reward, a tiny model's held-out sampled reward rises.

The reward is the share of the response's characters that are not ASCII. A fresh byte-level model emits
about uniform bytes, so a random policy already earns about 0.47 (groups have mixed rewards) and every
response position counts, not only the first. Measured with these settings (scratch runs, 2-core CPU,
about 0.5 s per run): over seeds 0-9 the rise was 0.46-0.51 (GRPO) and 0.50-0.54 (PPO); one held-out
measurement (64 prompts x 4 samples) has a standard error of 0.017; training on no information (a
constant or a coin-flip reward, seeds 0-4) moved it by at most 0.077. The margin, 0.2, lies between.
"""

import math

import pytest

from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.ppo import PPOConfig, ppo

MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32}


def non_ascii_share(prompt: str, response: str) -> float:
    """Share of the response's characters outside ASCII (0 when empty). Special tokens decode to ASCII
    text (``<|user|>``), so emitting them earns nothing."""
    return sum(ord(c) >= 128 for c in response) / len(response) if response else 0.0


def run_stage(algo: str, out_dir: str) -> dict:
    """48 steps from a fresh model: 12 rollouts of 32 samples, 2 epochs of minibatches of 16 each. On the CPU,
    where the figures above were measured (a GPU draws other samples)."""
    train = {"model": MODEL, "device": "cpu", "progress": False, "max_steps": 48, "lr": 1e-2, "warmup_steps": 0,
             "batch_size": 16}
    common = dict(data="builtin:reverse", out_dir=out_dir, seq_len=48, max_train=64, max_heldout=64,
                  heldout_samples=4, max_new_tokens=4, reward=non_ascii_share, train=train)
    if algo == "grpo":
        return grpo(GRPOConfig(group_size=8, prompts_per_rollout=4, **common))
    return ppo(PPOConfig(prompts_per_rollout=32, **common))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_raises_the_heldout_sampled_reward(tmp_path, algo):
    s = run_stage(algo, str(tmp_path))
    before, after = s["before"], s["after"]
    assert s["rollouts"] == 12
    assert 0.3 < before["sampled_reward"] < 0.6  # the start policy earns the reward sometimes
    assert after["sampled_reward"] > before["sampled_reward"] + 0.2
    assert math.isfinite(after["kl_to_ref"]) and after["kl_to_ref"] > 0.0
