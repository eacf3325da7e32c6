"""Exponential moving average of the weights, kept in fp32 whatever the training dtype.

The shadow is a dict name -> fp32 tensor shaped like each parameter as this rank holds it (a local
shard under FSDP2), so the update needs no communication and checkpoints save it sharded.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def decay_per_step(batch_images: int, half_life_images: Optional[float], decay: Optional[float]) -> float:
    """Half-life in images (EDM2 §3.1 counts EMA length in images): beta = 0.5 ** (batch / half_life)."""
    if decay is not None:
        return decay
    return 0.5 ** (batch_images / half_life_images)


class EMA:
    def __init__(self, model: nn.Module, *, half_life_images: Optional[float] = None,
                 decay: Optional[float] = None, start_images: int = 0):
        if (half_life_images is None) == (decay is None):
            raise ValueError("EMA needs exactly one of half_life_images and decay")
        self.half_life_images, self.decay, self.start_images = half_life_images, decay, start_images
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> None:
        params = dict(model.named_parameters())
        src = [params[n].detach() for n in self.names]
        dst = [self.shadow[n] for n in self.names]
        if images_seen <= self.start_images:
            torch._foreach_copy_(dst, src)
            return
        beta = decay_per_step(batch_images, self.half_life_images, self.decay)
        # shadow <- beta * shadow + (1 - beta) * param, in fp32
        torch._foreach_lerp_(dst, [s.float() for s in src], 1.0 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for n in self.names:
            self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Writes the EMA weights into `model` (same architecture), e.g. an eval copy for sampling."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])
        return model
