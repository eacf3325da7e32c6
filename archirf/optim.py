"""Optimizer and learning-rate schedules; every schedule is a function of images seen."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.optim.adam import adam

from .config import OptimConfig
from .parallel import local_tensor as _local


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW, its update run on each parameter's local tensor.

    Under FSDP2 a parameter, its gradient and its two moments are DTensors sharded alike, so the
    update is element-wise on each rank's shard. torch's step hands all of them to the fused op as
    DTensors, and DTensor dispatch then checks and propagates the sharding of every tensor of the
    lists, every step: host time that grows with the number of parameters (it is most of the
    step's host time outside forward and backward). This step calls the same functional update
    (torch.optim.adam.adam, fused) on the local tensors: the same kernel on the same numbers, so
    bitwise the same result. The first step (which creates the state) and anything this does not
    cover (a closure, amsgrad, not fused) take torch's own step.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._local_step_ready():
            return super().step(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            adam([_local(p) for p in params], [_local(p.grad) for p in params],
                 [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states], [],
                 [_local(s["step"]) for s in states], fused=True, decoupled_weight_decay=group["decoupled_weight_decay"],
                 grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                 amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                 eps=group["eps"], maximize=group["maximize"])
        return None

    _fused_checked: Optional[tuple] = None     # the parameter set fused_update's checks passed for

    @torch.no_grad()
    def fused_update(self, grad_scale: Optional[torch.Tensor], emas: list[dict[torch.Tensor, torch.Tensor]],
                     rates: list[float]) -> bool:
        """This step and the EMAs' in one pass (archirf_kernels.adamw_ema_step): the gradients times `grad_scale`
        (clipping; None: as they are), AdamW, then each EMA (a map parameter -> its fp32 shadow) lerped toward the
        new weights by its rate. The optimizer state keeps torch's layout and per-parameter step counts, so
        checkpoints are the same either way. False (nothing done) where the kernel does not apply: the first
        step (the state does not exist yet), several parameter groups, or a tensor the kernel does not take."""
        import archirf_kernels as K
        from archirf_kernels import checks

        if len(self.param_groups) != 1 or not self._local_step_ready():
            return False
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params or group["maximize"]:      # dtypes, shapes, devices: the checks below, once per set
            return False
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        tensors = ([_local(p) for p in params], [_local(p.grad) for p in params],
                   [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states])
        ema_lists = [[_local(e[p]) for p in params] for e in emas]
        key = tuple(id(p) for p in params)
        if key != self._fused_checked:      # the argument checks once per set of parameters (host time)
            try:
                checks.adamw_ema_step(*tensors, ema_lists, rates, steps=steps)
            except ValueError:
                return False
            self._fused_checked = key
        torch._foreach_add_(steps, 1)       # torch keeps a count per parameter; the kernel reads each
        beta1, beta2 = group["betas"]
        K.adamw_ema_step(*tensors, steps, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], emas=ema_lists, ema_rates=rates, grad_scale=grad_scale,
                         impl="triton", check=False)
        return True

    def _local_step_ready(self) -> bool:
        """Fused, no amsgrad / capturable, and every parameter with a gradient has its state already
        (self.state is a defaultdict: a mere read of state[p] leaves an empty entry behind)."""
        return all(group["fused"] and not group["amsgrad"] and not group["differentiable"]
                   and not group["capturable"]
                   and all("exp_avg" in self.state.get(p, ()) for p in group["params"] if p.grad is not None)
                   for group in self.param_groups)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update (CUDA and CPU have one)
    return AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)


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
