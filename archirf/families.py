"""The network families as the config sees them: the model.* keys each family reads, the keys it reads
only under a condition, and its presets (the papers' sizes). Plain data without torch: config.py
resolves the keys from it (explicit > preset > MODEL_DEFAULTS) and models/__init__.py maps them to the
constructors, so neither imports the other's world and the import graph has no cycle."""

from __future__ import annotations

# Sizes from DiT Table 1:  hidden_size, depth, num_heads
_DIT_SIZES = {
    "S":  (384,  12, 6),
    "B":  (768,  12, 12),
    "L":  (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PRESETS = {f"DiT-{size}/{p}": dict(hidden_size=h, depth=d, num_heads=n, patch_size=p)
               for size, (h, d, n) in _DIT_SIZES.items() for p in (2, 4, 8)}

# SD3's scaling family (Esser et al. 2024, Sec. 5.3): width 64 * depth, head width 64, patch 2.
_SD3_DEPTHS = (15, 18, 21, 24, 30, 38)
# hidden_size, depth (double-stream), depth_single_blocks, num_heads, patch_size
MMDIT_PRESETS = {
    **{f"MMDiT-d{d}": dict(hidden_size=64 * d, depth=d, depth_single_blocks=0, num_heads=d, patch_size=2)
       for d in _SD3_DEPTHS},
    "MMDiT-S/2":  dict(hidden_size=384,  depth=6, depth_single_blocks=0,  num_heads=6,  patch_size=2),   # 32x32 pixels
    "MMDiT-B/2":  dict(hidden_size=768,  depth=4, depth_single_blocks=8,  num_heads=12, patch_size=2),   # 32x32x4 latents
    # DiT-XL/2's width and 28 blocks (so about its FLOPs per token), head width 64, a third double-stream.
    "MMDiT-XL/2": dict(hidden_size=1152, depth=9, depth_single_blocks=19, num_heads=18, patch_size=2),
}

# base channels, channel multiplier per level, residual blocks per level, attention at these sides
ADM_PRESETS = {
    # 32x32 (CIFAR-10-like): improved DDPM's CIFAR-10 model (Nichol & Dhariwal 2021) with ADM's blocks.
    "ADM-32": dict(channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=3, attn_resolutions=[16, 8]),
    # 64x64: ADM's ImageNet-64 model (Dhariwal & Nichol 2021, Table 11; 296M parameters there).
    "ADM-64": dict(channels=192, channel_mult=[1, 2, 3, 4], num_res_blocks=3, attn_resolutions=[32, 16, 8]),
}

# EDM2 Table 2 / config G sizes: base channels and dropout from the table; channel_mult (1, 2, 3, 4), 3 blocks per
# level, attention at 16x16 and 8x8 for both ImageNet-512 latents (64x64x4) and ImageNet-64 pixels.
_CONFIG_G = dict(channel_mult=[1, 2, 3, 4], num_res_blocks=3, attn_resolutions=[16, 8])
EDM2_PRESETS = {
    "EDM2-XS":  dict(channels=128, dropout=0.0, **_CONFIG_G),
    "EDM2-S":   dict(channels=192, dropout=0.0, **_CONFIG_G),
    "EDM2-M":   dict(channels=256, dropout=0.1, **_CONFIG_G),
    "EDM2-L":   dict(channels=320, dropout=0.1, **_CONFIG_G),
    "EDM2-XL":  dict(channels=384, dropout=0.1, **_CONFIG_G),
    "EDM2-XXL": dict(channels=448, dropout=0.1, **_CONFIG_G),
}

# Autoencoders (archirf/models/autoencoder.py): the latent, the LDM layout's sizes, the norm and resampling.
AUTOENCODER_PRESETS = {
    # Stable Diffusion's VAE (LDM kl-f8): 256 px -> 4 x 32 x 32; SD3's 16-channel latent in the same layout.
    "KL-f8c4":  dict(latent="kl", channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                     z_channels=4, norm="group", resample="conv", mid_heads=1, qk_norm=False),
    "KL-f8c16": dict(latent="kl", channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                     z_channels=16, norm="group", resample="conv", mid_heads=1, qk_norm=False),
    # The seed's clipped autoencoder: 64 px -> 16 x 8 x 8, channel RMSNorm, bilinear resampling, a 4-head
    # mid attention with the seed's q / k norm, one bias-free qkv conv and softmax scale 1 / sqrt(C), and a
    # 1x1 output conv in the encoder.
    "Seed-f8c16": dict(latent="clipped", channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                       attn_resolutions=[], z_channels=16, norm="rms", resample="bilinear", mid_heads=4, qk_norm=True,
                       attn_style="seed", encoder_out_kernel=1),
}

PRESETS = {"dit": DIT_PRESETS, "mmdit": MMDIT_PRESETS, "adm_unet": ADM_PRESETS, "edm2_unet": EDM2_PRESETS,
           "autoencoder": AUTOENCODER_PRESETS}

_TRANSFORMER = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_register_tokens",
                "class_dropout_prob", "attn_impl", "attn_backend", "kernels")
_UNET = ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout", "channels_per_head",
         "class_dropout_prob")
# model.name -> the model.* keys it reads (besides name and preset)
FAMILY_KEYS = {
    "dit": _TRANSFORMER + ("qk_norm",),
    "mmdit": _TRANSFORMER + ("depth_single_blocks", "label_tokens", "class_embeddings"),
    "adm_unet": _UNET + ("attn_impl", "attn_backend"),
    "edm2_unet": _UNET + ("label_balance", "concat_balance", "preconditioning", "sigma_data", "uncertainty_weighting",
                          "logvar_channels", "kernels"),
    "autoencoder": ("channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout", "latent", "z_channels",
                    "norm", "resample", "mid_heads", "qk_norm", "attn_style", "encoder_out_kernel", "kernels"),
}
# said when a key a family does not read is set
FAMILY_NOTES = {"mmdit": "MMDiT always normalises q and k", "edm2_unet": "its cosine attention has no attn_impl"}


def unread_keys(name: str, values: dict) -> dict[str, str]:
    """{key: why} for the keys of a family that its other (resolved) values leave unread."""
    why = {}
    if name == "edm2_unet":
        if values["preconditioning"] != "edm":
            why["sigma_data"] = "it scales EDM's preconditioning: set model.preconditioning=edm"
        if not values["uncertainty_weighting"]:
            why["logvar_channels"] = "it sizes the learned loss weight: set model.uncertainty_weighting=true"
    if "attn_backend" in values:
        qk_norm = name == "mmdit" or values.get("qk_norm", False)
        if not (values["attn_impl"] == "triton" or (values["attn_impl"] == "auto" and qk_norm)):
            why["attn_backend"] = ("it picks the backend of the QK-norm attention op, which runs with "
                                   "model.attn_impl=triton, or auto with QK-norm attention")
    return why
