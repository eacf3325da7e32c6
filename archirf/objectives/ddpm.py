"""DDPM: discrete-time Gaussian diffusion with ε-prediction, ancestral and DDIM samplers.

    x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε,   ᾱ_t = prod_{s <= t} (1 - β_s)      (Ho et al. 2020, eq. 4)

Betas are linear (Ho et al. 2020 §4) or cosine (Nichol & Dhariwal 2021, eq. 17). The model sees time
t_index / num_timesteps in [0, 1), in training and sampling alike. Sampling with fewer steps than
num_timesteps runs on an evenly strided subsequence with betas recomputed from ᾱ (improved-DDPM
respacing, Nichol & Dhariwal 2021 App. B); DDIM(η) follows Song et al. 2021, eq. 12 and 16.
Schedules are precomputed in fp64 and cast to fp32 on the inputs' device when used.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from archirf.config import ObjectiveConfig
from archirf.objectives.guidance import ModelFn, check_sampler, classifier_free_guidance
from archirf.objectives.rectified_flow import broadcast_batch, regression_loss


# --- schedules (fp64, CPU) ---------------------------------------------------------------------------

def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t evenly spaced from beta_start to beta_end (Ho et al. 2020 §4). -> (T,) fp64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 - ᾱ(t+1)/ᾱ(t), 0.999), ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
    (Nichol & Dhariwal 2021, eq. 17; the clip avoids the singularity at t = T). -> (T,) fp64."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2                 # (T + 1,)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = prod_{s <= t} (1 - β_s)  (Ho et al. 2020, eq. 4 notation)."""
    return torch.cumprod(1 - betas, dim=0)


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` evenly strided indices from 0 to T - 1, both included (improved-DDPM
    `space_timesteps`); one step uses T - 1 only (starting from noise). Ascending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, num_timesteps={num_timesteps}] (got {steps})")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def respaced_betas(alpha_bar: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """β'_k = 1 - ᾱ_{τ_k} / ᾱ_{τ_{k-1}} (ᾱ_{τ_{-1}} = 1): the subsequence keeps the marginals
    q(x_{τ_k} | x_0) exactly (Nichol & Dhariwal 2021 App. B). -> (K,) fp64."""
    sub = alpha_bar[timesteps]                                                   # (K,)
    prev = torch.cat([sub.new_ones(1), sub[:-1]])
    return 1 - sub / prev


class DDPM:
    """Loss and samplers of ε-prediction diffusion, configured by an ObjectiveConfig."""

    samplers = ("ddim", "ancestral")  # the first is what "auto" means

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        if cfg.beta_schedule == "linear":
            self.betas = linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)   # (T,) fp64
        elif cfg.beta_schedule == "cosine":
            self.betas = cosine_betas(cfg.num_timesteps)
        else:
            raise ValueError(f"unknown objective.beta_schedule={cfg.beta_schedule!r}; use linear or cosine")
        self.alphas_cumprod = alphas_cumprod(self.betas)                                # (T,) fp64
        self._alphas_cumprod_on: dict[torch.device, torch.Tensor] = {}

    def alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """ᾱ as fp32 on `device`, copied there once."""
        if device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._alphas_cumprod_on[device]

    def model_time(self, t_index: torch.Tensor) -> torch.Tensor:
        """Integer timestep -> the model's time t_index / T in [0, 1), fp32."""
        return t_index.float() / self.num_timesteps

    def noised(self, x: torch.Tensor, noise: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε  (Ho et al. 2020, eq. 4)."""
        a = broadcast_batch(self.alphas_cumprod_on(x.device)[t_index], x)         # (B, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def loss(self, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *,
             noise: Optional[torch.Tensor] = None, t_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample ε MSE (Ho et al. 2020, eq. 14 'L_simple'), mean over non-batch dims. -> (B,) fp32.

        noise and t_index (uniform in {0..T-1}) come from the global RNG on x's device unless given.
        """
        x = x.float()                                                                    # (B, C, H, W)
        noise = torch.randn_like(x) if noise is None else noise.float()
        if t_index is None:
            t_index = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)  # (B,)
        return regression_loss(model_fn(self.noised(x, noise, t_index), self.model_time(t_index), y), noise)

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, *, steps: int,
               sampler: str = "auto", cfg_scale: float = 1.0, null_class: Optional[int] = None,
               ddim_eta: float = 0.0, return_trajectory: bool = False, grid: str = "uniform",
               noise_fn=None):
        """Reverse process from x_T = noise over `steps` respaced timesteps; one model call per step.
        grid: 'uniform' only (the respacing), accepted for the samplers' common interface. noise_fn(x) draws
        the stochastic samplers' per-step noise (default torch.randn_like; eval: per-sample generators).

        ancestral: p(x_{t-1} | x_t) with posterior variance β̃ (Ho et al. 2020, eq. 6-7, 11).
        ddim: Song et al. 2021, eq. 12 with σ(η) of eq. 16; η = 0 is deterministic, η = 1 equals
        ancestral. No clipping of the x0 prediction (latents are unbounded).
        Returns x0 (B, C, H, W) fp32, or (x0, [x_T, ..., x_0]) with steps + 1 states on noise's device.
        """
        sampler = check_sampler(sampler, self.samplers, "ddpm")
        if grid != "uniform":
            raise ValueError(f"sampling grid '{grid}' is rectified flow's; DDPM samples over its respaced timesteps")
        guided = classifier_free_guidance(model_fn, cfg_scale, null_class)
        x = noise.float()                                                                # (B, C, H, W)
        noise_fn = noise_fn or torch.randn_like
        device, batch = x.device, x.shape[0]

        timesteps = respaced_timesteps(self.num_timesteps, steps)                        # ascending, K
        a_bar = self.alphas_cumprod[timesteps]                                           # (K,) fp64
        a_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])                              # ᾱ_{τ_{k-1}}
        beta = respaced_betas(self.alphas_cumprod, timesteps)                            # (K,)
        if sampler == "ancestral":
            # mean = (x - β/sqrt(1-ᾱ) ε)/sqrt(α) (eq. 11); var β̃ = β (1-ᾱ_prev)/(1-ᾱ) (eq. 7)
            coef_x, coef_eps = 1 / (1 - beta).sqrt(), -beta / ((1 - a_bar).sqrt() * (1 - beta).sqrt())
            sigma = (beta * (1 - a_prev) / (1 - a_bar)).sqrt()
        else:
            # x_prev = sqrt(ᾱ_prev) x0 + sqrt(1-ᾱ_prev-σ²) ε + σ z, x0 = (x - sqrt(1-ᾱ) ε)/sqrt(ᾱ) (eq. 12)
            sigma = ddim_eta * ((1 - a_prev) / (1 - a_bar) * (1 - a_bar / a_prev)).sqrt()  # eq. 16
            coef_x = (a_prev / a_bar).sqrt()
            coef_eps = (1 - a_prev - sigma**2).clamp(min=0).sqrt() - coef_x * (1 - a_bar).sqrt()
        coef_x, coef_eps, sigma = (c.to(device=device, dtype=torch.float32) for c in (coef_x, coef_eps, sigma))
        model_t = self.model_time(torch.tensor(timesteps, device=device))                # (K,) fp32

        trajectory = [x]
        for k in reversed(range(len(timesteps))):
            eps = guided(x, model_t[k].expand(batch), y)
            x = coef_x[k] * x + coef_eps[k] * eps
            if k > 0 and (sampler == "ancestral" or ddim_eta > 0):   # σ_0 = 0: no noise into x_0
                x = x + sigma[k] * noise_fn(x)
            if return_trajectory:
                trajectory.append(x)
        return (x, trajectory) if return_trajectory else x
