"""Data parallelism for the trainer: DDP or FSDP2 (``fully_shard``) under ``torchrun``.

The trainer wraps a small ``LossModule`` (model + loss function) rather than the model, so that the
wrapper's ``forward`` is the whole loss computation: DDP's gradient hooks and FSDP2's all-gathers fire
however the loss function calls into the model (``model.loss``, ``model.hidden`` and extra heads).
FSDP2 shards every transformer block as its own unit and the rest (embeddings, final norm, heads) in
the root unit. Gradients are averaged over ranks in both modes, so N ranks with B sequences each step
like 1 rank with N x B.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE), or the one already set up."""
    if not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return DistInfo()
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def setup_for(device: str) -> DistInfo:
    """``setup`` for a TrainConfig's device name ("auto", "cpu", "cuda", "cuda:N"): NCCL for CUDA, else gloo."""
    return setup("cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_mode(mode: str, world_size: int) -> str:
    """The data-parallel wrapping a run of ``world_size`` processes uses: "none", "ddp" or "fsdp"."""
    if mode == "none" and world_size > 1:  # each process would train its own model on its share of the data
        raise ValueError(f"distributed='none' with {world_size} processes (torchrun) would train {world_size} "
                         "separate models; use 'auto', 'ddp' or 'fsdp', or run one process")
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    if mode != "none" and world_size == 1:
        return "none"  # one process: nothing to synchronise, same result
    return mode


class LossModule(nn.Module):
    """forward(batch) = loss_fn(model, batch) -> (loss, metrics): the unit DDP/FSDP/compile wrap."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def wrap(module: LossModule, mode: str, device: torch.device) -> nn.Module:
    """DDP- or FSDP2-wrap ``module`` (its parameters are broadcast from / sharded across ranks)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from pyllm.model.transformer import Block

        # A block returns its MLP's output projection, which every linear backend (F.linear too) makes as a (B, T, N)
        # view of its (B*T, N) GEMM result. FSDP2 warns on each such output of a unit, since an in-place op on it
        # would drop the unit's pre-backward hook; a block's outputs are only read out of place (the next norm adds
        # them to the residual), so the warning is noise, which a copy of every block's output would cost to avoid.
        warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor", UserWarning,
                                r"torch\.distributed\.fsdp\.")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for sub in module.modules():
            if isinstance(sub, Block):
                fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    return module


def no_sync(wrapped: nn.Module, mode: str, skip_sync: bool):
    """Context for a micro-step: with skip_sync, gradients only accumulate locally (no communication)."""
    if not skip_sync or mode == "none":
        return contextlib.nullcontext()
    if mode == "ddp":
        return wrapped.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str, info: DistInfo) -> torch.Tensor:
    """In-place all-reduce with op "sum", "max" or "avg" (a no-op on one process)."""
    if info.world_size > 1:
        if op == "avg":
            dist.all_reduce(t, dist.ReduceOp.SUM)
            t /= info.world_size
        else:
            dist.all_reduce(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded copies (DTensors are all-gathered: every rank must call this, in the same order)."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach() for k, v in tensors.items()}


@torch.no_grad()
def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """dst <- full, where dst may be a shard (DTensor) of ``full``."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements)
        dst.to_local().copy_(full.to_local())
    else:
        dst.copy_(full)
