"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers"), trained class-conditionally.

    model = MMDiT(input_size=32, in_channels=4, num_classes=1000, **MMDIT_PRESETS["MMDiT-XL/2"])
    out = model(x, t, y)          # x (B, C, H, W), t (B,) in [0, 1], y (B,) in [0, num_classes]

Two token streams: image patches and a context sequence that stands in for SD3's text. Double-stream
blocks give each stream its own weights (qkv, QK-RMSNorm, output projection, MLP, adaLN-Zero
modulation) and let both attend jointly over their concatenation; `depth_single_blocks` single-stream
blocks then run over the concatenated sequence (SD3.5 / Flux). The context is the class: either K
learned tokens per class (`label_tokens`), or fixed pretrained class embeddings (num_classes, tokens,
dim_in) projected to the width, whose null class is an all-zero embedding. Its mean over the tokens
is the pooled condition that joins the timestep in the global adaLN vector (SD3's pooled text
vector). `num_register_tokens` learned tokens (Darcet et al. 2024) join the context stream.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from .layers import (AdaLNZeroBlock, FinalLayer, LabelEmbedder, PatchEmbed, PretrainedLabelEmbedder, TimestepEmbedder,
                     init_adaln_transformer_, joint_attention, resolve_kernels,
                     unpatchify)

from ..families import MMDIT_PRESETS  # noqa: F401  (re-exported)


class DoubleStreamBlock(nn.Module):
    """SD3's MM-DiT block (Fig. 2b): one adaLN-Zero block per stream, split around a joint attention.

    forward(img (B, N, D), ctx (B, M, D), c (B, D)) -> (img, ctx). pre_only: the context stream stops
    after its qkv (the last block when no single-stream blocks follow; nothing reads its output).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "auto",
                 kernels: str = "reference", pre_only: bool = False):
        super().__init__()
        self.img = AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, qk_norm=True, attn_impl=attn_impl,
                                  kernels=kernels)
        self.ctx = AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, qk_norm=True, attn_impl=attn_impl,
                                  kernels=kernels, pre_only=pre_only)

    def forward(self, img: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mod_img, mod_ctx = self.img.modulation(c), self.ctx.modulation(c)
        qkv_img = self.img.attn.project_qkv(self.img.pre_attention(img, mod_img))          # (B, N, 3, H, Dh)
        qkv_ctx = self.ctx.attn.project_qkv(self.ctx.pre_attention(ctx, mod_ctx))          # (B, M, 3, H, Dh)
        out_img, out_ctx = joint_attention(qkv_img, qkv_ctx, self.img.attn, self.ctx.attn)  # (B, N|M, D)
        img = self.img.post_attention(img, self.img.attn.proj(out_img), mod_img)          # (B, N, D)
        if not self.ctx.pre_only:
            ctx = self.ctx.post_attention(ctx, self.ctx.attn.proj(out_ctx), mod_ctx)      # (B, M, D)
        return img, ctx

    def zero_init_(self) -> None:
        self.img.zero_init_()
        self.ctx.zero_init_()

    def macs(self, num_img: int, num_ctx: int) -> int:
        return self.img.macs(num_img, num_img + num_ctx) + self.ctx.macs(num_ctx, num_img + num_ctx)


class MMDiT(nn.Module):
    """SD3-style MMDiT over patch tokens and class tokens, conditioned on time and class through adaLN-Zero."""

    def __init__(self,
        input_size: int = 32,                   # image/latent side (square), multiple of patch_size
        in_channels: int = 4,                   # C of x; the output has the same C
        num_classes: int = 1000,                # label id num_classes is the null class; 0 = unconditional
        patch_size: int = 2,                    # pixels (latent cells) per token side
        hidden_size: int = 1152,                # width D of both streams
        depth: int = 9,                         # double-stream blocks
        depth_single_blocks: int = 19,          # single-stream blocks after them, over [image, context]
        num_heads: int = 18,                    # attention heads
        mlp_ratio: float = 4.0,                 # MLP hidden = mlp_ratio * D
        class_dropout_prob: float = 0.1,        # label dropout in train mode (classifier-free guidance)
        num_register_tokens: int = 4,           # learned tokens appended to the context stream
        label_tokens: int = 4,                  # K learned context tokens per class
        class_embeddings: torch.Tensor | None = None,  # (num_classes, tokens, dim_in) fixed; replaces the learned ones
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (triton on CUDA, else sdpa)
        kernels: str = "auto",                  # auto (triton on CUDA) | reference | triton: fused adaLN ops
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if class_embeddings is not None and class_embeddings.shape[0] != num_classes:
            raise ValueError(f"class_embeddings has {class_embeddings.shape[0]} rows for num_classes={num_classes}")
        self.kernels = resolve_kernels(kernels)
        self.in_channels = self.out_channels = in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.num_classes = num_classes
        self.num_register_tokens = num_register_tokens
        self.hidden_size = hidden_size
        self.depth = depth

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if class_embeddings is None:
            self.label_tokens, context_dim = label_tokens, hidden_size
            # K tokens per class are one table row of K * D.
            self.y_embedder = LabelEmbedder(num_classes, label_tokens * hidden_size, class_dropout_prob)
            self.context_embedder = nn.Identity()
        else:
            self.label_tokens, context_dim = class_embeddings.shape[1], class_embeddings.shape[2]
            self.y_embedder = PretrainedLabelEmbedder(class_embeddings, class_dropout_prob)
            self.context_embedder = nn.Linear(context_dim, hidden_size)
        # Pooled condition -> width, added to the timestep embedding (SD3's pooled-text projection).
        self.pooled_embedder = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(),
                                             nn.Linear(hidden_size, hidden_size))
        self.register_buffer("pos_embed", torch.empty(1, self.num_patches, hidden_size))
        self.register_tokens = nn.Parameter(torch.empty(1, num_register_tokens, hidden_size))
        self.blocks = nn.ModuleList([
            DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, attn_impl=attn_impl, kernels=self.kernels,
                              pre_only=depth_single_blocks == 0 and i == depth - 1)
            for i in range(depth)
        ] + [
            AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, qk_norm=True, attn_impl=attn_impl, kernels=self.kernels)
            for _ in range(depth_single_blocks)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, kernels=self.kernels)
        self.attn_impl = self.blocks[0].img.attn.attn_impl
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialization with adaLN-Zero (layers.init_adaln_transformer_): the fresh network predicts
        0. Works on the meta device too. A pretrained class table is refilled from its embeddings."""
        learned = isinstance(self.y_embedder, LabelEmbedder)
        init_adaln_transformer_(self, [*([self.y_embedder.embedding_table.weight] if learned else []),
                                       *(layer.weight for layer in (*self.t_embedder.mlp[::2],
                                                                    *self.pooled_embedder[::2]))])
        if not learned:
            self.y_embedder.reset_table()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long in [0, num_classes] -> (B, C, H, W)."""
        B = x.shape[0]
        # The residual streams and the conditioning are fp32 whatever the parameters' dtype (parallel.py).
        img = self.x_embedder(x).float() + self.pos_embed.float()                      # (B, N, D)
        labels = self.y_embedder(y, force_drop_ids).reshape(B, self.label_tokens, -1).float()  # (B, K, Dc)
        ctx = self.context_embedder(labels).float()                                     # (B, K, D)
        if self.num_register_tokens:
            ctx = torch.cat([ctx, self.register_tokens.expand(B, -1, -1).float()], dim=1)  # (B, K+R, D)
        c = self.t_embedder(t).float() + self.pooled_embedder(labels.mean(dim=1)).float()  # (B, D)
        for block in self.blocks[:self.depth]:
            img, ctx = block(img, ctx, c)                                               # (B, N|M, D)
        if len(self.blocks) > self.depth:
            h = torch.cat([img, ctx.to(img.dtype)], dim=1)                              # (B, N+M, D)
            for block in self.blocks[self.depth:]:
                h = block(h, c)                                                         # (B, N+M, D)
            img = h[:, :self.num_patches]                                               # (B, N, D)
        out = self.final_layer(img, c)                                                  # (B, N, p*p*C)
        return unpatchify(out, self.patch_size, self.grid_size, self.grid_size)         # (B, C, H, W)

    def num_params(self) -> int:
        """Trainable parameters (fixed positions and pretrained class embeddings are buffers, not counted)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Forward multiply-adds for one image: every Linear, the patch Conv2d and the attention matmuls over
        N patch tokens and M = K label + R register tokens. Not counted: norms, softmax, activations,
        modulation, residual adds, embedding lookups. Training FLOPs = 6 x this."""
        D, N, C, p = self.hidden_size, self.num_patches, self.in_channels, self.patch_size
        M = self.label_tokens + self.num_register_tokens
        context = self.context_embedder
        return (N * (C * p * p) * D                                        # patch embedding
                + sum(layer.in_features * layer.out_features               # timestep and pooled MLPs
                      for layer in (*self.t_embedder.mlp[::2], *self.pooled_embedder[::2]))
                + (self.label_tokens * context.in_features * D if isinstance(context, nn.Linear) else 0)
                + sum(block.macs(N, M) for block in self.blocks[:self.depth])
                + sum(block.macs(N + M) for block in self.blocks[self.depth:])
                + self.final_layer.macs(N))
