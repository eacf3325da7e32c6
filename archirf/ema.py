"""Exponential moving average of the weights, kept in fp32 whatever the training dtype.

The shadow is a dict name -> fp32 tensor shaped like each parameter as this rank holds it: under
FSDP2 a DTensor whose local part is this rank's shard. The update works on the local parts only,
so it needs no communication; checkpoints save the DTensors sharded (and reshard them on load);
`full_state_dict()` gathers whole tensors for snapshots and sampling. Names are the model's clean
parameter names (no activation-checkpointing or compile wrapper parts), as in its state_dict.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .parallel import clean_fqn, local_tensor as _local


def decay_per_step(batch_images: int, half_life_images: Optional[float], decay: Optional[float]) -> float:
    """Half-life in images (EDM2 §3.1 counts EMA length in images): beta = 0.5 ** (batch / half_life)."""
    if decay is not None:
        return decay
    return 0.5 ** (batch_images / half_life_images)


def _named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_fqn(n): p for n, p in model.named_parameters()}


class EMA:
    def __init__(self, model: nn.Module, *, half_life_images: Optional[float] = None,
                 decay: Optional[float] = None, start_images: int = 0):
        if (half_life_images is None) == (decay is None):
            raise ValueError("EMA needs exactly one of half_life_images and decay")
        self.half_life_images, self.decay, self.start_images = half_life_images, decay, start_images
        params = _named_params(model)
        self.names = list(params)  # frozen ones too (their average is themselves): a complete parameter set
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> None:
        params = _named_params(model)
        src = [_local(params[n]) for n in self.names]  # no grad here: the tensors themselves
        dst = [_local(self.shadow[n]) for n in self.names]
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
            if state[n] is not self.shadow[n]:  # DCP loads in place: nothing to copy then
                self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on the CPU. Every rank must call it (sharded entries are all-gathered one
        at a time); ranks with keep=False get an empty dict and hold no full copy."""
        out = {}
        for n in self.names:
            t = self.shadow[n]
            full = t.full_tensor().reshape(t.shape) if isinstance(t, DTensor) else t
            if keep:
                out[n] = full.to("cpu", copy=True)
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module, full: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
        """Writes the EMA weights into `model` (same architecture, unsharded), e.g. an eval copy for
        sampling; `full` is a `full_state_dict()` when the shadow is sharded."""
        params = _named_params(model)
        source = self.shadow if full is None else full
        for n in self.names:
            params[n].copy_(source[n])
        return model
