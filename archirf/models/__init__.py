"""Networks: `build_model(cfg)` returns the network cfg.model.name names, sized from cfg.model and cfg.data.

Every model is called as `model(x, t, y)`: x (B, C, H, W), t (B,) in [0, 1], y (B,) long in
[0, num_classes] (num_classes = the null class); it exposes `num_classes`, `num_params()` and
`flops_per_image()` (forward multiply-adds per image).
"""

from __future__ import annotations

import torch.nn as nn

from ..config import Config, ConfigError
from .dit import DIT_PRESETS, DiT
from .edm2_unet import EDM2_PRESETS, EDM2UNet

__all__ = ["build_model", "DiT", "DIT_PRESETS", "EDM2UNet", "EDM2_PRESETS"]


def build_model(cfg: Config) -> nn.Module:
    if cfg.model.name == "dit":
        return DiT.from_config(cfg)
    if cfg.model.name == "edm2_unet":
        return EDM2UNet.from_config(cfg)
    raise ConfigError(f"unknown model.name '{cfg.model.name}'; valid names: dit, edm2_unet")
