"""Argument checks of every op, one function per op, run by both implementations: the Triton launchers
and the reference fallback of the functional API. A call accepted on a CPU is then accepted on a GPU
(int64 inputs, a wrongly shaped shift or a second device fail on both alike). Limits of the Triton
kernels alone (CUDA tensors, the row width, the head dim) stay with their launchers.
"""

from __future__ import annotations

import math

import torch

from .reference import NORMS, unpack_qkv

Tensor = torch.Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in DTYPES:
        raise ValueError(f"archirf_kernels {op}: {name} dtype {t.dtype} is not fp16, bf16 or fp32")


def _device(op: str, name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"archirf_kernels {op}: {name} is on {t.device}, {like_name} on {like.device}")


# ----------------------------------------------------------------------------------------------
# adaLN family: x, y (B, N, C); shift, scale, gate per sample (B, C) / (B, 1, C) or per token (B, N, C).

def _activation(name: str, t: Tensor, x: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"archirf_kernels adaLN: {name} must be (B, N, C), got shape {tuple(t.shape)}")
    if t.shape != x.shape:
        raise ValueError(f"archirf_kernels adaLN: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    _dtype("adaLN", name, t)
    _device("adaLN", name, t, "x", x)


def _conditioning(name: str, t: Tensor, x: Tensor) -> None:
    B, N, C = x.shape
    if tuple(t.shape) not in ((B, C), (B, 1, C), (B, N, C)):
        raise ValueError(f"archirf_kernels adaLN: {name} must be per sample (B, C) = ({B}, {C}) or "
                         f"(B, 1, C), or per token (B, N, C) = ({B}, {N}, {C}); got {tuple(t.shape)}")
    _dtype("adaLN", name, t)
    _device("adaLN", name, t, "x", x)


def _affine(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != (x.shape[-1],):
        raise ValueError(f"archirf_kernels adaLN: {name} must be (C,) = ({x.shape[-1]},), got {tuple(t.shape)}")
    _dtype("adaLN", name, t)
    _device("adaLN", name, t, "x", x)


def ada_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
                   norm: str) -> None:
    _activation("x", x, x)
    _conditioning("shift", shift, x)
    _conditioning("scale", scale, x)
    if shift.shape != scale.shape:
        raise ValueError(f"archirf_kernels adaLN: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} "
                         "must have the same layout")
    _affine("weight", weight, x)
    _affine("bias", bias, x)
    if norm not in NORMS:
        raise ValueError(f"archirf_kernels adaLN: unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    if norm == "rms" and bias is not None:
        raise ValueError("archirf_kernels adaLN: norm='rms' has no bias; pass bias=None")


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> None:
    _activation("x", x, x)
    _activation("y", y, x)
    _conditioning("gate", gate, x)


def gated_residual_ada_layer_norm(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                  weight: Tensor | None, bias: Tensor | None, norm: str) -> None:
    gated_residual(x, y, gate)
    ada_layer_norm(x, shift, scale, weight, bias, norm)


# ----------------------------------------------------------------------------------------------
# QK-norm attention: one stream or two (image, context), each packed (B, N, 3, H, D) or a (q, k, v) tuple.

def attention_streams(qkv, qkv_ctx) -> list:
    """[(q, k, v), (q, k, v) of the context or None], both streams given alike."""
    if qkv_ctx is not None and isinstance(qkv_ctx, Tensor) != isinstance(qkv, Tensor):
        raise ValueError("archirf_kernels attention: pass both streams packed (B, N, 3, H, D) or both as (q, k, v)")
    return [unpack_qkv(qkv), unpack_qkv(qkv_ctx, "qkv_ctx") if qkv_ctx is not None else None]


def _stream(name: str, q: Tensor, k: Tensor, v: Tensor, like: Tensor) -> None:
    for t, which in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"archirf_kernels attention: {name} {which} must be (B, N, H, D), got {tuple(t.shape)}")
        _dtype("attention", name, t)
        if t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"archirf_kernels attention: {name} {which} is {t.dtype} on {t.device}; every q, k, v "
                             f"must be {like.dtype} on {like.device}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"archirf_kernels attention: {name} q, k, v shapes differ: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = like.shape
    if (q.shape[0], q.shape[2], q.shape[3]) != (B, H, D):
        raise ValueError(f"archirf_kernels attention: {name} is (B, N, H, D) = {tuple(q.shape)}; the streams must "
                         f"share B, H, D = {B}, {H}, {D}")


def _norm_weight(name: str, w: Tensor | None, like: Tensor, qk_norm: bool) -> None:
    if w is None:
        return
    if not qk_norm:
        raise ValueError(f"archirf_kernels attention: {name} given with qk_norm=False; pass None")
    D = like.shape[-1]
    if tuple(w.shape) != (D,) or w.dtype not in DTYPES or w.device != like.device:
        raise ValueError(f"archirf_kernels attention: {name} must be a (D,) = ({D},) fp16/bf16/fp32 tensor on "
                         f"{like.device}, got {tuple(w.shape)} {w.dtype} on {w.device}")


def attention(streams, weights, qk_norm: bool) -> None:
    """streams as attention_streams returns them; weights (q_weight, k_weight, q_weight_ctx, k_weight_ctx)."""
    like = streams[0][0]
    for i, s in enumerate(streams):
        if s is not None:
            _stream(("qkv", "qkv_ctx")[i], *s, like)
    for name, w in zip(("q_weight", "k_weight", "q_weight_ctx", "k_weight_ctx"), weights):
        _norm_weight(name, w, like, qk_norm)


# ----------------------------------------------------------------------------------------------
# EDM2 magnitude-preserving ops: activations (B, C, H, W) or (M, C) rows, "channels" is dim 1.

def activation(op: str, t: Tensor, dims=(2, 4), name: str = "x") -> None:
    if t.dim() not in dims:
        want = " or ".join({2: "(M, C) rows", 4: "(B, C, H, W)"}.get(d, f"{d}-D") for d in dims)
        raise ValueError(f"archirf_kernels {op}: {name} must be {want}, got shape {tuple(t.shape)}")
    _dtype(op, name, t)


def mp_sum(a: Tensor, b: Tensor, clip: float | None) -> None:
    activation("mp_sum", a, range(0, 9), "a")
    _dtype("mp_sum", "b", b)
    if a.shape != b.shape:
        raise ValueError(f"archirf_kernels mp_sum: a {tuple(a.shape)} and b {tuple(b.shape)} differ in shape")
    _device("mp_sum", "b", b, "a", a)
    if clip is not None and not clip > 0:
        raise ValueError(f"archirf_kernels mp_sum: clip must be > 0 or None, got {clip}")


def modulated_silu(y: Tensor, c: Tensor) -> None:
    activation("modulated_silu", y, (4,), "y")
    if c.shape != (y.shape[0], y.shape[1]):
        raise ValueError(f"archirf_kernels modulated_silu: c must be (B, C) = {(y.shape[0], y.shape[1])}, "
                         f"got {tuple(c.shape)}")
    _dtype("modulated_silu", "c", c)
    _device("modulated_silu", "c", c, "y", y)


def mp_cat(op: str, a: Tensor, b: Tensor) -> None:
    activation(op, a, name="a")
    _dtype(op, "b", b)
    if a.dim() != b.dim() or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"archirf_kernels {op}: a {tuple(a.shape)} and b {tuple(b.shape)} must agree in "
                         "every dim but the channels (dim 1)")
    _device(op, "b", b, "a", a)


def mp_weight(op: str, w: Tensor, gain: Tensor | None) -> None:
    if w.dim() < 2:
        raise ValueError(f"archirf_kernels {op}: w must be (out, in, ...) with >= 2 dims, got {tuple(w.shape)}")
    _dtype(op, "w", w)
    if gain is not None:
        if gain.numel() != 1:
            raise ValueError(f"archirf_kernels {op}: gain must hold one number, got shape {tuple(gain.shape)}")
        _dtype(op, "gain", gain)
        _device(op, "gain", gain, "w", w)


# ----------------------------------------------------------------------------------------------
# The autoencoder's norms + SiLU: x (B, C, H, W) (channel RMSNorm: also (M, C) rows); per-channel
# weight and bias (C,); GroupNorm's residual shaped like x.

def _channel_vector(op: str, name: str, t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != (x.shape[1],):
        raise ValueError(f"archirf_kernels {op}: {name} must be (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    _dtype(op, name, t)
    _device(op, name, t, "x", x)


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                    residual: Tensor | None) -> None:
    op = "group_norm_silu"
    activation(op, x, (4,))
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1:
        raise ValueError(f"archirf_kernels {op}: groups must be a positive int, got {groups!r}")
    if x.shape[1] % groups:
        raise ValueError(f"archirf_kernels {op}: C={x.shape[1]} channels are not divisible by groups={groups}")
    _channel_vector(op, "weight", weight, x)
    _channel_vector(op, "bias", bias, x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"archirf_kernels {op}: residual has shape {tuple(residual.shape)}, x has "
                             f"{tuple(x.shape)}")
        _dtype(op, "residual", residual)
        _device(op, "residual", residual, "x", x)


def sample_size(op: str, x: Tensor) -> None:
    """The GroupNorm kernels index within a sample in int32: C x H x W < 2^31 elements."""
    per_sample = math.prod(x.shape[1:])
    if per_sample >= 2 ** 31:
        raise ValueError(f"archirf_kernels {op}: one sample holds {per_sample:,} elements (C x H x W), over the "
                         f"kernels' 2^31 limit; use impl='reference'")


def channel_rms_norm_silu(x: Tensor, weight: Tensor | None) -> None:
    activation("channel_rms_norm_silu", x)
    _channel_vector("channel_rms_norm_silu", "weight", weight, x)


def adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, emas, ema_rates, max_emas: int = 4, steps=None) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n) or any(len(e) != n for e in emas):
        raise ValueError("archirf_kernels.adamw_ema_step: params, grads, exp_avgs, exp_avg_sqs and every EMA list "
                         "must have one tensor per parameter")
    if len(emas) != len(ema_rates) or len(emas) > max_emas:
        raise ValueError(f"archirf_kernels.adamw_ema_step: {len(emas)} EMA lists and {len(ema_rates)} rates; one "
                         f"rate per EMA, at most {max_emas} EMAs")
    if steps is not None and (len(steps) != n or any(s.numel() != 1 or s.device != p.device
                                                     for s, p in zip(steps, params))):
        raise ValueError("archirf_kernels.adamw_ema_step: step must be one scalar tensor, or one per parameter, on "
                         "the parameters' device")
    for r in ema_rates:
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"archirf_kernels.adamw_ema_step: an EMA rate (1 - decay) must be in [0, 1], got {r}")
    for i, p in enumerate(params):
        group = [p, grads[i], exp_avgs[i], exp_avg_sqs[i], *(e[i] for e in emas)]
        for t in group:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != p.shape or t.device != p.device:
                raise ValueError(f"archirf_kernels.adamw_ema_step: tensor {i} ({tuple(p.shape)}): every tensor must be "
                                 f"a contiguous fp32 tensor shaped and placed like its parameter (got {t.dtype}, "
                                 f"{tuple(t.shape)}, {t.device}, contiguous={t.is_contiguous()})")


def qk_norm_rope(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor) -> None:
    op = "qk_norm_rope"
    if x.dim() != 4:
        raise ValueError(f"archirf_kernels {op}: x must be (B, S, H, D), got shape {tuple(x.shape)}")
    _dtype(op, "x", x)
    B, S, H, D = x.shape
    if D % 2:
        raise ValueError(f"archirf_kernels {op}: the head dim D={D} must be even (rotary pairs)")
    if weight is not None:
        if tuple(weight.shape) != (D,):
            raise ValueError(f"archirf_kernels {op}: weight must be (D,) = ({D},), got {tuple(weight.shape)}")
        _dtype(op, "weight", weight)
        _device(op, "weight", weight, "x", x)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (S, D):
            raise ValueError(f"archirf_kernels {op}: {name} must be (S, D) = ({S}, {D}), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"archirf_kernels {op}: {name} must be fp32, got {t.dtype}")
        _device(op, name, t, "x", x)
