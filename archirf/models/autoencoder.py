"""Image autoencoders in the Stable Diffusion / LDM layout (Rombach et al. 2022), and the clipped-latent one.

Encoder: conv_in -> per level `num_res_blocks` ResnetBlocks (+ attention at `attn_resolutions`) and a
downsample between levels -> mid (block, attention, block) -> norm, SiLU, conv_out. Decoder: the mirror
with one more block per level. Module names follow LDM's (`encoder.down.0.block.1.norm1`, `mid.attn_1`,
`quant_conv` ...), so its state dicts map onto ours one to one for the GroupNorm / conv-resampling layout.

Two latents:
- `AutoencoderKL`: a diagonal Gaussian posterior (mean, logvar clamped to [-30, 20]) through `quant_conv`;
  decode(z) through `post_quant_conv`. The KL of the posterior goes into the loss.
- `ClippedAutoencoder`: z = clamp(s * E(x), -1, 1) with a learned scalar gain s (init 1), decoded from
  z / s; no variance, a loss on std(z) instead of the KL.

`norm`: "group" (GroupNorm 32, eps 1e-6, LDM) or "rms" (channel RMSNorm: x / ||x||_channels * sqrt(C) * g,
the seed's); `resample`: "conv" (LDM: strided 3x3 conv down, nearest + 3x3 conv up) or "bilinear" (the
seed's: interpolation only, no weights). Attention is over H*W tokens with `mid_heads` heads in the mid block
(LDM: 1), in LDM's form or the seed's (`attn_style`, see AttnBlock), with q and k normalised when `qk_norm`;
`encoder_out_kernel`: the encoder's output conv, 3x3 (LDM) or 1x1 (the seed's). `kernels` (auto | reference | triton, as the
other families' key): the norm + SiLU of every ResnetBlock and of both output heads through
archirf_kernels' fused group_norm_silu / channel_rms_norm_silu (auto: on CUDA; the channel RMSNorm's only
outside torch.compile, where the measurement put inductor ahead).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import archirf_kernels

from .layers import use_fused_kernels


class ChannelRMSNorm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * g: a per-pixel RMSNorm (a row norm in channels_last)."""

    kernels = "auto"                              # set by the autoencoder: see `silu`

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps, self.scale = eps, math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1, eps=self.eps) * (self.weight * self.scale).reshape(1, -1, 1, 1).to(x.dtype)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(self(x)): archirf_kernels' fused op where `kernels` says so (see models/layers.py); with
        kernels=auto only outside torch.compile: inside a compiled unit inductor's fusion of this row norm was
        faster (benchmarks/results/nvidia-h100-80gb-hbm3/autoencoder_step.md)."""
        if use_fused_kernels(self.kernels, x, under_compile=False):
            return archirf_kernels.channel_rms_norm_silu(x, self.weight, self.eps, impl=_impl(self.kernels))
        return F.silu(self(x))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with `silu`, as ChannelRMSNorm; the fused op also inside compiled units, where it beat
    inductor's GroupNorm (the same record)."""

    kernels = "auto"

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_kernels(self.kernels, x):
            return archirf_kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps,
                                                  impl=_impl(self.kernels))
        return F.silu(self(x))


def _impl(kernels: str) -> str:
    return "triton" if kernels == "triton" else "auto"


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return GroupNorm(32, channels, eps=1e-6)
    return ChannelRMSNorm(channels)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1.silu(x))
        h = self.conv2(self.dropout(self.norm2.silu(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class SeedQKNorm(nn.Module):
    """The seed's q / k norm: F.normalize over dim 1 of (B, heads, HW, C/heads), which is the heads axis, times
    sqrt(C/heads) and a per-channel gain over the last axis."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps, self.scale = eps, math.sqrt(head_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=1, eps=self.eps) * (self.weight * self.scale).to(t.dtype)


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions with 1x1-conv projections; `heads` of C / heads channels.
    style "ldm" (LDM's AttnBlock): q, k and v convs with biases, softmax scale 1 / sqrt(C / heads), and with
    `qk_norm` an RMSNorm of q and k per head. style "seed" (the seed's): one bias-free qkv conv, softmax scale
    1 / sqrt(C), and with `qk_norm` SeedQKNorm."""

    def __init__(self, channels: int, norm: str, heads: int = 1, qk_norm: bool = False, style: str = "ldm"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention of {channels} channels cannot split into {heads} heads")
        if style not in ("ldm", "seed"):
            raise ValueError(f"attention style must be ldm or seed (got {style!r})")
        self.norm = make_norm(norm, channels)
        if style == "seed":
            self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        else:
            self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.heads, self.style = heads, style
        self.scale = channels ** -0.5 if style == "seed" else None          # None: SDPA's 1 / sqrt(head dim)
        qk = (lambda: SeedQKNorm(channels // heads)) if style == "seed" else (
            lambda: nn.RMSNorm(channels // heads, eps=1e-6))
        self.q_norm = qk() if qk_norm else None
        self.k_norm = qk() if qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:                       # (B, C, H, W) -> (B, heads, HW, C/heads)
            return t.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)

        q, k, v = self.qkv(y).chunk(3, dim=1) if self.style == "seed" else (self.q(y), self.k(y), self.v(y))
        q, k, v = heads(q), heads(k), heads(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)   # (B, heads, HW, C/heads)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


def upsample2x_bilinear(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) as weighted sums of neighbours
    (output 2i = 3/4 x[i] + 1/4 x[i - 1], 2i + 1 = 3/4 x[i] + 1/4 x[i + 1], edges clamped), one axis after the
    other: pointwise work inductor fuses, forward and backward (interpolate's backward scatters with atomics)."""

    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
        shape = list(x.shape)
        shape[dim] *= 2
        return torch.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], dim + 1).reshape(shape)

    return along(along(x, 3), 2)


class Downsample(nn.Module):
    impl = "pool"                                  # or "interpolate": the same numbers (benchmarks set it)

    def __init__(self, channels: int, resample: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if resample == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:                      # bilinear by 1/2 without antialiasing is the 2x2 mean
            if self.impl == "interpolate":
                return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))                          # LDM's asymmetric padding


class Upsample(nn.Module):
    impl = "lerp"                                  # or "interpolate": the same numbers (benchmarks set it)

    def __init__(self, channels: int, resample: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if resample == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:                      # compiled: the fusible form; eager: one interpolate kernel
            if self.impl == "lerp" and torch.compiler.is_compiling():
                return upsample2x_bilinear(x)
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: its ResnetBlocks, each followed by its attention when the level has any, then the
    level's `downsample` (encoder) or `upsample` (decoder) when it has one. A unit of compile and FSDP2."""

    def __init__(self):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    """The middle: ResnetBlock, attention, ResnetBlock (LDM's mid.block_1, mid.attn_1, mid.block_2)."""

    def __init__(self, channels: int, norm: str, dropout: float, heads: int, qk_norm: bool, attn_style: str):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm, dropout)
        self.attn_1 = AttnBlock(channels, norm, heads, qk_norm, attn_style)
        self.block_2 = ResnetBlock(channels, channels, norm, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class BlockSlots:
    """The places of an autoencoder's units (levels and middles, in the order they run), indexable like the
    `blocks` ModuleList of the other families: parallel.py reads a unit and puts back its wrapped or compiled
    self, and the module names (LDM's) do not change."""

    def __init__(self, slots: list[tuple[nn.Module, str]]):
        self._slots = slots

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self):
        return (getattr(parent, name) for parent, name in self._slots)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [getattr(parent, name) for parent, name in self._slots[i]]
        parent, name = self._slots[i]
        return getattr(parent, name)

    def __setitem__(self, i: int, module: nn.Module) -> None:
        parent, name = self._slots[i]
        setattr(parent, name, module)


class Encoder(nn.Module):
    def __init__(self, *, in_channels: int, channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, out_channels: int, norm: str, resample: str,
                 dropout: float = 0.0, heads: int = 1, qk_norm: bool = False, attn_style: str = "ldm",
                 out_kernel: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        width, side = channels, resolution
        for i, mult in enumerate(channel_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(width, channels * mult, norm, dropout))
                width = channels * mult
                if side in attn_resolutions:
                    level.attn.append(AttnBlock(width, norm, heads, qk_norm, attn_style))
            if i < len(channel_mult) - 1:
                level.downsample = Downsample(width, resample)
                side //= 2
            self.down.append(level)
        self.mid = _Mid(width, norm, dropout, heads, qk_norm, attn_style)
        self.norm_out = make_norm(norm, width)
        self.conv_out = nn.Conv2d(width, out_channels, out_kernel, padding=out_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out.silu(self.mid(h)))


class Decoder(nn.Module):
    def __init__(self, *, out_channels: int, channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], resolution: int, z_channels: int, norm: str, resample: str,
                 dropout: float = 0.0, heads: int = 1, qk_norm: bool = False, attn_style: str = "ldm"):
        super().__init__()
        width = channels * channel_mult[-1]
        side = resolution // 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _Mid(width, norm, dropout, heads, qk_norm, attn_style)
        self.up = nn.ModuleList()
        for i in reversed(range(len(channel_mult))):                      # LDM stores up[i] for level i
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(width, channels * channel_mult[i], norm, dropout))
                width = channels * channel_mult[i]
                if side in attn_resolutions:
                    level.attn.append(AttnBlock(width, norm, heads, qk_norm, attn_style))
            if i > 0:
                level.upsample = Upsample(width, resample)
                side *= 2
            self.up.insert(0, level)
        self.norm_out = make_norm(norm, width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, return_last_input: bool = False):
        """The image; with return_last_input, (image, the input of conv_out), from which the adaptive GAN
        weight's gradients with respect to conv_out's weight are computed (losses/autoencoder.py)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        h = self.norm_out.silu(h)
        out = self.conv_out(h)
        return (out, h) if return_last_input else out


class _Autoencoder(nn.Module):
    kind = "?"

    def __init__(self, *, input_size: int, in_channels: int = 3, channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (), z_channels: int = 4, norm: str = "group",
                 resample: str = "conv", dropout: float = 0.0, mid_heads: int = 1, qk_norm: bool = False,
                 attn_style: str = "ldm", encoder_out_kernel: int = 3, kernels: str = "auto",
                 encoder_out: Optional[int] = None):
        super().__init__()
        from .layers import resolve_kernels

        if norm not in ("group", "rms") or resample not in ("conv", "bilinear"):
            raise ValueError(f"norm must be group or rms and resample conv or bilinear (got {norm}, {resample})")
        if encoder_out_kernel not in (1, 3):
            raise ValueError(f"the encoder's output conv is 1x1 or 3x3 (got encoder_out_kernel={encoder_out_kernel})")
        factor = 2 ** (len(channel_mult) - 1)
        if input_size % factor:
            raise ValueError(f"input size {input_size} is not divisible by the downsampling factor {factor}")
        if norm == "group" and any((channels * m) % 32 for m in channel_mult):
            raise ValueError(f"GroupNorm(32) needs every level's width to be a multiple of 32 (channels={channels}, "
                             f"channel_mult={list(channel_mult)})")
        shape = dict(channels=channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                     attn_resolutions=tuple(attn_resolutions), resolution=input_size, norm=norm, resample=resample,
                     dropout=dropout, heads=mid_heads, qk_norm=qk_norm, attn_style=attn_style)
        self.encoder = Encoder(in_channels=in_channels, out_channels=encoder_out or z_channels,
                               out_kernel=encoder_out_kernel, **shape)
        self.decoder = Decoder(out_channels=in_channels, z_channels=z_channels, **shape)
        self.input_size, self.in_channels, self.z_channels, self.factor = input_size, in_channels, z_channels, factor
        self._shape = dict(input_size=input_size, in_channels=in_channels, z_channels=z_channels, **{
            k: v for k, v in shape.items() if k not in ("resolution", "heads")}, mid_heads=mid_heads,
            encoder_out_kernel=encoder_out_kernel)
        kernels = resolve_kernels(kernels)         # norm + SiLU of every ResnetBlock and both outputs' norms
        for m in self.modules():
            if isinstance(m, (GroupNorm, ChannelRMSNorm)):
                m.kernels = kernels

    @property
    def blocks(self) -> BlockSlots:
        """The units parallel.py compiles and shards one by one: the encoder's levels, its middle, the decoder's
        middle and its levels, in the order they run (the stems, norms and 1x1 convs stay in the root)."""
        enc, dec = self.encoder, self.decoder
        return BlockSlots([(enc.down, str(i)) for i in range(len(enc.down))] + [(enc, "mid"), (dec, "mid")]
                          + [(dec.up, str(i)) for i in reversed(range(len(dec.up)))])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.input_size // self.factor
        return self.z_channels, side, side

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> dict[str, int]:
        """Multiply-adds of the encoder and the decoder for one image (convolutions, linear maps and attention
        matmuls, counted by running the model on the meta device)."""
        with torch.device("meta"):
            twin = type(self)(**self._shape)                               # no weights to copy
        return {"encoder": _count_macs(twin.encoder, (1, self.in_channels, self.input_size, self.input_size)),
                "decoder": _count_macs(twin.decoder, (1, *self.latent_shape))}


class AutoencoderKL(_Autoencoder):
    """The Stable Diffusion VAE's layout: a diagonal Gaussian posterior over `z_channels` latent channels."""

    kind = "kl"

    def __init__(self, **kwargs):
        z = kwargs.get("z_channels", 4)
        super().__init__(encoder_out=2 * z, **kwargs)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, each (B, z, h, w); logvar clamped to [-30, 20] as LDM does."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        x_hat, last_input = self.decoder(self.post_quant_conv(z), return_last_input=True)
        return {"reconstruction": x_hat, "z": z, "mean": mean, "logvar": logvar, "last_input": last_input}

    @staticmethod
    def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, e^logvar) || N(0, I)) per sample, summed over latent elements (LDM). -> (B,)"""
        return 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=(1, 2, 3))


class ClippedAutoencoder(_Autoencoder):
    """z = clamp(s * E(x), -1, 1), x_hat = D(z / s), with a learned scalar gain s."""

    kind = "clipped"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = nn.Parameter(torch.ones(1))            # one element, not 0-dim: FSDP2 shards 1-D and up

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.encoder(x)).clamp(-1.0, 1.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scale)

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        h = self.scale * self.encoder(x)
        z = h.clamp(-1.0, 1.0)
        x_hat, last_input = self.decoder(z / self.scale, return_last_input=True)
        # the gain is copied: under FSDP2 self.scale is the gathered parameter, freed after backward
        return {"reconstruction": x_hat, "z": z, "clip_fraction": (h.abs() > 1).float().mean(),
                "gain": self.scale.detach().reshape(()).clone(), "last_input": last_input}

    @staticmethod
    def variance_loss(z: torch.Tensor) -> torch.Tensor:
        """|std(z) - 1| over the whole batch's latents (the seed's, weighted 0.01 there)."""
        return (z.float().flatten().std() - 1.0).abs()


def _count_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward of a meta-device `module` on a tensor of `shape`: convolutions, linear maps and
    scaled_dot_product_attention, from their shapes (torch's FLOP counter counts 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(torch.empty(shape, device="meta"))
    return counter.get_total_flops() // 2


def build_autoencoder(preset: Optional[str] = None, *, input_size: int, in_channels: int = 3,
                      **overrides) -> _Autoencoder:
    """An autoencoder from a preset of archirf/families.py (KL-f8c4, KL-f8c16, Seed-f8c16), keys overridden."""
    from ..families import AUTOENCODER_PRESETS

    if preset is not None and preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; valid presets: {', '.join(AUTOENCODER_PRESETS)}")
    values = {**(AUTOENCODER_PRESETS[preset] if preset else {}), **overrides}
    latent = values.pop("latent", "kl")
    cls = {"kl": AutoencoderKL, "clipped": ClippedAutoencoder}[latent]
    lists = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
    return cls(input_size=input_size, in_channels=in_channels, **{**values, **lists})
