"""Networks and the one registry that maps the config to them.

Every model is called as `model(x, t, y)`: x (B, C, H, W), t (B,) in [0, 1], y (B,) long in
[0, num_classes] (num_classes = the null class); it exposes `num_classes`, `num_params()`,
`flops_per_image()` (forward multiply-adds per image) and `blocks`, an nn.ModuleList of its repeated
units that parallel.py checkpoints, compiles and shards one by one (each a self-contained module).

Model files take plain constructor arguments and know nothing of the config. `FAMILIES` says which
`model.*` keys each family reads; `resolve_model` fills them (explicit key > preset > MODEL_DEFAULTS)
and refuses a key the family does not read; `build_model` calls the constructor.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import MODEL_DEFAULTS, Config, ConfigError, DataConfig, ModelConfig
from .adm_unet import ADM_PRESETS, ADMUNet
from .dit import DIT_PRESETS, DiT
from .edm2_unet import EDM2_PRESETS, EDM2UNet
from .layers import set_attention_backend
from .mmdit import MMDIT_PRESETS, MMDiT

__all__ = ["build_model", "resolve_model", "preset_departures", "FAMILIES", "MODELS", "DiT", "DIT_PRESETS",
           "MMDiT", "MMDIT_PRESETS", "ADMUNet", "ADM_PRESETS", "EDM2UNet", "EDM2_PRESETS"]


@dataclass(frozen=True)
class Family:
    cls: type                                   # the network's class
    presets: dict[str, dict]                    # preset name -> the keys it fills
    keys: tuple[str, ...]                       # the model.* keys this family reads
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # model.* key -> constructor argument
    tuples: tuple[str, ...] = ()                # list keys the constructor takes as tuples
    note: str = ""                              # said when a key it does not read is set


_TRANSFORMER = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_register_tokens",
                "class_dropout_prob", "attn_impl", "attn_backend", "kernels")
_UNET = ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout", "channels_per_head",
         "class_dropout_prob")

FAMILIES: dict[str, Family] = {
    "dit": Family(DiT, DIT_PRESETS, _TRANSFORMER + ("qk_norm",)),
    "mmdit": Family(MMDiT, MMDIT_PRESETS, _TRANSFORMER + ("depth_single_blocks", "label_tokens", "class_embeddings"),
                    note="MMDiT always normalises q and k"),
    "adm_unet": Family(ADMUNet, ADM_PRESETS, _UNET + ("attn_impl", "attn_backend"),
                       renamed={"channels_per_head": "head_channels"}, tuples=("channel_mult", "attn_resolutions")),
    "edm2_unet": Family(EDM2UNet, EDM2_PRESETS, _UNET + ("label_balance", "concat_balance", "preconditioning",
                                                         "sigma_data", "uncertainty_weighting", "logvar_channels",
                                                         "kernels"),
                        tuples=("channel_mult", "attn_resolutions"), note="its cosine attention has no attn_impl"),
}
MODELS = {name: family.cls for name, family in FAMILIES.items()}   # model.name -> class
_KEYS = tuple(MODEL_DEFAULTS)


def _family(m: ModelConfig) -> Family:
    if m.name not in FAMILIES:
        raise ConfigError(f"unknown model.name '{m.name}'; valid names: {', '.join(FAMILIES)}")
    return FAMILIES[m.name]


def _preset(family: Family, m: ModelConfig) -> dict:
    if m.preset is None:
        return {}
    if m.preset not in family.presets:
        raise ConfigError(f"unknown model.preset '{m.preset}' for model.name={m.name}; "
                          f"valid presets: {', '.join(family.presets)}")
    return family.presets[m.preset]


def resolve_model(m: ModelConfig) -> dict[str, Any]:
    """The value of every model.* key the family reads: the explicit one (recipe or command line), else
    the preset's, else MODEL_DEFAULTS'. ConfigError for a key the family does not read that is set."""
    family = _family(m)
    unread = [k for k in _KEYS if k not in family.keys and getattr(m, k) is not None]
    if unread:
        note = f" ({family.note})" if family.note else ""
        raise ConfigError(f"model.{unread[0]}={getattr(m, unread[0])!r} is not read by model.name={m.name}{note}; "
                          f"remove it or set it to null. model.name={m.name} reads: {', '.join(family.keys)}")
    preset = _preset(family, m)
    values = {}
    for key in family.keys:
        value = getattr(m, key)
        values[key] = value if value is not None else preset.get(key, MODEL_DEFAULTS[key])
    return values


def preset_departures(m: ModelConfig) -> list[str]:
    """'key=value (preset: value)' for each key of the preset that the config sets otherwise."""
    preset = _preset(_family(m), m)
    return [f"model.{k}={getattr(m, k)!r} (the preset's: {v!r})" for k, v in preset.items()
            if getattr(m, k) is not None and getattr(m, k) != v]


def fill_model_config(m: ModelConfig) -> None:
    """Writes the resolved values into `m` (so the saved config shows the network that trained)."""
    for key, value in resolve_model(m).items():
        setattr(m, key, list(value) if isinstance(value, (list, tuple)) else value)


def build_model(cfg: Config, saved: dict | None = None) -> nn.Module:
    """The network of cfg.model for cfg.data's images; `saved` (tensors of a snapshot or checkpoint)
    supplies what a model would otherwise read from files named in the config (MMDiT's class_embeddings)."""
    m, d = cfg.model, cfg.data
    family = _family(m)
    values = resolve_model(m)
    backend = values.pop("attn_backend", "auto")
    path = values.pop("class_embeddings", None)
    if path:
        table = saved.get("y_embedder.table") if saved is not None else None
        values["class_embeddings"] = (table[:-1].float() if table is not None
                                      else load_class_embeddings(path, d.num_classes))
    kwargs = {family.renamed.get(k, k): tuple(v) if k in family.tuples else v for k, v in values.items()}
    try:
        model = family.cls(input_size=d.resolution, in_channels=d.channels, num_classes=d.num_classes, **kwargs)
    except ValueError as err:  # shape problems name the model.* keys to change
        preset = f" (preset {m.preset})" if m.preset else ""
        raise ConfigError(f"model.name={m.name}{preset} with data.resolution={d.resolution}: {err}; change "
                          f"the model.* keys ({', '.join(k for k in family.keys if k in _SHAPE_KEYS)}) or "
                          f"data.resolution") from None
    return set_attention_backend(model, backend)


_SHAPE_KEYS = ("patch_size", "hidden_size", "depth", "num_heads", "depth_single_blocks", "channels", "channel_mult",
               "num_res_blocks", "attn_resolutions", "channels_per_head")


def load_class_embeddings(path: str, num_classes: int) -> torch.Tensor:
    """The (num_classes, tokens, dim) tensor of model.class_embeddings: a safetensors file holding one
    tensor, or a tensor saved with torch.save (.pt / .pth). ConfigError naming the problem and the fix."""
    fix = ("save a float tensor of shape (data.num_classes, tokens, dim), e.g. "
           "safetensors.torch.save_file({'embeddings': t}, path), or set model.class_embeddings=null "
           "to learn the label tokens")
    if not os.path.isfile(path):
        raise ConfigError(f"model.class_embeddings: no file at '{path}'; {fix}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
            if len(tensors) != 1:
                raise ConfigError(f"model.class_embeddings: '{path}' holds {len(tensors)} tensors "
                                  f"({', '.join(tensors)}), expected exactly one; {fix}")
            embeddings = next(iter(tensors.values()))
        else:
            embeddings = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as err:  # a corrupt or foreign file: say which and how to make a good one
        raise ConfigError(f"model.class_embeddings: cannot read '{path}' ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise ConfigError(f"model.class_embeddings: '{path}' does not hold a float tensor; {fix}")
    if embeddings.dim() != 3 or embeddings.shape[0] != num_classes or 0 in embeddings.shape[1:]:
        raise ConfigError(f"model.class_embeddings: '{path}' holds a tensor of shape {tuple(embeddings.shape)}, "
                          f"expected (data.num_classes={num_classes}, tokens, dim) with tokens, dim >= 1; {fix}")
    if not torch.isfinite(embeddings).all():
        raise ConfigError(f"model.class_embeddings: '{path}' contains NaN or inf values; {fix}")
    return embeddings.float()
