"""The evaluation sample set: sample i has label i mod C (class-balanced) and noise from its own generator
seeded with seed + i (as EDM's seeds), so the set is the same for any number of ranks and any batch.

Batch k holds samples [k b, (k + 1) b) and goes to rank k mod W; a short last batch is padded (static
shapes for the compiled model) and the padding dropped. Stochastic samplers draw their per-step noise
from the same per-sample generators.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255, rounded to nearest (EDM's x * 127.5 + 128, truncated)."""
    return (x.float() * 127.5 + 128).clamp_(0, 255).to(torch.uint8)


def class_balanced_labels(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label of sample i: i mod num_classes (num / C per class, the first num mod C classes one more); 0 when
    unconditional."""
    return indices % num_classes if num_classes > 0 else torch.zeros_like(indices)


class PerSampleNoise:
    """One generator per sample, seeded with seed + index, on `device`: `randn_like(x)` draws row i of x from
    sample i's generator, so a sample's noise does not depend on which batch or rank it is in."""

    def __init__(self, indices: list[int], seed: int, device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(seed + i) for i in indices]

    def randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:]), x.device).to(x.dtype)


def guidance_scale(cfg, given: Optional[float] = None) -> float:
    """The guidance scale a sample set uses: `given`, else eval.cfg_scale, else sample.cfg_scale; 1 (none) for
    an unconditional model."""
    if cfg.data.num_classes == 0:
        return 1.0
    return given if given is not None else cfg.eval.cfg_scale if cfg.eval.cfg_scale is not None else cfg.sample.cfg_scale


def resolve_sampler(sampler: str, objective) -> str:
    """The sampler a sample set uses: `sampler`, or for "auto" the objective's first (euler / ddim)."""
    return objective.samplers[0] if sampler == "auto" else sampler


def batches_of_rank(num: int, batch: int, rank: int, world_size: int) -> list[list[int]]:
    """The global sample indices of each batch rank `rank` samples (the last may be short)."""
    starts = range(rank * batch, num, world_size * batch)
    return [list(range(s, min(s + batch, num))) for s in starts]


@torch.no_grad()
def sample_set(model: nn.Module, objective, cfg, *, num: int, batch: int, rank: int, world_size: int,
               device: torch.device, dtype: Optional[torch.dtype], steps: int, sampler: str, grid: str,
               cfg_scale: float, seed: int = 0) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yields (indices, samples (n, C, R, R) fp32 in the model's output space) for this rank's share of the
    `num`-sample set, `batch` at a time."""
    from ..sample import autocast_model_fn

    model.eval()
    c, r = cfg.data.channels, cfg.data.resolution
    null = cfg.data.num_classes if cfg.data.num_classes > 0 else None
    model_fn = autocast_model_fn(model, device, dtype)
    for indices in batches_of_rank(num, batch, rank, world_size):
        padded = indices + [indices[-1]] * (batch - len(indices))     # static shape; the copies are dropped
        noise = PerSampleNoise(padded, seed, device)
        labels = class_balanced_labels(torch.tensor(padded, device=device), cfg.data.num_classes)
        x = objective.sample(model_fn, noise.randn((c, r, r), device), labels, steps=steps, sampler=sampler,
                             cfg_scale=cfg_scale if null is not None else 1.0, null_class=null,
                             ddim_eta=cfg.sample.ddim_eta, grid=grid, noise_fn=noise.randn_like)
        yield indices, x[:len(indices)]
