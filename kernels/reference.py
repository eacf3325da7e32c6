"""Pure-PyTorch specification of every fused op. Tests, benchmarks and the CPU fallback use it.

Math in fp32 whatever the storage dtype (fp64 stays fp64: tests run the spec on .double() inputs);
results are returned in the input's dtype (for the adaLN family: x's dtype, whatever the dtype
of the modulation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORMS = ("layer", "rms")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim (Zhang & Sennrich 2019)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_token(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B, C) conditioning tensor -> (B, 1, C), broadcast over x's tokens; (B, N, C) as is."""
    while t.dim() < x.dim():
        t = t.unsqueeze(1)
    return t


# adaLN modulation (Peebles & Xie 2023, Sec. 3.2): x * (1 + scale) + shift. shift/scale are either
# per-sample (B, C), broadcast over all tokens, or already per-token (B, N, C) / (B, 1, C).
# The one modulate of the tree: archirf.models.layers re-exports it.
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + _per_token(scale, x)) + _per_token(shift, x)


def _check_norm(norm: str, bias: torch.Tensor | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    if norm == "rms" and bias is not None:
        raise ValueError("norm='rms' has no bias (RMSNorm only scales); pass bias=None")


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer") -> torch.Tensor:
    """h = modulate(N(x), shift, scale): N = LayerNorm (Ba et al. 2016) or RMSNorm over C, with the
    optional affine N(x) * weight + bias. x (B, N, C); shift, scale (B, C) or (B, N, C) -> (B, N, C)
    in x's dtype."""
    _check_norm(norm, bias)
    xf = _upcast(x)
    if norm == "layer":
        n = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    else:
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        n = n * _upcast(weight)
    if bias is not None:
        n = n + _upcast(bias)
    return modulate(n, _upcast(shift), _upcast(scale)).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y: adaLN-Zero's gated residual (DiT Sec. 3.2). gate (B, C) or (B, N, C); in x's dtype."""
    return (_upcast(x) + _upcast(_per_token(gate, x)) * _upcast(y)).to(x.dtype)


def gated_residual_ada_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                  shift: torch.Tensor, scale: torch.Tensor,
                                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                  eps: float = 1e-6, norm: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT block boundary: x_new = x + gate * y (stored in x's dtype), h = ada_layer_norm(x_new, ...).
    Returns (x_new, h): x_new continues the residual stream, h feeds the next sub-layer."""
    x_new = gated_residual(x, y, gate)
    return x_new, ada_layer_norm(x_new, shift, scale, weight, bias, eps, norm)


# ----------------------------------------------------------------------------------------------
# Attention.

# softmax(Q K^T / sqrt(d)) V with every product in fp32 (Vaswani et al. 2017, Eq. 1): the spec of the
# models' attention on (B, H, N, Dh) heads, which their sdpa path is tested against.
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, H, N, Dh) -> (B, H, N, Dh) in v's dtype."""
    scale = q.shape[-1] ** -0.5
    scores = (_upcast(q) * scale) @ _upcast(k).transpose(-2, -1)           # (B, H, N, N)
    return (scores.softmax(dim=-1) @ _upcast(v)).to(v.dtype)


def unpack_qkv(qkv, name: str = "qkv") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv projection's output (B, N, 3, H, D), or a tuple (q, k, v) of (B, N, H, D) tensors
    (any strides) -> (q, k, v), (B, N, H, D) views each."""
    if isinstance(qkv, torch.Tensor):
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(f"{name} must be (B, N, 3, H, D) (the qkv projection reshaped), got {tuple(qkv.shape)}")
        return qkv.unbind(2)
    if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
        raise ValueError(f"{name} must be a (B, N, 3, H, D) tensor or a tuple (q, k, v) of (B, N, H, D) tensors")
    q, k, v = qkv
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{name}: q, k, v must be (B, N, H, D) each with equal shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return q, k, v


# The attention ops' Triton backends (archirf_kernels.attention.choose_backend); the reference ignores them.
ATTENTION_BACKENDS = ("auto", "fused", "sdpa")
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # what the Triton attention ops take
ATTENTION_MAX_HEAD_DIM = 256


def qk_eps(eps: float | tuple[float, float]) -> tuple[float, float]:
    """eps of the q and of the k RMSNorm: one float for both, or a pair (q_eps, k_eps)."""
    if isinstance(eps, (tuple, list)):
        q_eps, k_eps = eps
        return float(q_eps), float(k_eps)
    return float(eps), float(eps)


def _qk_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the head dim D of (B, N, H, D), with the optional learnable (D,) scale; upcast."""
    xf = _upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * _upcast(weight) if weight is not None else y


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, N, H, D) tensors, non-causal -> (B, Nq, H, D), dtype kept."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale                  # (B, H, Nq, Nk)
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v)


def joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img: torch.Tensor | None = None,
                            k_weight_img: torch.Tensor | None = None, q_weight_ctx: torch.Tensor | None = None,
                            k_weight_ctx: torch.Tensor | None = None, eps: float | tuple[float, float] = 1e-6,
                            scale: float | None = None, qk_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MMDiT joint attention (SD3, Esser et al. 2024, Sec. 4 and Fig. 2): two token streams, each with
    its own qkv projection and its own QK-RMSNorm scales, attend jointly over their concatenation.

    qkv_img (B, N_img, 3, H, D) and qkv_ctx (B, N_ctx, 3, H, D), or (q, k, v) tuples of (B, N, H, D).
    Each stream's q and k are RMS-normalised over D with their stream's (D,) weights (None: no scale;
    qk_norm=False: no norm at all), then softmax(q k^T * scale) v (scale: D^-1/2 by default) over the
    keys [img, ctx] -- image tokens first, as diffusers' JointAttnProcessor2_0 (SD3's reference code and
    Flux put the text first; non-causal attention is invariant to the order of the keys, so the choice
    only changes rounding). eps: one float, or (q_eps, k_eps). Returns (out_img (B, N_img, H*D),
    out_ctx (B, N_ctx, H*D)) in v's dtype, ready for each stream's output projection; math in fp32 (fp64
    stays fp64)."""
    qi, ki, vi = unpack_qkv(qkv_img, "qkv_img")
    qc, kc, vc = unpack_qkv(qkv_ctx, "qkv_ctx")
    q_eps, k_eps = qk_eps(eps)
    if qk_norm:
        qi, ki = _qk_rms_norm(qi, q_weight_img, q_eps), _qk_rms_norm(ki, k_weight_img, k_eps)
        qc, kc = _qk_rms_norm(qc, q_weight_ctx, q_eps), _qk_rms_norm(kc, k_weight_ctx, k_eps)
    q = torch.cat([_upcast(qi), _upcast(qc)], dim=1)                         # (B, N_img + N_ctx, H, D)
    k = torch.cat([_upcast(ki), _upcast(kc)], dim=1)
    v = torch.cat([_upcast(vi), _upcast(vc)], dim=1)
    B, n_img, H, D = vi.shape
    out = _softmax_attention(q, k, v, D ** -0.5 if scale is None else scale).to(vi.dtype)
    out_img, out_ctx = out.split([n_img, vc.shape[1]], dim=1)
    return out_img.reshape(B, n_img, H * D), out_ctx.reshape(B, vc.shape[1], H * D)


def qk_norm_attention(qkv, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                      eps: float | tuple[float, float] = 1e-6, scale: float | None = None,
                      qk_norm: bool = True) -> torch.Tensor:
    """Self-attention with per-head QK-RMSNorm (SD3, Esser et al. 2024) from the qkv projection's layout.

    qkv (B, N, 3, H, D), or a tuple (q, k, v) of (B, N, H, D) tensors. q and k are RMS-normalised over
    D, q = q / sqrt(mean_D(q^2) + q_eps) * q_weight and likewise k (Zhang & Sennrich 2019; weights None:
    no scale; qk_norm=False: plain attention), then softmax(q k^T * scale) v, non-causal, scale D^-1/2
    by default (Vaswani et al. 2017, Eq. 1). eps: one float, or (q_eps, k_eps). Returns the heads
    merged, (B, N, H*D), in v's dtype; math in fp32 (fp64 stays fp64)."""
    q, k, v = unpack_qkv(qkv)
    q_eps, k_eps = qk_eps(eps)
    if qk_norm:
        q, k = _qk_rms_norm(q, q_weight, q_eps), _qk_rms_norm(k, k_weight, k_eps)
    B, N, H, D = v.shape
    out = _softmax_attention(_upcast(q), _upcast(k), _upcast(v), D ** -0.5 if scale is None else scale)
    return out.to(v.dtype).reshape(B, N, H * D)


# ----------------------------------------------------------------------------------------------
# EDM2 magnitude-preserving (MP) layers (Karras et al. 2024, "Analyzing and Improving the Training
# Dynamics of Diffusion Models", Sec. 2.2-2.5 and App. B; config G). Activations are (B, C, H, W) in
# either memory format, or (M, C) rows; "channels" is dim 1. Math in fp32 (fp64 stays fp64), results in
# the first input's dtype.

MP_SILU_SCALE = 0.596   # sqrt(E[silu(x)^2]) for x ~ N(0, 1): silu / 0.596 keeps unit magnitude (Eq. 81)
MP_EPS = 1e-4           # EDM2's normalize(): eps added to the RMS, not under the square root


# Pixel norm / per-row normalisation (Eq. 46): x / (eps + RMS of x over `dim`); dim None = every dim but
# the first (a weight's rows: output channels over their fan-in).
def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = 1, eps: float = MP_EPS) -> torch.Tensor:
    xf = _upcast(x)
    dim = tuple(range(1, x.dim())) if dim is None else dim
    rms = xf.square().mean(dim=dim, keepdim=True).sqrt()
    return (xf / (eps + rms)).to(x.dtype)


# Magnitude-preserving SiLU (Eq. 81).
def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return (F.silu(_upcast(x)) / MP_SILU_SCALE).to(x.dtype)


# Magnitude-preserving sum (Eq. 88): lerp(a, b, t) / sqrt((1-t)^2 + t^2); the optional clip is EDM2's
# clip(-256, 256) of a block's output (App. B.7).
def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, clip: float | None = None) -> torch.Tensor:
    out = (_upcast(a) * (1 - t) + _upcast(b) * t) / ((1 - t) ** 2 + t ** 2) ** 0.5
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out.to(a.dtype)


def mp_cat_weights(ca: int, cb: int, t: float) -> tuple[float, float]:
    """The scales of a and b in mp_cat (Eq. 103): the result has unit magnitude and b's share is t."""
    c = ((ca + cb) / ((1 - t) ** 2 + t ** 2)) ** 0.5
    return c / ca ** 0.5 * (1 - t), c / cb ** 0.5 * t


# Magnitude-preserving concatenation along the channels (Eq. 103): the decoder's skip connections.
def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    wa, wb = mp_cat_weights(a.shape[1], b.shape[1], t)
    fmt = torch.channels_last if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) \
        and not a.is_contiguous() else torch.contiguous_format
    return torch.cat([_upcast(a) * wa, _upcast(b) * wb], dim=1).to(a.dtype).contiguous(memory_format=fmt)


# MPConv's weight (Eq. 66-67): each output channel's row normalised over its fan-in, times gain / sqrt(fan_in),
# so that w x has the magnitude of x times gain. gain None = 1; a (1,) tensor is a learned gain.
def mp_weight(w: torch.Tensor, gain: torch.Tensor | None = None, eps: float = MP_EPS) -> torch.Tensor:
    fan_in = w[0].numel()
    out = _upcast(normalize(_upcast(w), dim=None, eps=eps)) / fan_in ** 0.5
    if gain is not None:
        out = out * _upcast(gain)
    return out.to(w.dtype)


# Forced weight normalisation (Sec. 2.5, Eq. 69): the stored weight's rows are reset to unit RMS after
# every optimizer step (and at init). In place, no gradient.
@torch.no_grad()
def normalize_weight_(w: torch.Tensor, eps: float = MP_EPS) -> torch.Tensor:
    return w.copy_(normalize(w, dim=None, eps=eps))


# --- fusions along an EDM2 block's data path (the spec of kernels/mp.py)

def normalize_silu(x: torch.Tensor, eps: float = MP_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder block: the pixel-normed main path and the mp_silu that feeds conv_res0 -> (n, mp_silu(n))."""
    n = normalize(x, dim=1, eps=eps)
    return n, mp_silu(n)


def modulated_silu(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The embedding's modulation then mp_silu: mp_silu(y * c), c (B, C) per sample and channel (the block
    computes c = 1 + emb_linear(emb)), broadcast over H, W. In y's dtype."""
    return (F.silu(_upcast(y) * _upcast(c)[:, :, None, None]) / MP_SILU_SCALE).to(y.dtype)


def mp_cat_silu(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder block input: x = mp_cat(a, b, t) (skip connection) and mp_silu(x) for conv_res0 -> (x, mp_silu(x))."""
    x = mp_cat(a, b, t)
    return x, mp_silu(x)


# ----------------------------------------------------------------------------------------------
# The autoencoder's norms and SiLU (LDM's ResnetBlock: conv(silu(norm(x))), Rombach et al. 2022).
# Activations (B, C, H, W) in either memory format; math in fp32 (fp64 stays fp64), results in x's dtype.

# GroupNorm (Wu & He 2018, Eq. 1-3: statistics over C/groups channels x H x W per sample and group,
# biased variance, eps under the square root) with its per-channel affine, then SiLU. With `residual`,
# the previous block's residual add goes first: s = x + residual, stored in x's dtype, and the norm
# reads s as stored -> (s, silu(group_norm(s))).
def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float = 1e-6, residual: torch.Tensor | None = None):
    s = x if residual is None else (_upcast(x) + _upcast(residual)).to(x.dtype)
    n = F.group_norm(_upcast(s), groups, eps=eps)      # the affine outside: torch's backward fails on bias alone
    if weight is not None:
        n = n * _upcast(weight)[:, None, None]
    if bias is not None:
        n = n + _upcast(bias)[:, None, None]
    y = F.silu(n).to(x.dtype)
    return y if residual is None else (s, y)


# The seed autoencoder's channel RMSNorm, then SiLU: x / max(||x||_2 over the channels, eps) * sqrt(C) * weight
# (F.normalize: eps clamps the norm, it is not added under the square root), per pixel; a row norm of
# (B, C, H, W) in channels_last, or of (M, C) rows. Bit for bit the model's ChannelRMSNorm in fp32.
def channel_rms_norm_silu(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    C = x.shape[1]
    n = F.normalize(_upcast(x), dim=1, eps=eps)
    k = math.sqrt(C) if weight is None else (_upcast(weight) * math.sqrt(C)).reshape(1, C, *[1] * (x.dim() - 2))
    return F.silu(n * k).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The optimizer step (kernels/optim.py): AdamW as torch.optim.AdamW computes it, then each EMA.

@torch.no_grad()
def adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, beta1, beta2, eps, weight_decay,
                   emas=(), ema_rates=(), grad_scale=None) -> None:
    """In place: g = grad * grad_scale; AdamW (decoupled weight decay, bias correction by the step count
    `step`, the count after this step); then each EMA list lerps toward the new weights by its rate."""
    n = float(step)
    bc1, bc2 = 1 - beta1 ** n, 1 - beta2 ** n
    for i, p in enumerate(params):
        g = grads[i] * grad_scale if grad_scale is not None else grads[i]
        exp_avgs[i].lerp_(g, 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.mul_(1 - lr * weight_decay)
        p.addcdiv_(exp_avgs[i], (exp_avg_sqs[i].sqrt() / math.sqrt(bc2)).add_(eps), value=-lr / bc1)
        for ema, rate in zip(emas, ema_rates):
            ema[i].lerp_(p, rate)


# ----------------------------------------------------------------------------------------------
# Flux's q / k prep (kernels/rope.py): per-head RMSNorm, then the interleaved rotary embedding.

def qk_norm_rope(x, weight, cos, sin, eps: float = 1e-6):
    """x (B, S, H, D); weight (D,) or None; cos, sin (S, D). RMSNorm over D with eps under the root (diffusers'
    RMSNorm), then y = n cos + rot(n) sin with rot(n)_{2i} = -n_{2i+1}, rot(n)_{2i+1} = n_{2i} (diffusers'
    apply_rotary_emb, use_real=True, use_real_unbind_dim=-1). Math in x's dtype's fp32 or wider; output in x's
    dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        n = n * weight.to(dt)
    pairs = n.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    c, s = cos.to(dt)[None, :, None, :], sin.to(dt)[None, :, None, :]
    return (n * c + rot * s).to(x.dtype)
