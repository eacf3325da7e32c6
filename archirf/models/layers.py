"""Shared building blocks of the ArchiRF networks: DiT, MMDiT and the UNets compose these pieces.

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


def use_fused_kernels(kernels: str, x: torch.Tensor, under_compile: bool = True) -> bool:
    """kernels='triton': always; 'auto': when x is on CUDA, and, for ops with under_compile=False, only
    outside torch.compile. A model does not know its device when it is built, so 'auto' is decided per
    call: a Python branch that torch.compile specializes away.

    The adaLN ops pass under_compile=False: inside a compiled block inductor fuses the reference
    norm, modulation and residual about as well as the custom ops do, without their per-call host
    cost (measured: benchmarks/results/nvidia-h100-80gb-hbm3/train_step_variants.md)."""
    if kernels == "triton":
        return True
    return kernels == "auto" and x.is_cuda and (under_compile or not torch.compiler.is_compiling())


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


class LabelDropout(nn.Module):
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): label id num_classes is the null
    class, which dropped labels and unconditional sampling use. Never writes into the caller's labels."""

    def __init__(self, num_classes: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes                                     # also the null label id
        self.dropout_prob = dropout_prob if num_classes > 0 else 0.0

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)

    def drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Random dropout only while training; force_drop_ids applies in any mode.
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            return self.token_drop(labels, force_drop_ids)
        return labels


class LabelEmbedder(LabelDropout):
    """Class label -> (B, hidden_size) learned embedding, with label dropout into the null class.

    The table has num_classes + 1 rows; the last row (id num_classes) is the null class. With
    num_classes == 0 only the null row exists. MMDiT's K label tokens are one row of K * width.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop(labels, force_drop_ids))    # (B, D)


class PretrainedLabelEmbedder(LabelDropout):
    """Class label -> (B, tokens, dim) fixed embeddings given as a (num_classes, tokens, dim) tensor (e.g.
    pooled features of an image classifier, as StyleGAN-XL conditions on), with label dropout; the
    null class is an all-zero row. The table is a persistent buffer: checkpoints and snapshots carry it.
    """

    def __init__(self, embeddings: torch.Tensor, dropout_prob: float):
        if embeddings.dim() != 3:
            raise ValueError(f"class embeddings must be (num_classes, tokens, dim), got shape {tuple(embeddings.shape)}")
        super().__init__(embeddings.shape[0], dropout_prob)
        num_classes, tokens, dim = embeddings.shape
        self.source = embeddings.detach().to("cpu", torch.float32)         # not module state: refills the table
        self.register_buffer("table", torch.empty(num_classes + 1, tokens, dim))
        self.reset_table()

    @torch.no_grad()
    def reset_table(self) -> None:
        """(Re)fills the table from the given embeddings plus the zero null row (no-op on meta)."""
        self.table[:-1].copy_(self.source)
        self.table[-1].zero_()

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[self.drop(labels, force_drop_ids)]              # (B, K, dim)


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
    """RMSNorm over the last dim with a learnable scale (Zhang & Sennrich 2019; optional); math in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return archirf_kernels.reference.rms_norm(x, self.weight, self.eps)


def _attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def resolve_attn_impl(attn_impl: str, qk_norm: bool = False) -> str:
    """Checks the attention choice at construction -> 'reference' | 'sdpa' | 'triton' | 'auto'.

    'auto' decides per call (Attention.use_triton): the QK-norm attention op (archirf_kernels, backend
    `Attention.backend`) for QK-norm attention on CUDA inputs where Triton is installed, SDPA elsewhere.
    Inside the trainer's compiled blocks the op beat torch.compile of rms_norm + SDPA in whole training
    steps (benchmarks/results/nvidia-h200/README.md, suite models)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl '{attn_impl}'; choose one of {', '.join(ATTN_IMPLS)}")
    if attn_impl == "triton" and not archirf_kernels.HAS_TRITON:
        raise ValueError("attn_impl='triton' needs the triton package; install it or use attn_impl='auto'")
    if attn_impl == "auto" and not archirf_kernels.HAS_TRITON:
        return "sdpa"
    return attn_impl


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """The QK-norm attention op's backend for every Attention in `model` (where the op runs: attn_impl
    triton, or auto on CUDA): 'auto' (per call by tokens and head dim: kernels/attention.py choose_backend), 'sdpa' (a norm pass, then SDPA; keeps the
    normalised q, k, v for the backward) or 'fused' (the norm inside our flash kernels: nothing
    normalised kept, streams never concatenated; the least activation memory)."""
    if backend not in archirf_kernels.reference.ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose one of "
                         f"{', '.join(archirf_kernels.reference.ATTENTION_BACKENDS)}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return model


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional per-head QK-RMSNorm (SD3, Esser et al.
    2024), attention, output projection. (B, N, D) -> (B, N, D)."""

    def __init__(self,
        dim: int,                               # model width D
        num_heads: int,                         # H; head width D / H
        qkv_bias: bool = True,
        qk_norm: bool = False,                  # RMSNorm on q and k per head, learnable scale
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (triton on CUDA, else sdpa)
        out_proj: bool = True,                  # False: no output projection (MMDiT's last context stream)
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.attn_impl = resolve_attn_impl(attn_impl, qk_norm)
        self.backend = "auto"                   # the op's backend when it runs: set_attention_backend
        self.attend = attention_reference if self.attn_impl == "reference" else _attention_sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim) if out_proj else None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, 3, H, Dh): the qkv projection split into heads, before any norm."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)

    def use_triton(self, qkv: torch.Tensor) -> bool:
        """Whether this call runs the QK-norm attention op: 'triton' always; 'auto' for QK-norm attention
        on CUDA inputs the op takes (fp16 / bf16 / fp32, head dim up to its maximum; else SDPA). Plain
        attention under 'auto' is SDPA on the projection's views: with no norm to fuse, the op would only
        add a copy of q, k, v (measured: docs/design.md)."""
        if self.attn_impl == "triton":
            return True
        return (self.attn_impl == "auto" and self.qk_norm and qkv.is_cuda
                and qkv.dtype in archirf_kernels.reference.ATTENTION_DTYPES
                and self.head_dim <= archirf_kernels.reference.ATTENTION_MAX_HEAD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.project_qkv(x)                                          # (B, N, 3, H, Dh)
        if self.use_triton(qkv):
            # One kernel from the projection's layout: QK-RMSNorm, attention, heads merged.
            x = archirf_kernels.qk_norm_attention(
                qkv, self.q_norm.weight if self.qk_norm else None, self.k_norm.weight if self.qk_norm else None,
                eps=(self.q_norm.eps, self.k_norm.eps) if self.qk_norm else 1e-6, qk_norm=self.qk_norm,
                impl="triton", backend=self.backend)                         # (B, N, D)
            return self.proj(x)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, H, N, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v)                                           # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)                             # (B, N, D)
        return self.proj(x)


def joint_attention(qkv_a: torch.Tensor, qkv_b: torch.Tensor, attn_a: Attention,
                    attn_b: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """MMDiT joint attention (SD3, Esser et al. 2024, Fig. 2): two streams, each with its own qkv (from
    `Attention.project_qkv`) and its own QK-norm scales, attend over the keys [a, b].

    qkv_a (B, Na, 3, H, Dh), qkv_b (B, Nb, 3, H, Dh) -> (out_a (B, Na, D), out_b (B, Nb, D)), before
    each stream's output projection. attn_a's implementation decides: the fused kernel (triton),
    or per-stream norms, one attention over the concatenation (sdpa / reference) and a split.
    """
    na = qkv_a.shape[1]
    if attn_a.use_triton(qkv_a):
        weights = [a.q_norm.weight if a.qk_norm else None for a in (attn_a, attn_b)]
        k_weights = [a.k_norm.weight if a.qk_norm else None for a in (attn_a, attn_b)]
        return archirf_kernels.joint_qk_norm_attention(
            qkv_a, qkv_b, weights[0], k_weights[0], weights[1], k_weights[1],
            eps=(attn_a.q_norm.eps, attn_a.k_norm.eps) if attn_a.qk_norm else 1e-6, qk_norm=attn_a.qk_norm,
            impl="triton", backend=attn_a.backend)
    heads = []
    for qkv, attn in ((qkv_a, attn_a), (qkv_b, attn_b)):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # (B, H, N, Dh) each
        heads.append((attn.q_norm(q), attn.k_norm(k), v))
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*heads))           # (B, H, Na+Nb, Dh)
    out = attn_a.attend(q, k, v)                                           # (B, H, Na+Nb, Dh)
    B, H, N, Dh = out.shape
    out = out.transpose(1, 2).reshape(B, N, H * Dh)                        # (B, Na+Nb, D)
    return out[:, :na], out[:, na:]


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# adaLN-Zero transformer blocks.

class AdaLNZeroBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT Sec. 3.2, Fig. 3): DiT's block, MMDiT's
    single-stream block, and (split around a joint attention) each stream of MMDiT's double block.

    `pre_attention` and `post_attention` are the two halves around the attention, so that a double
    block can run two of them around one joint attention. pre_only keeps only the first half (norm,
    modulation, qkv): SD3's last context stream, whose output nothing reads.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 attn_impl: str = "auto", kernels: str = "reference", pre_only: bool = False):
        super().__init__()
        self.kernels = resolve_kernels(kernels)
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, attn_impl=attn_impl,
                              out_proj=not pre_only)
        if pre_only and qk_norm:  # its queries only make outputs nobody reads: a scale would get no gradient
            self.attn.q_norm = RMSNorm(self.attn.head_dim, elementwise_affine=False)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # Regresses shift, scale, gate for attention and for the MLP from the conditioning vector c.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, D) -> shift, scale[, gate, shift, scale, gate] of (B, 1, D): broadcast over the tokens."""
        return self.adaLN_modulation(c).unsqueeze(1).chunk(2 if self.pre_only else 6, dim=-1)

    def pre_attention(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift: the attention's input."""
        if use_fused_kernels(self.kernels, x, under_compile=False):
            return archirf_kernels.ada_layer_norm(x, mod[0], mod[1], eps=self.norm1.eps, impl="triton")
        return modulate(self.norm1(x), mod[0], mod[1])

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x + gate * attn_out, then x + gate * MLP(adaLN(x)), from the attention's projected output."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        if use_fused_kernels(self.kernels, x, under_compile=False):
            # The block boundary fused: one pass for x += gate * attn, LN, modulate.
            x, h = archirf_kernels.gated_residual_ada_layer_norm(
                x, attn_out, gate_msa, shift_mlp, scale_mlp, eps=self.norm2.eps, impl="triton")
            return archirf_kernels.gated_residual(x, self.mlp(h), gate_mlp, impl="triton")
        x = x + gate_msa * attn_out
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(c)
        return self.post_attention(x, self.attn(self.pre_attention(x, mod)), mod)   # (B, T, D)

    def zero_init_(self) -> None:
        """adaLN-Zero: zero modulation makes every gate 0, so the block starts as the identity."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        for norm in (self.attn.q_norm, self.attn.k_norm):
            if getattr(norm, "weight", None) is not None:
                nn.init.ones_(norm.weight)

    def macs(self, num_tokens: int, num_keys: int | None = None) -> int:
        """Forward multiply-adds per image for num_tokens tokens whose queries attend over num_keys keys
        (default: the same tokens): modulation, qkv, Q K^T and A V, output projection, MLP."""
        D, T, K = self.norm1.normalized_shape[0], num_tokens, num_keys or num_tokens
        macs = D * self.adaLN_modulation[-1].out_features + T * D * 3 * D + 2 * T * K * D
        if not self.pre_only:
            macs += T * D * D + 2 * T * D * self.mlp.fc1.out_features
        return macs


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
        if use_fused_kernels(self.kernels, x, under_compile=False):
            h = archirf_kernels.ada_layer_norm(x, shift, scale, eps=self.norm_final.eps, impl="triton")
            return self.linear(h)                                                     # (B, N, p*p*C)
        return self.linear(modulate(self.norm_final(x), shift, scale))                # (B, N, p*p*C)

    def zero_init_(self) -> None:
        """Zero modulation and output: the fresh network predicts exactly 0."""
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def macs(self, num_tokens: int) -> int:
        return self.linear.in_features * 2 * self.linear.in_features + num_tokens * self.linear.in_features \
            * self.linear.out_features


@torch.no_grad()
def init_adaln_transformer_(model: nn.Module, normal_weights: list[torch.Tensor]) -> None:
    """DiT's initialization of a patch transformer (DiT, MMDiT), in place; works on the meta device too
    (the fills are then no-ops). `model` has x_embedder, pos_embed, grid_size, hidden_size,
    register_tokens, blocks and final_layer; `normal_weights` (embedding tables, timestep MLP) get N(0, 0.02)."""
    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    model.apply(_basic_init)
    model.pos_embed.copy_(sincos_pos_embed_2d(model.hidden_size, model.grid_size, model.grid_size)
                          .float().unsqueeze(0))
    # The patch embedding is a linear map of the flattened patch: initialize it like one.
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for weight in normal_weights:
        nn.init.normal_(weight, std=0.02)
    nn.init.normal_(model.register_tokens, std=0.02)
    # adaLN-Zero (DiT Sec. 3.2): zero modulation makes every gate 0, so each block starts as the
    # identity, and a zero output layer makes the fresh network predict exactly 0. Training then
    # starts from a well-conditioned residual stack (DiT Fig. 5: best FID of the conditioning variants).
    for block in model.blocks:
        block.zero_init_()
    model.final_layer.zero_init_()
