"""Networks and the one registry that maps the config to them.

Every model is called as `model(x, t, y)`: x (B, C, H, W), t (B,) in [0, 1], y (B,) long in
[0, num_classes] (num_classes = the null class); it exposes `num_classes`, `num_params()`,
`flops_per_image()` (forward multiply-adds per image) and `blocks`, an nn.ModuleList of its repeated
units that parallel.py checkpoints, compiles and shards one by one (each a self-contained module).

Model files take plain constructor arguments and know nothing of the config. archirf/families.py says
which `model.*` keys each family reads, config.resolve_model fills them (explicit key > preset >
MODEL_DEFAULTS) and refuses one the family does not read, and `FAMILIES` here maps them to each
constructor's arguments; `build_model` calls it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config, ConfigError, resolve_model
from ..families import FAMILY_KEYS
from .adm_unet import ADM_PRESETS, ADMUNet
from .dit import DIT_PRESETS, DiT
from .edm2_unet import EDM2_PRESETS, EDM2UNet
from .layers import set_attention_backend
from .mmdit import MMDIT_PRESETS, MMDiT

__all__ = ["build_model", "FAMILIES", "MODELS", "DiT", "DIT_PRESETS",
           "MMDiT", "MMDIT_PRESETS", "ADMUNet", "ADM_PRESETS", "EDM2UNet", "EDM2_PRESETS"]


@dataclass(frozen=True)
class Family:
    name: str                                   # model.name
    cls: type                                   # the network's class
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # model.* key -> constructor argument
    tuples: tuple[str, ...] = ()                # list keys the constructor takes as tuples

    @property
    def keys(self) -> tuple[str, ...]:          # the model.* keys it reads (archirf/families.py)
        return FAMILY_KEYS[self.name]


FAMILIES: dict[str, Family] = {
    "dit": Family("dit", DiT),
    "mmdit": Family("mmdit", MMDiT),
    "adm_unet": Family("adm_unet", ADMUNet, renamed={"channels_per_head": "head_channels"},
                       tuples=("channel_mult", "attn_resolutions")),
    "edm2_unet": Family("edm2_unet", EDM2UNet, tuples=("channel_mult", "attn_resolutions")),
}
# The generative networks (model(x, t, y)); model.name=autoencoder builds models/autoencoder.py's networks.
assert FAMILIES.keys() | {"autoencoder"} == FAMILY_KEYS.keys()
MODELS = {name: family.cls for name, family in FAMILIES.items()}   # model.name -> class


def build_model(cfg: Config, saved: dict | None = None) -> nn.Module:
    """The network of cfg.model for cfg.data's images; `saved` (tensors of a snapshot or checkpoint)
    supplies what a model would otherwise read from files named in the config (MMDiT's class_embeddings)."""
    m, d = cfg.model, cfg.data
    values = resolve_model(m)
    if m.name == "autoencoder":
        from .autoencoder import build_autoencoder

        try:
            return build_autoencoder(None, input_size=d.resolution, in_channels=d.channels, **values)
        except ValueError as err:
            raise ConfigError(f"model.name=autoencoder with data.resolution={d.resolution}: {err}; change the "
                              f"model.* keys (channels, channel_mult) or data.resolution") from None
    family = FAMILIES[m.name]
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
