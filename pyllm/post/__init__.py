"""pyllm.post: post-training on pyllm's Trainer.

Stages, each a config dataclass and a function returning a summary with held-out metrics before and
after (CLI: ``pyllm sft | rm | dpo | ppo | grpo``):

- ``sft(SFTConfig)``: supervised fine-tuning on chat-formatted, packed examples (loss on assistant tokens);
- ``train_reward_model(RewardConfig)``: a scalar-head reward model with the Bradley-Terry loss;
- ``dpo(DPOConfig)``: DPO / IPO / hinge, optionally length-normalised, cached reference log-probs;
- ``ppo(PPOConfig)``: RLHF with a value head, GAE, clipped losses and an adaptive KL penalty;
- ``grpo(GRPOConfig)``: group-relative policy optimisation with verifiable rewards.

Any stage can train LoRA adapters instead of all weights (``lora_rank``); preference pairs can be
relabelled by a judge (``judge``: a rule, a reward model or another pyllm model).
"""

from .dpo import DPOConfig, dpo
from .grpo import GRPOConfig, grpo
from .ppo import PPOConfig, ppo
from .reward import RewardConfig, train_reward_model
from .sft import SFTConfig, sft

__all__ = ["SFTConfig", "sft", "RewardConfig", "train_reward_model", "DPOConfig", "dpo", "PPOConfig", "ppo",
           "GRPOConfig", "grpo"]
