"""Optimizer and learning-rate schedules; every schedule is a function of images seen."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one kernel for the whole update on the GPU
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(cfg: OptimConfig, images: int, total_images: int) -> float:
    """Learning rate after `images` images: linear warm-up, then constant / cosine / inverse sqrt."""
    lr = cfg.lr
    if cfg.warmup_images > 0:
        lr *= min(1.0, (images + 1) / cfg.warmup_images)
    if cfg.lr_schedule == "cosine":
        span = max(total_images - cfg.warmup_images, 1)
        progress = min(max(images - cfg.warmup_images, 0) / span, 1.0)
        lr *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.lr_schedule == "inv_sqrt":
        # EDM2 eq. (16): alpha_ref / sqrt(max(t / t_ref, 1)), t counted in images
        lr /= math.sqrt(max(images / cfg.decay_start_images, 1.0))
    return lr
