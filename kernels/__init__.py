"""archirf_kernels: fused Triton kernels for diffusion/flow models, usable without the trainer.

Every op has a pure-PyTorch specification in `archirf_kernels.reference`. The functional API picks
the implementation per call with `impl`:

    "auto"       Triton on CUDA tensors when triton is installed, else the reference
    "triton"     the Triton kernels; a ValueError on CPU tensors (unless the kernels run in Triton's
                 interpreter, TRITON_INTERPRET=1 set before import, as the CPU tests do)
    "reference"  the pure-PyTorch spec

Both run the same argument checks (archirf_kernels.checks, one function per op): a call that passes
on a CPU passes on a GPU.

    import archirf_kernels as K
    h = K.ada_layer_norm(x, shift, scale)                                # LN(x) * (1 + scale) + shift
    x, h = K.gated_residual_ada_layer_norm(x, attn_out, gate, shift2, scale2)
    x = K.gated_residual(x, mlp_out, gate2)                              # x + gate * y
    out = K.qk_norm_attention(qkv, q_weight, k_weight)                   # qkv (B, N, 3, H, D) -> (B, N, H*D)
    out_img, out_ctx = K.joint_qk_norm_attention(qkv_img, qkv_ctx, qw_img, kw_img, qw_ctx, kw_ctx)  # MMDiT
    n, s = K.normalize_silu(x)                                           # EDM2: pixel norm, mp_silu of it
    h = K.group_norm_silu(x, weight, bias, 32)                           # silu(GroupNorm(x)): LDM's ResnetBlock
    x, h = K.group_norm_silu(h, weight, bias, 32, residual=x)            # (s, silu(GroupNorm(s))), s = h + x
    h = K.channel_rms_norm_silu(x, weight)                               # silu(x / |x|_C * sqrt(C) * weight)
    q = K.qk_norm_rope(q, q_weight, cos, sin)                            # Flux: RMSNorm per head, then RoPE
    K.adamw_ema_step(params, grads, m, v, step, lr=1e-4, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0,
                     emas=[ema], ema_rates=[1e-4], grad_scale=clip)      # AdamW + EMA in one pass, in place
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

from . import checks, reference

IMPLS = ("auto", "reference", "triton")

# Checked without importing triton here: importing it decides once whether the kernels are built for
# the interpreter (TRITON_INTERPRET), and a broken install should fail loudly, not fall back silently.
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from . import ada_norm, attention, mp, norm_silu, optim, rope

__all__ = ["reference", "HAS_TRITON", "IMPLS", "ada_layer_norm", "gated_residual",
           "gated_residual_ada_layer_norm", "qk_norm_attention", "joint_qk_norm_attention", "AdaLayerNorm",
           "GatedResidualAdaLayerNorm", "normalize", "normalize_silu", "mp_silu", "mp_sum", "modulated_silu",
           "mp_cat", "mp_cat_silu", "mp_weight", "normalize_weight_", "group_norm_silu", "channel_rms_norm_silu",
           "adamw_ema_step", "qk_norm_rope"]


def _use_triton(impl: str, x: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    if impl == "auto":
        return HAS_TRITON and x.is_cuda
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError("impl='triton': triton is not installed; use impl='auto' or 'reference'")
        if not x.is_cuda and not ada_norm.INTERPRETED:
            raise ValueError(f"impl='triton' needs CUDA tensors, got a tensor on {x.device}; use impl='auto' "
                             "(reference off CUDA) or 'reference'")
        return True
    raise ValueError(f"unknown impl '{impl}'; choose one of {', '.join(IMPLS)}")


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-6, norm: str = "layer", impl: str = "auto") -> torch.Tensor:
    """N(x) * (1 + scale) + shift; N = LayerNorm ("layer") or RMSNorm ("rms") over C, optional affine.
    x (B, N, C); shift, scale (B, C) or (B, N, C). See reference.ada_layer_norm."""
    if _use_triton(impl, x):
        return ada_norm.ada_layer_norm(x, shift, scale, weight, bias, eps, norm)
    checks.ada_layer_norm(x, shift, scale, weight, bias, norm)
    return reference.ada_layer_norm(x, shift, scale, weight, bias, eps, norm)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x + gate * y; gate (B, C) or (B, N, C). See reference.gated_residual."""
    if _use_triton(impl, x):
        return ada_norm.gated_residual(x, y, gate)
    checks.gated_residual(x, y, gate)
    return reference.gated_residual(x, y, gate)


def gated_residual_ada_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                  shift: torch.Tensor, scale: torch.Tensor,
                                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                  eps: float = 1e-6, norm: str = "layer",
                                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h) = (x + gate * y, ada_layer_norm(x_new, shift, scale, ...)) in one pass: the DiT block
    boundary. See reference.gated_residual_ada_layer_norm."""
    if _use_triton(impl, x):
        return ada_norm.gated_residual_ada_layer_norm(x, y, gate, shift, scale, weight, bias, eps, norm)
    checks.gated_residual_ada_layer_norm(x, y, gate, shift, scale, weight, bias, norm)
    return reference.gated_residual_ada_layer_norm(x, y, gate, shift, scale, weight, bias, eps, norm)


def _check_backend(backend: str) -> None:
    """The attention backend is checked whichever implementation runs (the reference ignores it)."""
    if backend not in reference.ATTENTION_BACKENDS:
        raise ValueError(f"archirf_kernels attention: unknown backend '{backend}'; choose one of "
                         f"{', '.join(reference.ATTENTION_BACKENDS)}")


def _first_tensor(qkv) -> torch.Tensor:
    return qkv if isinstance(qkv, torch.Tensor) else qkv[0]


def qk_norm_attention(qkv, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                      eps: float | tuple[float, float] = 1e-6, scale: float | None = None, qk_norm: bool = True,
                      impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """softmax(N(q) N(k)^T * scale) v with per-head RMSNorm N over D (SD3's QK-norm) -> (B, N, H*D).
    qkv: the projection's (B, N, 3, H, D), or a tuple (q, k, v) of (B, N, H, D) views; weights (D,) or
    None; eps one float or (q_eps, k_eps); scale D^-1/2 by default; qk_norm=False: plain attention.
    backend (Triton only): 'fused' (the norm inside the flash kernels: the least memory), 'sdpa' (a Triton
    pass writes the normalised operands, then PyTorch's SDPA, cuDNN first), 'auto' (attention.choose_backend,
    from measurements: fused up to 512 tokens with head dims up to 64, else sdpa). See reference.qk_norm_attention."""
    _check_backend(backend)
    if _use_triton(impl, _first_tensor(qkv)):
        return attention.qk_norm_attention(qkv, q_weight, k_weight, eps, scale, qk_norm, backend)
    checks.attention(checks.attention_streams(qkv, None), (q_weight, k_weight, None, None), qk_norm)
    return reference.qk_norm_attention(qkv, q_weight, k_weight, eps, scale, qk_norm)


def joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img: torch.Tensor | None = None,
                            k_weight_img: torch.Tensor | None = None, q_weight_ctx: torch.Tensor | None = None,
                            k_weight_ctx: torch.Tensor | None = None, eps: float | tuple[float, float] = 1e-6,
                            scale: float | None = None, qk_norm: bool = True,
                            impl: str = "auto", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """MMDiT joint attention: image and context streams, each with its own qkv and QK-norm weights, attend
    over the keys [img, ctx] -> (out_img (B, N_img, H*D), out_ctx (B, N_ctx, H*D)); the concatenation
    is never materialised by the fused backend (the sdpa backend's prep pass writes it). backend as in
    qk_norm_attention. See reference.joint_qk_norm_attention."""
    _check_backend(backend)
    if _use_triton(impl, _first_tensor(qkv_img)):
        return attention.joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img, k_weight_img, q_weight_ctx,
                                                 k_weight_ctx, eps, scale, qk_norm, backend)
    checks.attention(checks.attention_streams(qkv_img, qkv_ctx), (q_weight_img, k_weight_img, q_weight_ctx,
                                                                  k_weight_ctx), qk_norm)
    return reference.joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img, k_weight_img, q_weight_ctx,
                                             k_weight_ctx, eps, scale, qk_norm)


class AdaLayerNorm(nn.Module):
    """adaLN: forward(x, shift, scale) = N(x) * (1 + scale) + shift, N over the last dim C."""

    def __init__(self,
        num_channels: int,                      # C
        eps: float = 1e-6,
        norm: str = "layer",                    # layer | rms
        elementwise_affine: bool = False,       # learnable weight (and bias, LayerNorm only) inside N
        impl: str = "auto",                     # auto | triton | reference
    ):
        super().__init__()
        reference._check_norm(norm, None)
        if impl not in IMPLS:
            raise ValueError(f"unknown impl '{impl}'; choose one of {', '.join(IMPLS)}")
        self.eps, self.norm, self.impl = eps, norm, impl
        self.weight = nn.Parameter(torch.ones(num_channels)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if elementwise_affine and norm == "layer" else None

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ada_layer_norm(x, shift, scale, self.weight, self.bias, self.eps, self.norm, self.impl)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, norm={self.norm}, affine={self.weight is not None}, impl={self.impl}"


class GatedResidualAdaLayerNorm(AdaLayerNorm):
    """The DiT block boundary: forward(x, y, gate, shift, scale) = (x + gate * y, adaLN of that)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,   # type: ignore[override]
                shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gated_residual_ada_layer_norm(x, y, gate, shift, scale, self.weight, self.bias, self.eps,
                                             self.norm, self.impl)


# ----------------------------------------------------------------------------------------------
# EDM2 magnitude-preserving layers (kernels/mp.py; the spec is the reference section of the same name).
# Activations (B, C, H, W) in either memory format, or (M, C) rows; "channels" is dim 1.

def normalize(x: torch.Tensor, eps: float = reference.MP_EPS, impl: str = "auto") -> torch.Tensor:
    """x / (eps + RMS over the channels): EDM2's pixel norm (per row for (M, C)). See reference.normalize."""
    if _use_triton(impl, x):
        return mp.normalize(x, eps)
    checks.activation("normalize", x)
    return reference.normalize(x, dim=1, eps=eps)


def normalize_silu(x: torch.Tensor, eps: float = reference.MP_EPS,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, mp_silu(n)) with n = normalize(x): an EDM2 encoder block's main path and its residual branch's
    input in one pass. See reference.normalize_silu."""
    if _use_triton(impl, x):
        return mp.normalize_silu(x, eps)
    checks.activation("normalize_silu", x)
    return reference.normalize_silu(x, eps)


def mp_silu(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(x) / 0.596, any shape. See reference.mp_silu."""
    if _use_triton(impl, x):
        return mp.mp_silu(x)
    checks.activation("mp_silu", x, range(0, 9))
    return reference.mp_silu(x)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, clip: float | None = None,
           impl: str = "auto") -> torch.Tensor:
    """lerp(a, b, t) / sqrt((1-t)^2 + t^2), then clamped to [-clip, clip] if clip is set. See reference.mp_sum."""
    if _use_triton(impl, a):
        return mp.mp_sum(a, b, t, clip)
    checks.mp_sum(a, b, clip)
    return reference.mp_sum(a, b, t, clip)


def modulated_silu(y: torch.Tensor, c: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """mp_silu(y * c), y (B, C, H, W), c (B, C): EDM2's embedding modulation. See reference.modulated_silu."""
    if _use_triton(impl, y):
        return mp.modulated_silu(y, c)
    checks.modulated_silu(y, c)
    return reference.modulated_silu(y, c)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, impl: str = "auto") -> torch.Tensor:
    """Magnitude-preserving concatenation along the channels. See reference.mp_cat."""
    if _use_triton(impl, a):
        return mp.mp_cat(a, b, t)
    checks.mp_cat("mp_cat", a, b)
    return reference.mp_cat(a, b, t)


def mp_cat_silu(a: torch.Tensor, b: torch.Tensor, t: float = 0.5,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, mp_silu(x)) with x = mp_cat(a, b, t): an EDM2 decoder block's input. See reference.mp_cat_silu."""
    if _use_triton(impl, a):
        return mp.mp_cat_silu(a, b, t)
    checks.mp_cat("mp_cat_silu", a, b)
    return reference.mp_cat_silu(a, b, t)


def mp_weight(w: torch.Tensor, gain: torch.Tensor | None = None, eps: float = reference.MP_EPS,
              impl: str = "auto") -> torch.Tensor:
    """MPConv's weight: rows normalised over their fan-in, times gain / sqrt(fan_in). See reference.mp_weight."""
    if _use_triton(impl, w):
        return mp.mp_weight(w, gain, eps)
    checks.mp_weight("mp_weight", w, gain)
    return reference.mp_weight(w, gain, eps)


def normalize_weight_(w: torch.Tensor, eps: float = reference.MP_EPS, impl: str = "auto") -> torch.Tensor:
    """Forced weight normalisation, in place, no gradient: rows to unit RMS. See reference.normalize_weight_."""
    if _use_triton(impl, w) and w.is_contiguous():
        return mp.normalize_weight_(w, eps)
    checks.mp_weight("normalize_weight_", w, None)
    return reference.normalize_weight_(w, eps)


# ----------------------------------------------------------------------------------------------
# The autoencoder's norms + SiLU (kernels/norm_silu.py; the spec is the reference section of the same
# name). x (B, C, H, W) in either memory format; the channel RMSNorm also takes (M, C) rows.

def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float = 1e-6, residual: torch.Tensor | None = None, impl: str = "auto"):
    """silu(GroupNorm(x) * weight + bias), statistics in fp32 over C/groups channels x H x W. With
    `residual` (shaped like x): (s, silu(GroupNorm(s) * weight + bias)), s = x + residual in x's dtype.
    See reference.group_norm_silu."""
    if _use_triton(impl, x):
        return norm_silu.group_norm_silu(x, weight, bias, groups, eps, residual)
    checks.group_norm_silu(x, weight, bias, groups, residual)
    return reference.group_norm_silu(x, weight, bias, groups, eps, residual)


def channel_rms_norm_silu(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
                          impl: str = "auto") -> torch.Tensor:
    """silu(x / max(|x|, eps) * sqrt(C) * weight), the norm per pixel over the channels (the seed
    autoencoder's ChannelRMSNorm). See reference.channel_rms_norm_silu."""
    if _use_triton(impl, x):
        return norm_silu.channel_rms_norm_silu(x, weight, eps)
    checks.channel_rms_norm_silu(x, weight)
    return reference.channel_rms_norm_silu(x, weight, eps)


# ----------------------------------------------------------------------------------------------
# The optimizer step (kernels/optim.py; the spec is reference.adamw_ema_step): fp32 lists, in place.

def adamw_ema_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                   exp_avg_sqs: list[torch.Tensor], step: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                   eps: float, weight_decay: float, emas=(), ema_rates=(), grad_scale: torch.Tensor | None = None,
                   impl: str = "auto", check: bool = True) -> None:
    """AdamW (torch.optim.AdamW's update; `step` the count after this step: a scalar tensor, or one per
    parameter) on gradients times `grad_scale`, then each EMA list lerped toward the new weights by its rate
    (1 - decay): one pass over every tensor. check=False: the caller checked these tensors already. See
    reference.adamw_ema_step."""
    if params and _use_triton(impl, params[0]):
        return optim.adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2,
                                    eps=eps, weight_decay=weight_decay, emas=emas, ema_rates=ema_rates,
                                    grad_scale=grad_scale, check=check)
    steps = list(step) if isinstance(step, (list, tuple)) else None
    if check:
        checks.adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, [list(e) for e in emas], ema_rates, steps=steps)
    if steps is not None:       # the reference: one parameter at a time with its own count
        for i, s in enumerate(steps):
            reference.adamw_ema_step([params[i]], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]], s, lr=lr, beta1=beta1,
                                     beta2=beta2, eps=eps, weight_decay=weight_decay, emas=[[e[i]] for e in emas],
                                     ema_rates=ema_rates, grad_scale=grad_scale)
        return None
    return reference.adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2,
                                    eps=eps, weight_decay=weight_decay, emas=emas, ema_rates=ema_rates,
                                    grad_scale=grad_scale)


# ----------------------------------------------------------------------------------------------
# Flux's q / k prep (kernels/rope.py; the spec is reference.qk_norm_rope).

def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over each head's D (eps under the root, optional weight), then the interleaved rotary embedding
    with cos, sin (S, D) fp32: x (B, S, H, D) -> (B, S, H, D) in x's dtype. See reference.qk_norm_rope."""
    if _use_triton(impl, x):
        return rope.qk_norm_rope(x, weight, cos, sin, eps)
    checks.qk_norm_rope(x, weight, cos, sin)
    return reference.qk_norm_rope(x, weight, cos, sin, eps)
