"""ADM: the UNet of "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol 2021), as a
rectified-flow / DDPM network.

    model = ADMUNet(input_size=64, in_channels=3, num_classes=1000, **ADM_PRESETS["ADM-64"])
    out = model(x, t, y)          # x (B, C, H, W), t (B,) in [0, 1], y (B,) in [0, num_classes]

Residual blocks with GroupNorm and scale-shift conditioning on the timestep + class embedding
(AdaGN, Sec. 3), multi-head self-attention at chosen feature-map sides, residual blocks that
up/down-sample (BigGAN style), channel multipliers per level. Differences from openai/guided-diffusion:
no learned variance (output channels = input channels); the class table has a null row for
classifier-free guidance; attention is the shared `layers.Attention` on the flattened feature map
(SDPA by default), with `head_channels`-wide heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attention, LabelEmbedder, TimestepEmbedder, modulate

GROUPS = 32  # GroupNorm groups, as ADM's normalization()

from ..families import ADM_PRESETS  # noqa: F401  (re-exported)


def conv_macs(conv: nn.Conv2d, side: int) -> int:
    """Multiply-adds of a square-input Conv2d whose output is side x side."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return side * side * conv.out_channels * conv.in_channels // conv.groups * k


class ResBlock(nn.Module):
    """ADM residual block: GN, SiLU, [resample], conv; AdaGN GN(h) * (1 + scale) + shift from the
    embedding; SiLU, dropout, zero-initialised conv; plus the (resampled, 1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, side: int, dropout: float = 0.0,
                 resample: str | None = None):   # None | "up" (nearest x2) | "down" (2x2 average pool)
        super().__init__()
        self.resample = resample
        self.side = side                                         # output feature-map side
        self.norm1 = nn.GroupNorm(GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))                    # (B, Cout, S, S)
        shift, scale = self.emb(emb)[:, :, None, None].chunk(2, dim=1)          # (B, Cout, 1, 1) each
        h = F.silu(modulate(self.norm2(h), shift, scale))
        h = self.conv2(self.dropout(h))
        return self.skip(self._resample(x)) + h                                  # (B, Cout, S, S)

    def macs(self) -> int:
        skip = conv_macs(self.skip, self.side) if isinstance(self.skip, nn.Conv2d) else 0
        return (conv_macs(self.conv1, self.side) + self.emb[1].in_features * self.emb[1].out_features
                + conv_macs(self.conv2, self.side) + skip)


class AttentionBlock(nn.Module):
    """x + Attention(GN(x)) over the side x side positions of a feature map; the output projection is
    zero-initialised (ADM)."""

    def __init__(self, channels: int, side: int, head_channels: int = 64, attn_impl: str = "auto"):
        super().__init__()
        self.side = side
        self.norm = nn.GroupNorm(GROUPS, channels)
        # auto = sdpa here: the QK-norm attention op's gain was measured on the transformers only
        self.attn = Attention(channels, max(1, channels // head_channels), qkv_bias=True,
                              attn_impl="sdpa" if attn_impl == "auto" else attn_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                              # (B, HW, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)                     # (B, C, H, W)
        return x + h

    def macs(self) -> int:
        T, C = self.side * self.side, self.norm.num_channels
        return T * C * 3 * C + 2 * T * T * C + T * C * C


class UNetBlock(nn.Module):
    """A residual block and its optional attention; a decoder's first concatenates a skip activation."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)                                      # (B, C + Cskip, S, S)
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x

    def macs(self) -> int:
        return self.res.macs() + (self.attn.macs() if self.attn is not None else 0)


# The entries of ADMUNet.blocks are whole levels, one class per role: parallel.py compiles each entry on
# its own (fullgraph), and torch.compile keeps at most a few graphs per forward function; levels of
# one role differ in shape and structure, so a UNet of L levels needs L graphs of each, not one per block.

class EncoderLevel(nn.Module):
    """num_res_blocks residual(+attention) blocks, then optionally a down-sampling residual block.
    forward(h, emb) -> (h, the skip activations it produced, in order)."""

    def __init__(self, units: list[UNetBlock], down: UNetBlock | None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.down = down
        self.num_skips = len(units) + (down is not None)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for unit in self.units:
            h = unit(h, emb)
            skips.append(h)
        if self.down is not None:
            h = self.down(h, emb)
            skips.append(h)
        return h, tuple(skips)

    def macs(self) -> int:
        return sum(u.macs() for u in self.units) + (self.down.macs() if self.down is not None else 0)


class MiddleLevel(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, first: UNetBlock, second: UNetBlock):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(h, emb), emb)

    def macs(self) -> int:
        return self.first.macs() + self.second.macs()


class DecoderLevel(nn.Module):
    """num_res_blocks + 1 residual(+attention) blocks, each on [h, the newest unused skip], then
    optionally an up-sampling residual block. forward(h, emb, skips) with skips oldest first."""

    def __init__(self, units: list[UNetBlock], up: UNetBlock | None):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.up = up
        self.num_skips = len(units)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for unit, skip in zip(self.units, reversed(skips)):
            h = unit(h, emb, skip)
        return self.up(h, emb) if self.up is not None else h

    def macs(self) -> int:
        return sum(u.macs() for u in self.units) + (self.up.macs() if self.up is not None else 0)


class ADMUNet(nn.Module):
    """ADM's UNet: encoder levels (residual blocks, down-sampling residual block), middle (res, attention,
    res), decoder levels mirroring them with skip connections, all conditioned on time + class."""

    def __init__(self,
        input_size: int = 32,                   # image side (square), divisible by 2^(levels - 1)
        in_channels: int = 3,                   # C of x; the output has the same C
        num_classes: int = 10,                  # label id num_classes is the null class; 0 = unconditional
        channels: int = 128,                    # base width; level i has channels * channel_mult[i]
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),  # one entry per resolution level
        num_res_blocks: int = 2,                # residual blocks per encoder level (decoder: one more)
        attn_resolutions: tuple[int, ...] = (16,),  # feature-map sides with self-attention
        dropout: float = 0.0,                   # in every residual block
        head_channels: int = 64,                # attention head width (ADM's num_head_channels)
        class_dropout_prob: float = 0.1,        # label dropout in train mode (classifier-free guidance)
        attn_impl: str = "auto",                # reference | sdpa | triton | auto (= sdpa for this UNet)
    ):
        super().__init__()
        levels = len(channel_mult)
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size {input_size} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                             f"for {levels} levels (channel_mult={list(channel_mult)})")
        sides = [input_size // 2 ** i for i in range(levels)]
        if bad := sorted(set(attn_resolutions) - set(sides)):
            raise ValueError(f"attn_resolutions {bad} are not feature-map sides of this UNet; choose from {sides}")
        if bad := [w for w in dict.fromkeys([channels] + [channels * m for m in channel_mult]) if w % GROUPS]:
            raise ValueError(f"widths {bad} (channels and channels * channel_mult) must be multiples of {GROUPS} "
                             f"(GroupNorm groups)")
        attn_widths = [channels * m for side, m in zip(sides, channel_mult) if side in attn_resolutions]
        attn_widths = dict.fromkeys(attn_widths + [channels * channel_mult[-1]])      # + the middle's attention
        if bad := [w for w in attn_widths if w > head_channels and w % head_channels]:
            raise ValueError(f"attention widths {bad} are not multiples of the head width {head_channels} "
                             f"(model.channels_per_head; a width below it is one head)")
        self.in_channels = self.out_channels = in_channels
        self.input_size = input_size
        self.num_classes = num_classes
        self.channels = channels
        emb_channels = 4 * channels
        self.t_embedder = TimestepEmbedder(emb_channels, frequency_embedding_size=channels)
        self.y_embedder = LabelEmbedder(num_classes, emb_channels, class_dropout_prob)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def unit(cin: int, cout: int, side: int, resample: str | None = None) -> UNetBlock:
            attn = AttentionBlock(cout, side, head_channels, attn_impl) if side in attn_resolutions and not resample else None
            return UNetBlock(ResBlock(cin, cout, emb_channels, side, dropout, resample), attn)

        # Encoder levels, middle, decoder levels (deepest first); the skip activations of the encoder
        # (and of the input conv) are consumed by the decoder in reverse order, as in ADM.
        blocks, skip_channels, ch = [], [channels], channels
        for level, mult in enumerate(channel_mult):
            units = []
            for _ in range(num_res_blocks):
                units.append(unit(ch, channels * mult, sides[level]))
                ch = channels * mult
                skip_channels.append(ch)
            down = unit(ch, ch, sides[level + 1], "down") if level < levels - 1 else None
            skip_channels += [ch] if down is not None else []
            blocks.append(EncoderLevel(units, down))
        blocks.append(MiddleLevel(UNetBlock(ResBlock(ch, ch, emb_channels, sides[-1], dropout),
                                            AttentionBlock(ch, sides[-1], head_channels, attn_impl)),
                                  UNetBlock(ResBlock(ch, ch, emb_channels, sides[-1], dropout))))
        for level, mult in reversed(list(enumerate(channel_mult))):
            units = []
            for _ in range(num_res_blocks + 1):
                units.append(unit(ch + skip_channels.pop(), channels * mult, sides[level]))
                ch = channels * mult
            blocks.append(DecoderLevel(units, unit(ch, ch, sides[level - 1], "up") if level > 0 else None))
        self.blocks = nn.ModuleList(blocks)
        self.num_levels = levels
        self.norm_out = nn.GroupNorm(GROUPS, ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """PyTorch's default init, except ADM's zero init of every residual branch's last conv, every
        attention output projection and the output conv: each block starts as its skip path and the
        fresh network predicts exactly 0. Works on the meta device (re-runs the default init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.Embedding)):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero = module.conv2
            elif isinstance(module, AttentionBlock):
                zero = module.attn.proj
            else:
                continue
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long in [0, num_classes] -> (B, C, H, W)."""
        # the conditioning is fp32 whatever the parameters' dtype, so one rank and FSDP2 agree (parallel.py)
        emb = self.t_embedder(t).float() + self.y_embedder(y, force_drop_ids).float()  # (B, 4 ch)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))                         # (B, ch, S, S)
        skips = [h]
        for level in self.blocks[:self.num_levels]:
            h, new = level(h, emb)
            skips.extend(new)
        h = self.blocks[self.num_levels](h, emb)                                  # middle
        for level in self.blocks[self.num_levels + 1:]:
            h = level(h, emb, tuple(skips[-level.num_skips:]))
            del skips[-level.num_skips:]
        return self.conv_out(F.silu(self.norm_out(h)))                             # (B, C, H, W)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Forward multiply-adds for one image: every convolution and Linear (embeddings included) and
        the attention matmuls. Not counted: norms, activations, resampling, softmax, adds, lookups.
        Training FLOPs = 6 x this."""
        mlp = self.t_embedder.mlp
        return (mlp[0].in_features * mlp[0].out_features + mlp[2].in_features * mlp[2].out_features
                + conv_macs(self.conv_in, self.input_size) + conv_macs(self.conv_out, self.input_size)
                + sum(block.macs() for block in self.blocks))
