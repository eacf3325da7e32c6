"""A DINOv2 ViT (Oquab et al. 2023) that loads facebookresearch/dinov2's state dicts, for FD-DINOv2.

Only what the feature is made of: patch embedding, class (and register) tokens, position embeddings
interpolated to the input's grid as dinov2 does it (bicubic, with its +0.1 scale offset), pre-norm
blocks with LayerScale, the final norm; the output is the normalised class token (what
`torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')(x)` returns). The sizes come from the
state dict; heads are 64 wide as in every dinov2 model. The SwiGLU MLP of ViT-g is not built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_HEAD_DIM = 64
_POS_OFFSET = 0.1          # dinov2's interpolate_offset


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))
        self.heads = dim // _HEAD_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)     # (B, N, D)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoVisionTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, hidden: int, patch_size: int, grid: int, registers: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))                              # unused (training only)
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(_Block(dim, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h w, D): the class token's and the patch grid's, bicubic-interpolated from the trained grid."""
        pos = self.pos_embed.float()
        m = math.isqrt(pos.shape[1] - 1)
        if (h, w) == (m, m):
            return pos
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", scale_factor=((h + _POS_OFFSET) / m, (w + _POS_OFFSET) / m))
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]) // self.patch_size, int(x.shape[-1]) // self.patch_size   # (ints when traced too)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)                           # (B, h w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]                                                         # (B, D)


def vit_from_state_dict(state: dict[str, torch.Tensor]) -> DinoVisionTransformer:
    """The network a dinov2 state dict describes, with its weights; ValueError if it is not one."""
    needed = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a dinov2 ViT state dict (no {missing[0]}; ViT-g's SwiGLU blocks are not supported)")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    if dim % _HEAD_DIM:
        raise ValueError(f"width {dim} is not a multiple of dinov2's {_HEAD_DIM}-wide heads")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    model = DinoVisionTransformer(dim, depth, state["blocks.0.mlp.fc1.weight"].shape[0], patch, grid, registers)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"does not load as a dinov2 ViT ({str(err).splitlines()[0]})") from None
    return model
