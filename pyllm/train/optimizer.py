"""AdamW over a model's parameters through the fused ``pyllm.ops.adamw_step``.

Two groups: matrices get decoupled weight decay; norms, biases and embeddings do not (a tensor is
"decayed" when it is at least 2-D and is not an embedding table). With ``master_weights`` the model
holds low-precision weights and the optimiser fp32 copies that receive the update. Under FSDP2 the
parameters are DTensors: the state is created like them (sharded the same way) and the fused step
runs on the local shards.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pyllm import ops


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (a view: in-place updates land in the DTensor), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def decays(name: str, p: torch.Tensor, embedding_names: set[str]) -> bool:
    return p.dim() >= 2 and name not in embedding_names


class AdamW:
    def __init__(self, model: nn.Module, *, weight_decay: float, beta1: float, beta2: float, eps: float,
                 master_weights: bool = False):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        embedding_names = {f"{mod_name}.weight" if mod_name else "weight"
                           for mod_name, mod in model.named_modules() if isinstance(mod, nn.Embedding)}
        # named_parameters() yields a tied tensor once, under its first name
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.decay = [decays(n, p, embedding_names) for n, p in zip(self.names, self.params)]
        with torch.no_grad():
            self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            self.master = [p.detach().float().clone() for p in self.params] if master_weights else None
        self.step_count = torch.zeros((), dtype=torch.float32, device=_local(self.params[0]).device)

    def grads(self) -> list[torch.Tensor]:
        """Local gradient tensors (zeros for a parameter that received none)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [_local(p.grad) for p in self.params]

    @torch.no_grad()
    def step(self, lr: float, found_inf: torch.Tensor | None = None) -> None:
        """One update of every parameter; with ``found_inf`` > 0 (on the device) nothing changes."""
        # the Adam step count advances only for applied updates, decided on the device
        self.step_count += 1.0 if found_inf is None else (found_inf.reshape(()) <= 0).float()
        grads = self.grads()
        step = self.step_count.clamp(min=1.0)
        for decay in (True, False):  # one fused launch per weight-decay group
            idx = [i for i, d in enumerate(self.decay) if d == decay]
            if not idx:
                continue

            def pick(tensors):
                return [_local(tensors[i]) for i in idx]

            ops.adamw_step(pick(self.params), pick(grads), pick(self.exp_avg), pick(self.exp_avg_sq), lr=lr,
                           beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                           weight_decay=self.weight_decay if decay else 0.0, step=step,
                           master_params=pick(self.master) if self.master is not None else None,
                           found_inf=found_inf)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by a stable name (DTensors under FSDP2)."""
        out = {"step": self.step_count}
        for i, name in enumerate(self.names):
            out[f"exp_avg.{name}"] = self.exp_avg[i]
            out[f"exp_avg_sq.{name}"] = self.exp_avg_sq[i]
            if self.master is not None:
                out[f"master.{name}"] = self.master[i]
        return out
