"""LoRA adapters (Hu et al. 2021): W' = W + (alpha / r) B A with W frozen, A (r, in), B (out, r) trained.

The model calls ``ops.linear(x, layer.weight, ...)`` on its linear layers' weights, so the adapter is a
``torch.nn.utils.parametrize`` parametrization of ``weight``: every read of ``layer.weight`` returns
W + scale * B A and the model code is untouched. The optimiser sees only A and B (and whatever else is
left trainable, e.g. a value head), which is where full fine-tuning spends its memory (AdamW keeps two
fp32 moments per trained weight). ``merge_lora`` folds B A into W for export, leaving a plain model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from pyllm.typecheck import check_fields

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are."""

    rank: int = 8
    """Rank r of the update B A."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    targets: tuple[str, ...] = TARGETS
    """Module name suffixes to adapt (attention qkv/proj, MLP fc/proj)."""

    def __post_init__(self):
        check_fields(self)
        if self.rank < 1:
            raise ValueError(f"LoRAConfig: rank={self.rank} must be >= 1")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"LoRAConfig: targets {bad} unknown; choose from {TARGETS}")


class LoRAUpdate(nn.Module):
    """Parametrization W -> W + scale * B A. B starts at zero so the adapted model equals the base."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device, dtype):
        super().__init__()
        self.scale = alpha / rank
        self.enabled = True
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight):
        return weight + self.scale * (self.lora_B @ self.lora_A) if self.enabled else weight


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` and add adapters to the target linears. Returns their names."""
    if any(isinstance(m, LoRAUpdate) for m in model.modules()):  # a second set would stack on the first, frozen
        raise ValueError("apply_lora: the model already has LoRA adapters; merge_lora(model) first to add new ones")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(cfg.targets):
            w = module.weight
            parametrize.register_parametrization(
                module, "weight", LoRAUpdate(w.shape[0], w.shape[1], cfg.rank, cfg.alpha, w.device, w.dtype))
            module.parametrizations.weight.original.requires_grad_(False)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"apply_lora: no linear layer matched targets {cfg.targets}")
    return adapted


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its frozen base: every adapter switched off inside the block."""
    updates = [m for m in model.modules() if isinstance(m, LoRAUpdate)]
    for u in updates:
        u.enabled = False
    try:
        yield model
    finally:
        for u in updates:
            u.enabled = True


class BaseModelView:
    """A reference model that costs no memory: calls ``model`` with its adapters off (under LoRA the
    base weights never change, so they ARE the starting policy). Without adapters it is the model."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W <- W + scale B A) and remove it; the model is then a plain one,
    every parameter trainable again (apply_lora froze them). Returns how many merged."""
    merged = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an adapted weight's base counts once in the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
