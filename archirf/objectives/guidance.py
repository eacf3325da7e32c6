"""Classifier-free guidance and sampler-name checks shared by every objective."""

from __future__ import annotations

from typing import Callable, Optional

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t in [0,1], y) -> out


def check_sampler(sampler: str, samplers: tuple[str, ...], objective: str) -> str:
    """Resolves "auto" to the objective's first sampler; rejects a sampler of another objective."""
    sampler = samplers[0] if sampler == "auto" else sampler
    if sampler not in samplers:
        raise ValueError(f"sampler={sampler!r} does not apply to {objective}; use one of "
                         f"auto, {', '.join(samplers)}")
    return sampler


def classifier_free_guidance(model_fn: ModelFn, cfg_scale: float, null_class: Optional[int]) -> ModelFn:
    """Wraps model_fn so it returns the guided fp32 prediction u + s (c - u).

    Ho & Salimans 2022, eq. 6 with s = 1 + w. Conditional and unconditional halves run in ONE
    batched call (labels [y, null]). With s = 1 or no null class it is the plain model, unbatched.
    """
    if cfg_scale == 1.0 or null_class is None:
        return lambda x, t, y: model_fn(x, t, y).float()

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_null = torch.full_like(y, null_class)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float()  # (2B, ...)
        cond, uncond = out.chunk(2)                                                              # (B, ...)
        return uncond + cfg_scale * (cond - uncond)

    return guided
