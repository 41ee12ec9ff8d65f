"""Scalar heads on the transformer: the reward model and PPO's policy-with-value.

Both read ``Transformer.hidden`` (the final normed states, (B, T, d_model)) and project each position to
one number. A reward model's score of a sequence is its head's output at the sequence's last token; a
value head gives V(s_t) at every token. A reward model is saved as the usual model directory
(``save_model``) plus ``reward_head.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from pyllm import ops
from pyllm.model import Transformer, load_model, save_model
from pyllm.model.io import load_weights

HEAD_FILE = "reward_head.safetensors"


class ScalarHead(nn.Module):
    """Linear(d_model -> 1) on every position: (B, T, d) -> (B, T)."""

    def __init__(self, d_model: int, std: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, 0.0, std) if std else nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h.float()).squeeze(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` (B, T) -> (B,)."""
    T = mask.shape[1]
    return (torch.arange(T, device=mask.device) * mask.long()).argmax(dim=1)


class RewardModel(nn.Module):
    """r(prompt, response): the scalar head at the last token of the sequence."""

    def __init__(self, body: Transformer):
        super().__init__()
        self.body = body
        self.head = ScalarHead(body.cfg.d_model, std=1.0 / (body.cfg.d_model + 1) ** 0.5)

    def forward(self, idx, attention_mask, positions=None, doc_ids=None):
        """idx (B, T) right-padded, attention_mask (B, T) 1 on real tokens -> scores (B,)."""
        per_token = self.head(self.body.hidden(idx, positions, doc_ids))  # (B, T)
        return per_token.gather(1, last_index(attention_mask)[:, None]).squeeze(1)

    def save(self, directory, tokenizer=None) -> Path:
        directory = save_model(self.body, directory, tokenizer)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(Path(directory) / HEAD_FILE))
        return directory

    @classmethod
    def load(cls, directory, device="cpu") -> "RewardModel":
        directory = Path(directory)
        if not (directory / HEAD_FILE).exists():
            raise FileNotFoundError(f"{directory}: no {HEAD_FILE} (not a reward model written by pyllm rm)")
        rm = cls(load_model(directory, device=device))
        try:
            rm.head.load_state_dict(load_weights(directory / HEAD_FILE))
        except RuntimeError as e:  # a head of another width, or missing tensors
            detail = str(e).splitlines()[-1].strip()
            raise ValueError(f"{directory / HEAD_FILE}: does not match the model ({detail})") from None
        return rm.to(device)


class PolicyWithValue(nn.Module):
    """PPO's actor-critic: the policy transformer plus a value head on its hidden states.

    With ``shared_trunk`` the value loss also trains the transformer; otherwise the head reads the
    hidden states detached, so only the policy loss moves the policy. (Shared, a value loss that grows
    with the returns - a large KL penalty - dominated the clipped gradient and wrecked the policy.)
    """

    def __init__(self, policy: Transformer, shared_trunk: bool = False):
        super().__init__()
        self.policy, self.shared_trunk = policy, shared_trunk
        self.value_head = ScalarHead(policy.cfg.d_model)

    def forward(self, idx, positions=None, doc_ids=None):
        """-> (logits (B, T, V), values (B, T))."""
        h = self.policy.hidden(idx, positions, doc_ids)
        logits = ops.linear(h, self.policy.head_weight, backend=self.policy.cfg.backend)
        return logits, self.value_head(h if self.shared_trunk else h.detach())
