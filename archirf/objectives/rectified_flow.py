"""Rectified flow: linear interpolation between data and noise, velocity regression, ODE samplers.

    x_t = (1 - t) x + t eps,   v = eps - x,   t = 1 is pure noise      (Liu et al. 2022, eq. 1;
                                                                       SD3 = Esser et al. 2024, §2)
Training draws t ~ uniform or logit-normal (SD3 §3.1), optionally moved towards noise by the
resolution shift (SD3 §5.3.2); sampling integrates dx/dt = v(x, t) from t = 1 to t = 0 with Euler
or Heun over the same shifted grid. All schedule math is fp32; model outputs are cast to fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

from archirf.config import ObjectiveConfig
from archirf.objectives.guidance import ModelFn, check_sampler, classifier_free_guidance

def broadcast_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against `like` (B, C, H, W)."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def regression_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, mean over non-batch dims -> (B,) fp32. A model that weights its loss per sample
    returns (pred, logvar (B,)) instead of pred; the loss is then mse * exp(-logvar) + logvar (EDM2 Eq. 21,
    Kendall & Gal 2017: logvar a learned u(t), and/or minus the log of a fixed weight)."""
    pred, logvar = out if isinstance(out, tuple) else (out, None)
    mse = (pred.float() - target).square().mean(dim=tuple(range(1, target.ndim)))
    return mse if logvar is None else mse * torch.exp(-logvar.float()) + logvar.float()


# --- time: sampling and shift ------------------------------------------------------------------------

def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent shift t' = s t / (1 + (s - 1) t)  (SD3 §5.3.2, eq. 23 with s = sqrt(m/n)).

    Monotone, fixes 0 and 1; s > 1 moves time towards noise. s = 1 is the identity.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_logit_normal(n: int, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2)  (SD3 §3.1, eq. 19); median sigmoid(mean). -> (n,) fp32."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, dtype=torch.float32))


def sample_uniform(n: int, device: torch.device) -> torch.Tensor:
    """t ~ U[0, 1). -> (n,) fp32."""
    return torch.rand(n, device=device, dtype=torch.float32)


# --- forward process and target ----------------------------------------------------------------------

def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps  (Liu et al. 2022, eq. 1); t (B,) broadcasts over (B, C, H, W)."""
    t = broadcast_batch(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = d x_t / dt = eps - x  (the regression target of eq. 1)."""
    return noise - x


# --- sampling grid and integrators ------------------------------------------------------------------

def sampling_grid(steps: int, shift: float, device: torch.device) -> torch.Tensor:
    """Times t_0 = 1 > t_1 > ... > t_N = 0 with t_i = shift(1 - i/N). -> (N + 1,) fp32.

    Without shift every dt = 1/N. Computed in fp64 so the endpoints are exactly 1 and 0 for any s.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return time_shift(t, shift).clamp(0, 1).to(device=device, dtype=torch.float32)


# Karras et al. 2022 (EDM) / EDM2's sampling schedule: noise levels sigma_max -> sigma_min spaced by rho.
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def edm_sampling_grid(steps: int, device: torch.device, sigma_min: float = EDM_SIGMA_MIN,
                      sigma_max: float = EDM_SIGMA_MAX, rho: float = EDM_RHO) -> torch.Tensor:
    """EDM's sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, in RF's
    time t = sigma / (1 + sigma) (x_t = x_sigma / (1 + sigma)), then t_N = 0. -> (N + 1,) fp32.

    The first model call is at sigma_max (t = 80/81), inside the noise levels a log-normal training
    distribution covers, where a grid from t = 1 asks the network about sigma = inf."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    sigma = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([sigma / (1 + sigma), torch.zeros(1, dtype=torch.float64)])
    return t.to(device=device, dtype=torch.float32)


SAMPLING_GRIDS = ("uniform", "edm")


def euler_step(v_fn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); t, t_next are 0-d tensors."""
    return x + (t_next - t) * v_fn(x, t)


def heun_step(v_fn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Heun's 2nd-order step (trapezoid of v at both ends, Karras et al. 2022, Alg. 1)."""
    dt = t_next - t
    v = v_fn(x, t)
    x_euler = x + dt * v
    return x + dt * 0.5 * (v + v_fn(x_euler, t_next))


class RectifiedFlow:
    """Loss and samplers of rectified flow, configured by an ObjectiveConfig."""

    samplers = ("euler", "heun")  # the first is what "auto" means

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        """Training times t ~ uniform or logit-normal, then the resolution shift. -> (n,) fp32."""
        c = self.cfg
        if c.time_sampling == "uniform":
            t = sample_uniform(n, device)
        elif c.time_sampling == "logit_normal":
            t = sample_logit_normal(n, c.logit_normal_mean, c.logit_normal_std, device)
        else:
            raise ValueError(f"unknown objective.time_sampling={c.time_sampling!r}; use uniform or logit_normal")
        return time_shift(t, c.time_shift)

    def loss(self, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *,
             noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample velocity MSE, mean over non-batch dims. -> (B,) fp32.

        noise and t are drawn from the global RNG on x's device unless given (tests, fixed-t eval).
        """
        x = x.float()                                                            # (B, C, H, W)
        noise = torch.randn_like(x) if noise is None else noise.float()
        t = self.sample_time(x.shape[0], x.device) if t is None else t.float()   # (B,)
        return regression_loss(model_fn(interpolate(x, noise, t), t, y), velocity_target(x, noise))

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, *, steps: int,
               sampler: str = "auto", cfg_scale: float = 1.0, null_class: Optional[int] = None,
               ddim_eta: float = 0.0, return_trajectory: bool = False, grid: str = "uniform",
               noise_fn=None):
        """Integrates dx/dt = v(x, t) from x_{t_0} to x_0 over `sampling_grid(steps)` (grid='uniform', with
        objective.time_shift; t_0 = 1, x_1 = noise) or `edm_sampling_grid(steps)` (grid='edm'; t_0 = 80/81
        and x_{t_0} = t_0 * noise, as EDM starts from sigma_max * noise, leaving out the data's 1/81 share).

        euler: N model calls at t_0 = 1, ..., t_{N-1} > 0 (never at t = 0).
        heun: 2nd-order correction on every step except the last one (into t = 0), which is a plain
        Euler step, so the model is never evaluated at t = 0: 2N - 1 model calls.
        ddim_eta and noise_fn are accepted for a uniform interface and unused (the RF samplers are deterministic).
        Returns x0 (B, C, H, W) fp32, or (x0, [x_1, ..., x_0]) with N + 1 states on noise's device.
        """
        sampler = check_sampler(sampler, self.samplers, "rectified flow")
        guided = classifier_free_guidance(model_fn, cfg_scale, null_class)
        if grid not in SAMPLING_GRIDS:
            raise ValueError(f"unknown sampling grid '{grid}'; choose one of {', '.join(SAMPLING_GRIDS)}")
        batch = noise.shape[0]
        v_fn = lambda x_, t_: guided(x_, t_.expand(batch), y)                    # t_ 0-d -> (B,)
        grid = (sampling_grid(steps, self.cfg.time_shift, noise.device) if grid == "uniform"
                else edm_sampling_grid(steps, noise.device))                    # (N + 1,)
        x = noise.float() * grid[0]                                              # (B, C, H, W)
        trajectory = [x]
        for i in range(steps):
            t, t_next = grid[i], grid[i + 1]
            last = i == steps - 1
            x = heun_step(v_fn, x, t, t_next) if sampler == "heun" and not last else euler_step(v_fn, x, t, t_next)
            if return_trajectory:
                trajectory.append(x)
        return (x, trajectory) if return_trajectory else x
