"""Data-parallel evaluation: each rank takes every ``world_size``-th item, then the per-rank sums are
all-reduced with torch.distributed, so every rank ends with the same totals. Sums (not means) are
reduced, so ranks with unequal item counts still give the exact global mean."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence, rank: int, world_size: int) -> list:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank={rank} must be in [0, world_size={world_size})")
    return list(items[rank::world_size])


def all_reduce_sums(values: Sequence[float], world_size: int) -> list[float]:
    """Sum ``values`` over all ranks (float64, on the process group's device); no-op for one rank."""
    if world_size == 1:
        return [float(v) for v in values]
    if not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
