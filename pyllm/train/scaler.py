"""Dynamic loss scaling for fp16 training, with every decision made on the device (after Apex).

Per step: the loss is multiplied by ``scale`` before backward; ``unscale_(grads)`` multiplies the
gradients by 1/scale and sets ``found_inf`` in one fused op (pyllm.ops.unscale_and_check_); the
optimiser skips the update where found_inf is set (pyllm.ops.adamw_step takes it); ``update()`` backs
the scale off on an overflow or grows it after ``growth_interval`` clean steps
(pyllm.ops.update_loss_scale_). Nothing here calls ``.item()``: no per-parameter host sync.
"""

from __future__ import annotations

import torch

from pyllm import ops


class LossScaler:
    def __init__(self, init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int,
                 device):
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((1,), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(1, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.skipped = torch.zeros(1, dtype=torch.int64, device=device)  # steps skipped so far

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss.float() * self.scale.squeeze(0)

    def unscale_(self, grads: list[torch.Tensor], reduce_found_inf=None) -> torch.Tensor:
        """Unscale ``grads`` in place; returns found_inf (1,) fp32, > 0 when any gradient overflowed.
        ``reduce_found_inf`` combines the flag across ranks when each holds only a shard of the grads."""
        self.found_inf.zero_()
        ops.unscale_and_check_(grads, self.scale.reciprocal(), self.found_inf)
        if reduce_found_inf is not None:
            reduce_found_inf(self.found_inf)
        return self.found_inf

    def update(self) -> None:
        self.skipped += (self.found_inf > 0).long()
        ops.update_loss_scale_(self.scale, self.growth_tracker, self.found_inf, growth_factor=self.growth_factor,
                               backoff_factor=self.backoff_factor, growth_interval=self.growth_interval)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.state_dict().items():
            t.copy_(state[name])
