"""Shared building blocks of the ArchiRF networks (DiT now; MMDiT and the UNets compose the same pieces).

Token layout is (B, N, C) throughout: batch, tokens, channels. Every block is device-agnostic
(tensors are created on the input's device) and free of host syncs, so it runs under
`torch.compile(fullgraph=True)` and on any accelerator.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import archirf_kernels
# adaLN modulation x * (1 + scale) + shift (DiT Sec. 3.2), shift/scale per sample (B, C) or per token
# (B, N, C): the tree's one modulate lives with the kernels' spec, which cannot import archirf.
from archirf_kernels.reference import modulate  # noqa: F401  (re-exported for the models)
# softmax(Q K^T / sqrt(d)) V on (B, H, N, Dh) heads in fp32: the spec the attention paths are tested against.
from archirf_kernels.reference import attention_reference  # noqa: F401  (re-exported)

ATTN_IMPLS = ("auto", "reference", "sdpa", "triton")
KERNEL_CHOICES = ("auto", "reference", "triton")


def resolve_kernels(kernels: str) -> str:
    """Checks the fused-op choice at construction: 'auto' without triton installed is 'reference'."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels '{kernels}'; choose one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton" and not archirf_kernels.HAS_TRITON:
        raise ValueError("kernels='triton' needs the triton package; install it or use kernels='auto'")
    if kernels == "auto" and not archirf_kernels.HAS_TRITON:
        return "reference"
    return kernels


def use_fused_kernels(kernels: str, x: torch.Tensor) -> bool:
    """kernels='triton': always; 'auto': when x is on CUDA. A model does not know its device when it is
    built, so 'auto' is decided per call: a Python branch that torch.compile specializes away."""
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


# ----------------------------------------------------------------------------------------------
# Conditioning embedders.

class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden_size): sinusoids of t * time_scale, then a 2-layer SiLU MLP (DiT)."""

    def __init__(self,
        hidden_size: int,                       # output width
        frequency_embedding_size: int = 256,    # number of sinusoid features (cos half, sin half)
        time_scale: float = 1000.0,             # t in [0, 1] is embedded as DDPM-style step t * 1000
        max_period: float = 10000.0,            # lowest frequency 1 / max_period (Vaswani et al. 2017)
    ):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, frequency_embedding_size) in fp32: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
        dim = self.frequency_embedding_size
        half = dim // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
        args = (t.float() * self.time_scale)[:, None] * freqs[None]                          # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                    # (B, 2 half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t)                                # (B, F) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))               # (B, D)


def drop_labels(labels: torch.Tensor, null_class: int, dropout_prob: float,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Replaces labels by the null class: at random with dropout_prob, or where force_drop_ids == 1."""
    if force_drop_ids is None:
        drop = torch.rand(labels.shape[0], device=labels.device) < dropout_prob
    else:
        drop = force_drop_ids == 1
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class LabelEmbedder(nn.Module):
    """Class label -> (B, hidden_size), with label dropout for classifier-free guidance (Ho & Salimans 2022).

    The table has num_classes + 1 rows; the last row (id num_classes) is the null class that both
    dropped labels and unconditional sampling use. With num_classes == 0 only the null row exists.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes                                     # also the null label id
        self.dropout_prob = dropout_prob if num_classes > 0 else 0.0
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Random dropout only while training; force_drop_ids applies in any mode.
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)                                # (B, D)


# ----------------------------------------------------------------------------------------------
# Patches and positions.

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): a stride-p convolution = one linear map per p x p patch (ViT)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.to(self.proj.weight.dtype))                       # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)                               # (B, N, D)


def unpatchify(x: torch.Tensor, patch_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, grid_h * grid_w, p * p * C) -> (B, C, grid_h * p, grid_w * p); inverse of PatchEmbed's layout.

    Each token holds its patch as (p, p, C) with channels last, as in DiT's final layer.
    """
    B, N, D = x.shape
    p = patch_size
    c = D // (p * p)
    x = x.reshape(B, grid_h, grid_w, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)                                        # (B, C, gh, p, gw, p)
    return x.reshape(B, c, grid_h * p, grid_w * p)


def sincos_pos_embed_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) fp64 positions -> (M, embed_dim): [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-2i/embed_dim)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                           # (D/2,)
    out = pos.reshape(-1, 1) * omega[None]                                 # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)              # (M, D)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, embed_dim) fixed 2-D sin-cos table, computed in fp64 on the CPU (MAE / DiT).

    Row-major over the grid like PatchEmbed's tokens; the first half of the channels encodes the
    column index and the second half the row index (the channel order of MAE's and DiT's tables).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positions need embed_dim % 4 == 0 (got {embed_dim})")
    rows = torch.arange(grid_h, dtype=torch.float64, device="cpu")
    cols = torch.arange(grid_w, dtype=torch.float64, device="cpu")
    row_idx, col_idx = torch.meshgrid(rows, cols, indexing="ij")           # (gh, gw) each
    emb_col = sincos_pos_embed_1d(embed_dim // 2, col_idx)                 # (N, D/2)
    emb_row = sincos_pos_embed_1d(embed_dim // 2, row_idx)                 # (N, D/2)
    return torch.cat([emb_col, emb_row], dim=1)                            # (N, D)


# ----------------------------------------------------------------------------------------------
# Normalization, attention, MLP.

class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable scale (Zhang & Sennrich 2019); math in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return archirf_kernels.reference.rms_norm(x, self.weight, self.eps)


def _attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def resolve_attn_impl(attn_impl: str, qk_norm: bool = False) -> str:
    """Checks the attention choice at construction -> 'reference' | 'sdpa' | 'triton' | 'auto'.

    'auto' is 'sdpa' for now: measured on an H100 (benchmarks/results/), the fused QK-norm kernel is
    still slower than torch.compile of rms_norm + SDPA, so it stays opt-in ('triton') until it wins.
    Forward code keeps the per-call 'auto' branch (Triton on CUDA inputs) for when that flips."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl '{attn_impl}'; choose one of {', '.join(ATTN_IMPLS)}")
    if attn_impl == "triton" and not archirf_kernels.HAS_TRITON:
        raise ValueError("attn_impl='triton' needs the triton package; install it or use attn_impl='auto'")
    if attn_impl == "auto":
        return "sdpa"
    return attn_impl


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional per-head QK-RMSNorm (SD3, Esser et al.
    2024), attention, output projection. (B, N, D) -> (B, N, D)."""

    def __init__(self,
        dim: int,                               # model width D
        num_heads: int,                         # H; head width D / H
        qkv_bias: bool = True,
        qk_norm: bool = False,                  # RMSNorm on q and k per head, learnable scale
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (= sdpa until triton wins)
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.attn_impl = resolve_attn_impl(attn_impl, qk_norm)
        self.attend = attention_reference if self.attn_impl == "reference" else _attention_sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        if self.attn_impl == "triton" or (self.attn_impl == "auto" and x.is_cuda):
            # One kernel from the projection's layout: QK-RMSNorm, attention, heads merged.
            x = archirf_kernels.qk_norm_attention(
                qkv, self.q_norm.weight if self.qk_norm else None, self.k_norm.weight if self.qk_norm else None,
                eps=(self.q_norm.eps, self.k_norm.eps) if self.qk_norm else 1e-6, qk_norm=self.qk_norm,
                impl="triton")                                               # (B, N, D)
            return self.proj(x)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, H, N, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v)                                           # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)                             # (B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
