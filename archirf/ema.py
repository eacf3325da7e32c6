"""Moving average of the weights, kept in fp32 whatever the training dtype: exponential (a fixed
decay per step, or a half-life in images) or EDM2's power-function EMA (a relative width sigma_rel).

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


SIGMA_REL_MAX = 1 / 12 ** 0.5   # gamma = 0: the plain average of every step so far


def power_function_exponent(sigma_rel: float) -> float:
    """EDM2 Eq. 3 solved for gamma: the averaging profile tau^gamma on [0, t] has standard deviation
    sigma_rel * t when sigma_rel^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1), i.e. the largest real root
    of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (got {sigma_rel})")
    s = sigma_rel ** -2
    f = lambda g: ((g + 2) ** 2 * (g + 3) - s * (g + 1))
    lo, hi = 0.0, s            # f(0) = 12 - s < 0 < f(s); f is convex, so it changes sign once in between
    for _ in range(200):       # bisection to float precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def power_function_beta(sigma_rel: float, images_seen: int, batch_images: int,
                        gamma: Optional[float] = None) -> float:
    """EDM2's per-step decay of the power-function EMA at t = images_seen (after the step):
    beta = (1 - batch / t) ** (gamma + 1); the first step (t = batch) gives 0, a copy of the weights.
    gamma: power_function_exponent(sigma_rel), when the caller keeps it."""
    gamma = power_function_exponent(sigma_rel) if gamma is None else gamma
    return (1 - batch_images / images_seen) ** (gamma + 1)


def _named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_fqn(n): p for n, p in model.named_parameters()}


class EMA:
    def __init__(self, model: nn.Module, *, half_life_images: Optional[float] = None,
                 decay: Optional[float] = None, sigma_rel: Optional[float] = None, start_images: int = 0):
        if sum(v is not None for v in (half_life_images, decay, sigma_rel)) != 1:
            raise ValueError("EMA needs exactly one of half_life_images, decay and sigma_rel")
        self.half_life_images, self.decay, self.sigma_rel = half_life_images, decay, sigma_rel
        self.gamma = power_function_exponent(sigma_rel) if sigma_rel is not None else None
        self.start_images = start_images
        params = _named_params(model)
        self.names = list(params)  # frozen ones too (their average is themselves): a complete parameter set
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    def rate(self, images_seen: int, batch_images: int) -> Optional[float]:
        """This step's lerp weight 1 - beta toward the weights, or None while the EMA is a plain copy
        (images_seen <= start_images)."""
        if images_seen <= self.start_images:
            return None
        beta = (power_function_beta(self.sigma_rel, images_seen, batch_images, self.gamma) if self.gamma is not None
                else decay_per_step(batch_images, self.half_life_images, self.decay))
        return 1.0 - beta

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> None:
        params = _named_params(model)
        src = [_local(params[n]) for n in self.names]  # no grad here: the tensors themselves
        dst = [_local(self.shadow[n]) for n in self.names]
        rate = self.rate(images_seen, batch_images)
        if rate is None:
            torch._foreach_copy_(dst, src)
            return
        # shadow <- beta * shadow + (1 - beta) * param, in fp32
        torch._foreach_lerp_(dst, [s.float() for s in src], rate)

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
