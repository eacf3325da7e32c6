"""Training objectives: rectified flow and DDPM, each with its loss and samplers side by side.

Both expose `loss(model_fn, x, y) -> (B,) fp32` and `sample(model_fn, noise, y, *, steps, sampler,
cfg_scale, null_class, ddim_eta, return_trajectory)`; model_fn takes time in [0, 1].
"""

from __future__ import annotations

from archirf.config import Config
from archirf.objectives.ddpm import DDPM
from archirf.objectives.guidance import classifier_free_guidance
from archirf.objectives.rectified_flow import RectifiedFlow

__all__ = ["DDPM", "RectifiedFlow", "build_objective", "classifier_free_guidance"]


def build_objective(cfg: Config) -> RectifiedFlow | DDPM:
    """The objective named by cfg.objective.name, configured by cfg.objective."""
    name = cfg.objective.name
    if name == "rectified_flow":
        return RectifiedFlow(cfg.objective)
    if name == "ddpm":
        return DDPM(cfg.objective)
    raise ValueError(f"unknown objective.name={name!r}; use rectified_flow or ddpm")
