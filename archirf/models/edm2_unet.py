"""EDM2 UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
config G) as a rectified-flow / DDPM network.

    model = EDM2UNet(input_size=64, in_channels=4, num_classes=1000, **EDM2_PRESETS["EDM2-S"])
    out = model(x, t, y)          # x (B, C, H, W), t (B,) in [0, 1], y (B,) in [0, num_classes]

Every layer is magnitude preserving: MPConv normalises each output channel's weights over its fan-in
(and scales by gain / sqrt(fan_in)), activations go through mp_silu, branches merge by mp_sum / mp_cat,
the encoder pixel-normalises its main path, attention is cosine attention (q, k and v normalised per
head), resampling is by 2x2 box filters, and the stored weights are kept at unit RMS per row by
forced weight normalisation: `post_optimizer_step()` after every optimizer step (and once at init),
never inside forward -- under FSDP2 a write there would land in a temporary gathered copy.

Time input. With preconditioning="none" the network's raw output is the objective's target (v for
rectified flow, eps for DDPM) and t feeds the Fourier embedding directly. With preconditioning="edm"
(rectified flow only) the network is EDM's F inside D = c_skip x + c_out F (Karras et al. 2022, Table
1), written in RF's variables: sigma = t / (1 - t) (same signal-to-noise ratio), c_noise = ln(sigma)/4,
and the returned velocity v = (x_t - D) / t = a(t) x_t - b(t) F, with a and b finite at t = 0 and t = 1
(see edm_preconditioning). Its loss weight lambda(sigma) = 1 / c_out^2 becomes 1 / b(t)^2 on the velocity
MSE; with uncertainty_weighting a learned u(t) (EDM2 Eq. 21) divides it: the model then returns
(v, logvar) for `return_logvar=True`, logvar = u(t) - log lambda, and the objective minimises
mse * exp(-logvar) + logvar.

Differences from NVlabs/edm2: labels are ids with a null class (num_classes) for classifier-free
guidance and label dropout (EDM2 guides with a separate unconditional network); the qkv projection's
output channels are ordered (q|k|v, head, channel) rather than interleaved (a permutation of a
randomly initialised weight's rows: the same network); gains are (1,) tensors, not scalars (FSDP2
shards no 0-dim parameters); activations are channels_last (convolutions run faster in it, on GPU and CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import archirf_kernels as K

from .layers import drop_labels, resolve_kernels, use_fused_kernels

from ..families import EDM2_PRESETS  # noqa: F401  (re-exported)

PRECONDITIONINGS = ("none", "edm")


def _impl(kernels: str, x: torch.Tensor) -> str:
    """The MP ops' implementation. kernels='auto' leaves them to inductor inside compiled blocks (as
    the adaLN ops): the custom ops are fusion barriers there, which slowed the EDM2-S training step
    (benchmarks/results/nvidia-h100-80gb-hbm3/edm2_step.md). Eager code on CUDA keeps them."""
    return "triton" if use_fused_kernels(kernels, x, under_compile=False) else "reference"


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a weight: a DTensor's local shard (FSDP2 shards dim 0, the output channels,
    so every row is whole on one rank), a plain tensor as is."""
    if not hasattr(t, "to_local"):
        return t
    if not all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements):
        raise ValueError(f"forced weight normalisation needs whole rows on each rank; got placements "
                         f"{t.placements} (shard dim 0 only)")
    return t.to_local()


def edm_preconditioning(t: torch.Tensor, sigma_data: float, eps: float = 1e-5):
    """EDM's preconditioning (Karras et al. 2022, Table 1) for RF's x_t = (1-t) x + t eps, whose
    x_t / (1-t) = x + sigma eps with sigma = t / (1-t). Returns per-sample (B,) tensors, at least fp32,
    (c_in, c_noise, a, b, log_lambda): the network sees c_in x_t and c_noise = ln(sigma) / 4, and
    v = (x_t - D) / t = a x_t - b F with D = c_skip (x_t / (1-t)) + c_out F, i.e. with
    q = t^2 + sigma_data^2 (1-t)^2:  c_in = 1 / sqrt(q),  a = (t - sigma_data^2 (1-t)) / q,
    b = sigma_data / sqrt(q) = c_out / t;  EDM's loss weight 1 / c_out^2 on |D - x|^2 is the weight
    lambda = 1 / b^2 = q / sigma_data^2 on the velocity MSE |v' - v|^2 = |D - x|^2 / t^2."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))        # fp32 (fp64 stays fp64)
    sd2 = sigma_data ** 2
    q = t.square() + sd2 * (1 - t).square()
    tc = t.clamp(eps, 1 - eps)                       # c_noise is infinite at the ends: clamp t only there
    c_noise = torch.log(tc / (1 - tc)) / 4
    return q.rsqrt(), c_noise, (t - sd2 * (1 - t)) / q, sigma_data * q.rsqrt(), torch.log(q / sd2)


# ----------------------------------------------------------------------------------------------
# Magnitude-preserving layers.

class MPFourier(nn.Module):
    """cos(2 pi (f t + phi)) * sqrt(2) with fixed random f ~ N(0, bandwidth^2), phi ~ U[0, 1) (EDM2 Eq. 75):
    unit-magnitude features of a per-sample scalar. f and phi come from their own generator (`seed`), not
    the global one: every model built from a config has the same features, so weights loaded without
    buffers (e.g. EMA parameters) still fit."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        device = torch.empty(0).device                       # the default device (meta while parallel.py builds)
        freqs = 2 * math.pi * torch.randn(num_channels, generator=g, device="cpu") * bandwidth
        phases = 2 * math.pi * torch.rand(num_channels, generator=g, device="cpu")
        self.register_buffer("freqs", freqs.to(device))
        self.register_buffer("phases", phases.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().outer(self.freqs.float()) + self.phases.float()                  # (B, C)
        return y.cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Convolution (or, with kernel=(), a linear map) with a weight-normalised, magnitude-preserving
    weight (EDM2 Eq. 66-67); no bias. The stored weight starts ~N(0, 1) per element and is reset to
    unit-RMS rows by forced weight normalisation (UNet.post_optimizer_step)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = (), kernels: str = "reference"):
        super().__init__()
        self.out_channels = out_channels
        self.kernels = kernels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        K.normalize_weight_(self.weight.data, impl="reference")                          # forced norm at init

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        w = K.mp_weight(self.weight, gain, impl=_impl(self.kernels, x))
        if w.dim() == 2:
            return F.linear(x, w)                                                        # (B, out)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)                                  # (B, out, H, W)


class MPLabelEmbedding(MPConv):
    """EDM2's label embedding MPConv(num_classes + 1, C) applied to one-hot labels * sqrt(num_classes + 1):
    a column of the normalised weight, looked up instead of multiplied. Row num_classes is the null
    class (dropped labels, unconditional sampling)."""

    def __init__(self, num_classes: int, out_channels: int, dropout_prob: float, kernels: str = "reference"):
        super().__init__(num_classes + 1, out_channels, kernels=kernels)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = drop_labels(labels, self.num_classes, self.dropout_prob, force_drop_ids)
        w = K.mp_weight(self.weight, impl=_impl(self.kernels, self.weight))             # (C, n + 1)
        return w.t()[labels] * math.sqrt(self.weight.shape[1])                           # (B, C)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """EDM2's resample with its default [1, 1] filter: 2x2 box-filter downsampling (average) or 2x
    nearest upsampling (the transposed box filter)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class Block(nn.Module):
    """EDM2's residual block (Fig. 21, config G): encoder or decoder flavour, optional resampling,
    optional cosine self-attention, clipped output. A decoder block that follows a skip connection
    takes it as `skip` and joins it first with mp_cat."""

    def __init__(self,
        in_channels: int,                       # channels of x (plus those of skip, for a decoder block that takes one)
        out_channels: int,
        emb_channels: int,                      # width of the conditioning embedding
        flavor: str = "enc",                    # enc: pixel norm on the main path | dec
        resample_mode: str = "keep",            # keep | down | up
        attention: bool = False,                # cosine self-attention after the residual branch
        channels_per_head: int = 64,
        dropout: float = 0.0,                   # in the residual branch, after the modulated mp_silu
        res_balance: float = 0.3,               # mp_sum weight of the residual branch
        attn_balance: float = 0.3,              # mp_sum weight of the attention branch
        concat_balance: float = 0.5,            # mp_cat share of the skip against the main path
        clip_act: float | None = 256,           # clip of the output activations
        kernels: str = "reference",             # auto | triton | reference (archirf_kernels' MP ops)
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor, self.resample_mode = flavor, resample_mode
        if attention and out_channels % channels_per_head:
            raise ValueError(f"attention width {out_channels} is not a multiple of channels_per_head={channels_per_head}")
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance = dropout, res_balance, attn_balance
        self.concat_balance, self.clip_act, self.kernels = concat_balance, clip_act, kernels
        self.emb_gain = nn.Parameter(torch.zeros(1))
        mp = dict(kernels=kernels)
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3), **mp)
        self.emb_linear = MPConv(emb_channels, out_channels, **mp)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3), **mp)
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1), **mp) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1), **mp) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1), **mp) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        impl = _impl(self.kernels, x)
        # -- main path, and the residual branch's input h
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x, h = K.normalize_silu(x, impl=impl)                    # pixel norm; mp_silu of it for conv_res0
        elif skip is not None:
            x, h = K.mp_cat_silu(x, skip, self.concat_balance, impl=impl)
        else:
            h = K.mp_silu(x, impl=impl)
        # -- residual branch, modulated by the embedding
        y = self.conv_res0(h)                                        # (B, C, H, W)
        c = self.emb_linear(emb, gain=self.emb_gain) + 1             # (B, C)
        y = K.modulated_silu(y, c.to(y.dtype), impl=impl)
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        clip = None if self.num_heads else self.clip_act
        x = K.mp_sum(x, y, self.res_balance, clip=clip, impl=impl)
        if self.num_heads:
            x = K.mp_sum(x, self.attention(x, impl), self.attn_balance, clip=self.clip_act, impl=impl)
        return x

    def attention(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        """Cosine self-attention over the pixels: q, k, v pixel-normalised per head (EDM2 App. B.6)."""
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        qkv = self.attn_qkv(x).permute(0, 2, 3, 1)                   # (B, H, W, 3C): a view when channels_last
        qkv = K.normalize(qkv.reshape(-1, d), impl=impl)             # (B*H*W*3*heads, d): each head's q, k, v
        q, k, v = qkv.view(B, H * W, 3, heads, d).permute(2, 0, 3, 1, 4)            # (B, heads, N, d) each
        y = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, N, d)
        y = y.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)               # (B, C, H, W)
        return self.attn_proj(y)


class EDM2UNet(nn.Module):
    """EDM2's UNet: an encoder of `len(channel_mult)` levels (each halves the resolution), a decoder that
    mirrors it with mp_cat skip connections, conditioned on time and class through one embedding."""

    def __init__(self,
        input_size: int = 64,                   # image/latent side (square), a multiple of 2^(levels-1)
        in_channels: int = 4,                   # C of x; the output has the same C
        num_classes: int = 1000,                # label id num_classes is the null class; 0 = unconditional
        channels: int = 192,                    # base channels; level i has channels * channel_mult[i]
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        num_res_blocks: int = 3,                # per encoder level (the decoder has one more)
        attn_resolutions: tuple[int, ...] = (16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.0,                   # residual-branch dropout
        label_balance: float = 0.5,             # mp_sum weight of the class embedding against the noise's
        concat_balance: float = 0.5,            # mp_cat share of the skip against the main path
        class_dropout_prob: float = 0.1,        # label dropout in train mode (classifier-free guidance)
        preconditioning: str = "none",          # none | edm (rectified flow only; see the module doc)
        sigma_data: float = 0.5,                # edm: the data's standard deviation
        uncertainty_weighting: bool = False,    # learned per-time loss weight u(t) (EDM2 Eq. 21)
        logvar_channels: int = 128,             # width of u's Fourier features
        kernels: str = "auto",                  # auto (triton on CUDA) | reference | triton: the MP ops
        channels_last: bool = True,             # run the activations channels_last
    ):
        super().__init__()
        levels = len(channel_mult)
        if input_size % (1 << (levels - 1)):
            raise ValueError(f"input_size {input_size} is not divisible by 2^{levels - 1} (len(channel_mult) levels)")
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"unknown preconditioning '{preconditioning}'; choose one of {', '.join(PRECONDITIONINGS)}")
        self.kernels = resolve_kernels(kernels)
        self.in_channels = self.out_channels = in_channels
        self.input_size, self.num_classes = input_size, num_classes
        self.label_balance, self.preconditioning, self.sigma_data = label_balance, preconditioning, sigma_data
        self.uncertainty_weighting, self.channels_last = uncertainty_weighting, channels_last
        # the objective asks for (out, logvar) when the loss is weighted per time
        self.loss_logvar = uncertainty_weighting or preconditioning == "edm"
        cblock = [channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        mp = dict(kernels=self.kernels)
        blk = dict(channels_per_head=channels_per_head, dropout=dropout, concat_balance=concat_balance, **mp)

        self.out_gain = nn.Parameter(torch.zeros(1))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, **mp)
        self.emb_label = MPLabelEmbedding(num_classes, cemb, class_dropout_prob, **mp) if num_classes else None
        if uncertainty_weighting:
            self.logvar_fourier = MPFourier(logvar_channels, seed=1)
            self.logvar_linear = MPConv(logvar_channels, 1, **mp)

        # Encoder (the first conv sees x plus a channel of ones, EDM2's stand-in for a bias) and decoder.
        # `blocks` is the list parallel.py wraps; `_skip` says per block: push its output as a skip
        # connection ("push"), take one ("pop"), or neither.
        self.enc_conv = MPConv(in_channels + 1, cblock[0], (3, 3), **mp)
        blocks, self._skip, names = [], [], []
        skips, cout = [cblock[0]], cblock[0]
        for level, ch in enumerate(cblock):
            res = input_size >> level
            if level:
                blocks.append(Block(cout, cout, cemb, "enc", "down", **blk))
                names.append(f"enc.{res}x{res}_down")
                skips.append(cout)
            for i in range(num_res_blocks):
                blocks.append(Block(cout, ch, cemb, "enc", attention=res in attn_resolutions, **blk))
                names.append(f"enc.{res}x{res}_block{i}")
                cout = ch
                skips.append(cout)
        self._skip = ["push"] * len(blocks)
        for level, ch in reversed(list(enumerate(cblock))):
            res = input_size >> level
            if level == levels - 1:
                blocks += [Block(cout, cout, cemb, "dec", attention=True, **blk), Block(cout, cout, cemb, "dec", **blk)]
                names += [f"dec.{res}x{res}_in0", f"dec.{res}x{res}_in1"]
            else:
                blocks.append(Block(cout, cout, cemb, "dec", "up", **blk))
                names.append(f"dec.{res}x{res}_up")
            self._skip += [None] * (1 if level < levels - 1 else 2)
            for i in range(num_res_blocks + 1):
                blocks.append(Block(cout + skips.pop(), ch, cemb, "dec", attention=res in attn_resolutions, **blk))
                names.append(f"dec.{res}x{res}_block{i}")
                self._skip.append("pop")
                cout = ch
        self.blocks = nn.ModuleList(blocks)
        self.block_names = names
        self.out_conv = MPConv(cout, in_channels, (3, 3), **mp)

    def mp_convs(self) -> list[MPConv]:
        return [m for m in self.modules() if isinstance(m, MPConv)]

    @torch.no_grad()
    def post_optimizer_step(self) -> None:
        """Forced weight normalisation (EDM2 Sec. 2.5, Eq. 69): every MPConv weight's rows back to unit
        RMS, in place, on this rank's local part (whole rows under FSDP2). Call after optimizer.step()."""
        for conv in self.mp_convs():
            w = _local(conv.weight)
            K.normalize_weight_(w, impl=_impl(self.kernels, w))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None, return_logvar: bool = False):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long in [0, num_classes] -> (B, C, H, W)
        (and the per-sample log loss weight (B,) with return_logvar)."""
        if self.preconditioning == "edm":
            c_in, c_noise, a, b, log_lambda = edm_preconditioning(t, self.sigma_data)
            h = c_in.view(-1, 1, 1, 1) * x.float()
        else:
            c_noise, h = t.float(), x
        # -- embedding
        # (fp32 whatever the parameters' dtype, so one rank and FSDP2 agree: parallel.py)
        emb = self.emb_noise(self.emb_fourier(c_noise)).float()                         # (B, cemb)
        if self.emb_label is not None:
            emb = K.mp_sum(emb, self.emb_label(y, force_drop_ids).float(), self.label_balance, impl="reference")
        emb = K.mp_silu(emb, impl="reference")                                          # (B, cemb): tiny
        # -- encoder, decoder
        h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)                            # (B, C + 1, H, W)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.enc_conv(h.to(self.enc_conv.weight.dtype))
        skips = [h]
        for block, role in zip(self.blocks, self._skip):
            h = block(h, emb, skips.pop()) if role == "pop" else block(h, emb)
            if role == "push":
                skips.append(h)
        out = self.out_conv(h, gain=self.out_gain).contiguous()                         # (B, C, H, W)
        if self.preconditioning == "edm":
            out = a.view(-1, 1, 1, 1) * x.float() - b.view(-1, 1, 1, 1) * out.float()   # v = a x_t - b F
        if not return_logvar:
            return out
        logvar = torch.zeros_like(c_noise)
        if self.uncertainty_weighting:
            logvar = logvar + self.logvar_linear(self.logvar_fourier(c_noise)).float().squeeze(1)
        if self.preconditioning == "edm":
            logvar = logvar - log_lambda                                                # weight lambda / exp(u)
        return out, logvar

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Forward multiply-adds for one image: every MPConv at its resolution (the conditioning linears
        once per image) and the two attention matmuls (Q K^T and A V, all heads). Not counted: weight
        normalisation, norms, activations, sums, resampling (all O(pixels x channels)).
        Training FLOPs = 6 x this."""
        total, res = 0, self.input_size
        side = {"keep": 1, "down": 0.5, "up": 2}

        def conv(m, pixels):
            return m.weight.numel() * pixels

        total += conv(self.enc_conv, res * res) + conv(self.out_conv, res * res) + self.emb_noise.weight.numel()
        for block in self.blocks:
            res = int(res * side[block.resample_mode])
            n = res * res
            total += conv(block.conv_res0, n) + conv(block.conv_res1, n) + block.emb_linear.weight.numel()
            if block.conv_skip is not None:
                total += conv(block.conv_skip, n)
            if block.num_heads:
                total += conv(block.attn_qkv, n) + conv(block.attn_proj, n) + 2 * n * n * block.out_channels
        return total
