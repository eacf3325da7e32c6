"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie 2023), as a rectified-flow / DDPM network.

    model = DiT(input_size=32, in_channels=4, num_classes=1000, **DIT_PRESETS["DiT-XL/2"])
    out = model(x, t, y)          # x (B, C, H, W), t (B,) in [0, 1], y (B,) in [0, num_classes]

Differences from facebookresearch/DiT: no learned sigma (output channels = input channels);
`num_register_tokens` learned tokens join the sequence (Darcet et al. 2024, "Vision Transformers
Need Registers"); optional per-head QK-RMSNorm (SD3); the label table always has a null row so
guidance works whatever the dropout probability.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import archirf_kernels

from ..config import Config, ConfigError
from .layers import (Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate, resolve_kernels,
                     sincos_pos_embed_2d, unpatchify, use_fused_kernels)

# Sizes from DiT Table 1:  hidden_size, depth, num_heads
_DIT_SIZES = {
    "S":  (384,  12, 6),
    "B":  (768,  12, 12),
    "L":  (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PRESETS = {f"DiT-{size}/{p}": dict(hidden_size=h, depth=d, num_heads=n, patch_size=p)
               for size, (h, d, n) in _DIT_SIZES.items() for p in (2, 4, 8)}


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT Sec. 3.2, Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 attn_impl: str = "auto", kernels: str = "reference"):
        super().__init__()
        self.kernels = resolve_kernels(kernels)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # Regresses shift, scale, gate for attention and for the MLP from the conditioning vector c.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # (B, 1, D) each: broadcast over the tokens.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1))
        if use_fused_kernels(self.kernels, x):
            # The same math with the block boundary fused: one pass for x += gate * attn, LN, modulate.
            h = archirf_kernels.ada_layer_norm(x, shift_msa, scale_msa, eps=self.norm1.eps, impl="triton")
            x, h = archirf_kernels.gated_residual_ada_layer_norm(
                x, self.attn(h), gate_msa, shift_mlp, scale_mlp, eps=self.norm2.eps, impl="triton")
            return archirf_kernels.gated_residual(x, self.mlp(h), gate_mlp, impl="triton")      # (B, T, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))   # (B, T, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))    # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear map from each token to its p x p x C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, kernels: str = "reference"):
        super().__init__()
        self.kernels = resolve_kernels(kernels)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)         # (B, 1, D) each
        if use_fused_kernels(self.kernels, x):
            h = archirf_kernels.ada_layer_norm(x, shift, scale, eps=self.norm_final.eps, impl="triton")
            return self.linear(h)                                                     # (B, N, p*p*C)
        return self.linear(modulate(self.norm_final(x), shift, scale))                # (B, N, p*p*C)


class DiT(nn.Module):
    """Diffusion transformer over patch tokens, conditioned on time and class through adaLN-Zero."""

    def __init__(self,
        input_size: int = 32,                   # image/latent side (square), multiple of patch_size
        in_channels: int = 4,                   # C of x; the output has the same C
        num_classes: int = 1000,                # label id num_classes is the null class; 0 = unconditional
        patch_size: int = 2,                    # pixels (latent cells) per token side
        hidden_size: int = 1152,                # transformer width D
        depth: int = 28,                        # number of DiTBlocks
        num_heads: int = 16,                    # attention heads
        mlp_ratio: float = 4.0,                 # MLP hidden = mlp_ratio * D
        class_dropout_prob: float = 0.1,        # label dropout in train mode (classifier-free guidance)
        num_register_tokens: int = 4,           # learned extra tokens without position, dropped at the output
        qk_norm: bool = False,                  # per-head RMSNorm of q and k (SD3)
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (triton on CUDA with qk_norm)
        kernels: str = "auto",                  # auto (triton on CUDA) | reference | triton: fused adaLN ops
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.kernels = resolve_kernels(kernels)  # 'auto' stays 'auto' (decided per call on the device) if triton is installed
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.num_classes = num_classes
        self.num_register_tokens = num_register_tokens
        self.hidden_size = hidden_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos positions; filled by initialize_weights() (so a meta-device model can be
        # materialized with to_empty() + initialize_weights()). Persistent so that loading a
        # checkpoint into a model materialized from meta restores it too.
        self.register_buffer("pos_embed", torch.empty(1, self.num_patches, hidden_size))
        self.register_tokens = nn.Parameter(torch.empty(1, num_register_tokens, hidden_size))
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attn_impl=attn_impl, kernels=self.kernels)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, kernels=self.kernels)
        self.attn_impl = self.blocks[0].attn.attn_impl
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialization. Works on the meta device too (the fills are then no-ops)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid_size, self.grid_size)
                             .float().unsqueeze(0))

        # The patch embedding is a linear map of the flattened patch: initialize it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.register_tokens, std=0.02)
        for block in self.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                if hasattr(norm, "weight"):
                    nn.init.ones_(norm.weight)

        # adaLN-Zero (DiT Sec. 3.2): zero modulation makes every gate 0, so each block starts as the
        # identity, and a zero output layer makes the fresh network predict exactly 0. Training then
        # starts from a well-conditioned residual stack (DiT Fig. 5: best FID of the conditioning variants).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long in [0, num_classes] -> (B, C, H, W)."""
        # The residual stream takes the parameters' dtype (fp32 under autocast, as in DiT).
        param_dtype = self.register_tokens.dtype
        h = self.x_embedder(x) + self.pos_embed.to(param_dtype)                       # (B, N, D)
        if self.num_register_tokens:
            registers = self.register_tokens.expand(h.shape[0], -1, -1)                 # (B, R, D)
            h = torch.cat([h, registers.to(h.dtype)], dim=1)                            # (B, N+R, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)                    # (B, D)
        for block in self.blocks:
            h = block(h, c)                                                             # (B, N+R, D)
        h = self.final_layer(h[:, :self.num_patches], c)                                # (B, N, p*p*C)
        return unpatchify(h, self.patch_size, self.grid_size, self.grid_size)           # (B, C, H, W)

    def num_params(self) -> int:
        """Trainable parameters (the fixed positional table is a buffer and not counted)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Forward multiply-adds for one image: every Linear, the patch Conv2d, and the two attention
        matmuls (Q K^T and softmax(.) V), over N patch tokens plus R register tokens. Not counted:
        norms, softmax, activations, modulation, residual adds, embedding lookups (all O(T D)).
        Training FLOPs = 6 x this (2 per MAC, 3 passes)."""
        D, N, T = self.hidden_size, self.num_patches, self.num_patches + self.num_register_tokens
        C, p = self.in_channels, self.patch_size
        freq = self.t_embedder.frequency_embedding_size
        mlp_hidden = self.blocks[0].mlp.fc1.out_features
        block = (D * 6 * D                         # adaLN modulation (once per image)
                 + T * D * 3 * D                   # qkv projection
                 + 2 * T * T * D                   # Q K^T and attention @ V, all heads
                 + T * D * D                       # attention output projection
                 + 2 * T * D * mlp_hidden)         # MLP fc1 + fc2
        return (N * (C * p * p) * D                # patch embedding
                + freq * D + D * D                 # timestep MLP
                + len(self.blocks) * block
                + D * 2 * D                        # final adaLN
                + N * D * (p * p * self.out_channels))  # final linear

    @classmethod
    def from_config(cls, cfg: Config) -> "DiT":
        """Builds from cfg.model (preset overrides hidden_size/depth/num_heads/patch_size) and cfg.data."""
        m, d = cfg.model, cfg.data
        shape = dict(hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size)
        if m.preset is not None:
            if m.preset not in DIT_PRESETS:
                raise ConfigError(f"unknown model.preset '{m.preset}'; valid presets: {', '.join(DIT_PRESETS)}")
            shape = DIT_PRESETS[m.preset]
        if d.resolution % shape["patch_size"]:
            raise ConfigError(f"data.resolution ({d.resolution}) must be a multiple of the patch size "
                              f"({shape['patch_size']}{' of ' + m.preset if m.preset else ''})")
        if shape["hidden_size"] % shape["num_heads"]:
            raise ConfigError(f"model.hidden_size ({shape['hidden_size']}) must be divisible by "
                              f"model.num_heads ({shape['num_heads']})")
        return cls(input_size=d.resolution, in_channels=d.channels, num_classes=d.num_classes,
                   mlp_ratio=m.mlp_ratio, class_dropout_prob=m.class_dropout_prob,
                   num_register_tokens=m.num_register_tokens, qk_norm=m.qk_norm, attn_impl=m.attn_impl,
                   kernels=m.kernels, **shape)
