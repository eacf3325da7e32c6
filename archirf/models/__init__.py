"""Networks: `build_model(cfg)` returns the network cfg.model.name names, sized from cfg.model and cfg.data.

Every model is called as `model(x, t, y)`: x (B, C, H, W), t (B,) in [0, 1], y (B,) long in
[0, num_classes] (num_classes = the null class); it exposes `num_classes`, `num_params()`,
`flops_per_image()` (forward multiply-adds per image) and `blocks`, an nn.ModuleList of its repeated
units that parallel.py checkpoints, compiles and shards one by one (each a self-contained module).
"""

from __future__ import annotations

import torch.nn as nn

from ..config import Config, ConfigError
from .adm_unet import ADM_PRESETS, ADMUNet
from .dit import DIT_PRESETS, DiT
from .edm2_unet import EDM2_PRESETS, EDM2UNet
from .layers import set_attention_backend
from .mmdit import MMDIT_PRESETS, MMDiT

__all__ = ["build_model", "MODELS", "DiT", "DIT_PRESETS", "MMDiT", "MMDIT_PRESETS", "ADMUNet", "ADM_PRESETS",
           "EDM2UNet", "EDM2_PRESETS"]

MODELS = {"dit": DiT, "mmdit": MMDiT, "adm_unet": ADMUNet, "edm2_unet": EDM2UNet}   # model.name -> class


def build_model(cfg: Config, saved: dict | None = None) -> nn.Module:
    """The network of cfg.model; `saved` (tensors of a snapshot or checkpoint) supplies what a model
    would otherwise read from files named in the config (MMDiT's class_embeddings table)."""
    if cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model.name '{cfg.model.name}'; valid names: {', '.join(MODELS)}")
    if cfg.model.name == "mmdit" and saved is not None and "y_embedder.table" in saved:
        model = MMDiT.from_config(cfg, class_table=saved["y_embedder.table"])
    else:
        model = MODELS[cfg.model.name].from_config(cfg)
    return set_attention_backend(model, cfg.model.attn_backend)
