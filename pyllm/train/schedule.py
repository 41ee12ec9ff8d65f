"""Learning-rate schedules: linear warmup, then cosine / linear decay to a floor, constant, or WSD.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step.
Warmup follows nanoGPT (lr * (step + 1) / (warmup + 1)): the first step already moves the weights.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for 0-based optimiser step ``step`` of a run configured by ``cfg``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # rounded: int() truncated 0.29 x 100 (28.999...) to a decay one step short
        decay_start = cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(progress, 1.0)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)  # cosine
