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

from .layers import (AdaLNZeroBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, init_adaln_transformer_,
                     resolve_kernels, unpatchify)

from ..families import DIT_PRESETS  # noqa: F401  (the paper's sizes; re-exported)


# DiT's block and output layer are the shared adaLN-Zero pieces (MMDiT's single-stream blocks too).
DiTBlock = AdaLNZeroBlock


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
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (triton on CUDA, else sdpa)
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

    def initialize_weights(self) -> None:
        """DiT's initialization (layers.init_adaln_transformer_). Works on the meta device too."""
        init_adaln_transformer_(self, [self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight,
                                       self.t_embedder.mlp[2].weight])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long in [0, num_classes] -> (B, C, H, W)."""
        # The residual stream and the conditioning are fp32 whatever the parameters' dtype (parallel.py).
        h = self.x_embedder(x).float() + self.pos_embed.float()                        # (B, N, D)
        if self.num_register_tokens:
            registers = self.register_tokens.expand(h.shape[0], -1, -1)                 # (B, R, D)
            h = torch.cat([h, registers.float()], dim=1)                                # (B, N+R, D)
        c = self.t_embedder(t).float() + self.y_embedder(y, force_drop_ids).float()    # (B, D)
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
