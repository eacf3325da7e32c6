"""Fused EDM2 magnitude-preserving (MP) layers (Karras et al. 2024, config G), forward and backward.

    n           = x / (eps + rms_C(x))                         normalize (pixel norm, per row)
    n, s        = normalize(x), mp_silu(normalize(x))          normalize_silu     encoder block input
    y           = silu(x) / 0.596                              mp_silu
    out         = clip(lerp(a, b, t) / sqrt((1-t)^2 + t^2))    mp_sum (+ clip)    residual / attention merge
    out         = mp_silu(y * c[b, ch])                        modulated_silu     embedding modulation
    x, s        = mp_cat(a, b, t), mp_silu(mp_cat(a, b, t))    mp_cat(_silu)      decoder skip connection
    w'          = w / (eps + rms_row(w)) * gain / sqrt(fan_in) mp_weight          MPConv's weight
    w          <- w / (eps + rms_row(w))                       normalize_weight_  forced weight norm (in place)

reference.py is the spec of every op here. Activations are (B, C, H, W), dense in either memory format
(channels_last: each pixel's C channels contiguous; NCHW), or (M, C) rows (= channels_last with B = 1,
S = M). A row op's kernels see a tensor as (B, C, S = H * W) and walk it in tiles of BLOCK_S pixels x
all C channels (BLOCK_C = next_pow2(C)) of one sample, so the reduction over C (normalize) and the
per-(sample, channel) modulation need no second read; the offsets of both layouts are computed in the
kernel (CHANNELS_LAST), every tensor of one op in the same layout (inputs in another are converted).
Elementwise ops (mp_silu, mp_sum) run flat over the storage. All math in fp32, outputs in the first
input's dtype, gradients in their input's dtype. Per-(sample, channel) gradients (dc of
modulated_silu) and the scalar dgain are written as fp32 partial rows per program and summed by torch
(no atomics: the same bits every run).

The backward passes recompute what they need from the saved inputs (one read) instead of saving
statistics. Math of the normalisation's backward, per row of C elements, d = eps + r, r = rms(x),
n = x / d, g = dL/dn:

    dL/dx = (g - n * sum(g * n) * d / (C * r)) / d

Registered as torch.library custom ops (archirf_kernels::mp_*) with fake and autograd
implementations, so torch.compile(fullgraph=True) traces through a model that uses them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import checks
from .reference import MP_EPS, mp_cat_weights
from .registry import definer, ints, launch

Tensor = torch.Tensor

MAX_BLOCK_C = 16384          # one row of channels in registers
TILE_ELEMENTS = 4096         # pixels x channels per program of a row op
FLAT_BLOCK = 2048            # elements per program of an elementwise op
WEIGHT_BLOCK = 2048          # fan-in chunk of the weight kernels (rows are looped over)


# ----------------------------------------------------------------------------------------------
# Kernels.

# The kernels divide by 0.596 = reference.MP_SILU_SCALE (mp_silu, EDM2 Eq. 81).
@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def _dsilu(z):
    # d/dz z sigmoid(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def _tile(pid, C, S, num_s_blocks, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's tile: BLOCK_S pixels x BLOCK_C channels of one sample -> (offsets, mask, sample)."""
    b = (pid // num_s_blocks).to(tl.int64)
    s = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)                      # (BS,)
    c = tl.arange(0, BLOCK_C)                                                       # (BC,)
    mask = (s < S)[:, None] & (c < C)[None, :]                                      # (BS, BC)
    if CHANNELS_LAST:
        offs = b * C * S + s[:, None].to(tl.int64) * C + c[None, :]
    else:
        offs = b * C * S + c[None, :].to(tl.int64) * S + s[:, None]
    return offs, mask, b


@triton.jit
def _load_normalized(X_ptr, offs, mask, C, eps):
    """A tile's rows normalised: (n = x / d, rms, d = eps + rms) in fp32."""
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)                  # (BS, BC)
    rms = tl.sqrt(tl.sum(x * x, axis=1) / C)                                        # (BS,)
    d = eps + rms
    return x / d[:, None], rms, d


@triton.jit
def _cat_offsets(b, pix, c, CA, CB, S, CHANNELS_LAST: tl.constexpr):
    """Offsets into a (channels [0, CA) of the concatenation) and b (channels [CA, CA + CB))."""
    if CHANNELS_LAST:
        offs_a = b * CA * S + pix[:, None].to(tl.int64) * CA + c[None, :]
        offs_b = b * CB * S + pix[:, None].to(tl.int64) * CB + (c[None, :] - CA)
    else:
        offs_a = b * CA * S + c[None, :].to(tl.int64) * S + pix[:, None]
        offs_b = b * CB * S + (c[None, :] - CA).to(tl.int64) * S + pix[:, None]
    return offs_a, offs_b


@triton.jit
def _normalize_fwd_kernel(
    X_ptr, N_ptr, S_ptr,                # x; outputs n and (WITH_SILU) mp_silu(n), all in x's layout
    C, S, num_s_blocks, eps,
    WITH_SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, _ = _tile(tl.program_id(0), C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    n, _, _ = _load_normalized(X_ptr, offs, mask, C, eps)                          # (BS, BC)
    tl.store(N_ptr + offs, n.to(N_ptr.dtype.element_ty), mask=mask)
    if WITH_SILU:
        tl.store(S_ptr + offs, (_silu(n) / 0.596).to(S_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_bwd_kernel(
    X_ptr, DN_ptr, DS_ptr, DX_ptr,      # x (saved input), grads of n and of mp_silu(n) (either absent)
    C, S, num_s_blocks, eps,
    HAS_DN: tl.constexpr,
    HAS_DS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, _ = _tile(tl.program_id(0), C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    n, rms, d = _load_normalized(X_ptr, offs, mask, C, eps)                        # (BS, BC), (BS,), (BS,)
    # -- g = dL/dn: the direct gradient plus the one through mp_silu
    g = tl.zeros_like(n)
    if HAS_DN:
        g += tl.load(DN_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DS:
        g += tl.load(DS_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _dsilu(n) / 0.596
    # -- dL/dx = (g - n * sum(g n) * d / (C r)) / d; an all-zero row has n = 0 (and gets g / eps)
    coef = tl.sum(g * n, axis=1) * d / (C * tl.maximum(rms, 1e-30))                 # (BS,)
    dx = (g - n * coef[:, None]) / d[:, None]
    tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_silu_fwd_kernel(
    Y_ptr, Cond_ptr, Out_ptr,           # y (B, C, S); c (B, C) contiguous
    C, S, num_s_blocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, b = _tile(tl.program_id(0), C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    c = tl.load(Cond_ptr + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)   # (BC,)
    y = tl.load(Y_ptr + offs, mask=mask, other=0.0).to(tl.float32)                  # (BS, BC)
    out = _silu(y * c[None, :]) / 0.596
    tl.store(Out_ptr + offs, out.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_silu_bwd_kernel(
    DOut_ptr, Y_ptr, Cond_ptr, DY_ptr, Part_ptr,   # Part: (programs, C) fp32 partial sums of dc
    C, S, num_s_blocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, mask, b = _tile(pid, C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    c = tl.load(Cond_ptr + b * C + cols, mask=cols < C, other=0.0).to(tl.float32)   # (BC,)
    y = tl.load(Y_ptr + offs, mask=mask, other=0.0).to(tl.float32)                  # (BS, BC)
    dout = tl.load(DOut_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = dout * _dsilu(y * c[None, :]) / 0.596                                       # dL/d(y c)
    tl.store(DY_ptr + offs, (g * c[None, :]).to(DY_ptr.dtype.element_ty), mask=mask)
    tl.store(Part_ptr + pid.to(tl.int64) * C + cols, tl.sum(g * y, axis=0), mask=cols < C)


@triton.jit
def _mp_cat_fwd_kernel(
    A_ptr, B_ptr, X_ptr, S_ptr,         # a (B, CA, S), b (B, CB, S) -> x = mp_cat (B, CA + CB, S), mp_silu(x)
    CA, CB, S, num_s_blocks, wa, wb,
    WITH_SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    C = CA + CB
    offs, mask, b = _tile(tl.program_id(0), C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    pid = tl.program_id(0)
    pix = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    in_a = (c < CA)[None, :]
    offs_a, offs_b = _cat_offsets(b, pix, c, CA, CB, S, CHANNELS_LAST)
    xa = tl.load(A_ptr + offs_a, mask=mask & in_a, other=0.0).to(tl.float32)
    xb = tl.load(B_ptr + offs_b, mask=mask & (c >= CA)[None, :], other=0.0).to(tl.float32)
    x = tl.where(in_a, xa * wa, xb * wb)                                            # (BS, BC)
    tl.store(X_ptr + offs, x.to(X_ptr.dtype.element_ty), mask=mask)
    if WITH_SILU:
        tl.store(S_ptr + offs, (_silu(x) / 0.596).to(S_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_cat_bwd_kernel(
    DX_ptr, DS_ptr, X_ptr, DA_ptr, DB_ptr,   # grads of x and of mp_silu(x) (either absent), x (saved)
    CA, CB, S, num_s_blocks, wa, wb,
    HAS_DX: tl.constexpr,
    HAS_DS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    C = CA + CB
    pid = tl.program_id(0)
    offs, mask, b = _tile(pid, C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    pix = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    g = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    if HAS_DX:
        g += tl.load(DX_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DS:
        x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(DS_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _dsilu(x) / 0.596
    offs_a, offs_b = _cat_offsets(b, pix, c, CA, CB, S, CHANNELS_LAST)
    tl.store(DA_ptr + offs_a, (g * wa).to(DA_ptr.dtype.element_ty), mask=mask & (c < CA)[None, :])
    tl.store(DB_ptr + offs_b, (g * wb).to(DB_ptr.dtype.element_ty), mask=mask & (c >= CA)[None, :])


@triton.jit
def _mp_silu_fwd_kernel(X_ptr, Out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out_ptr + offs, (_silu(x) / 0.596).to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_silu_bwd_kernel(DOut_ptr, X_ptr, DX_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOut_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX_ptr + offs, (dout * _dsilu(x) / 0.596).to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_sum_fwd_kernel(A_ptr, B_ptr, Out_ptr, numel, wa, wb, clip, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = a * wa + b * wb
    if HAS_CLIP:
        out = tl.minimum(tl.maximum(out, -clip), clip)
    tl.store(Out_ptr + offs, out.to(Out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_sum_bwd_kernel(DOut_ptr, Out_ptr, DA_ptr, DB_ptr, numel, wa, wb, clip,
                       HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dout = tl.load(DOut_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLIP:
        # the clip passes the gradient where the output is strictly inside (-clip, clip)
        out = tl.load(Out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.where(tl.abs(out) < clip, dout, 0.0)
    tl.store(DA_ptr + offs, (dout * wa).to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DB_ptr + offs, (dout * wb).to(DB_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mp_weight_fwd_kernel(
    W_ptr, Gain_ptr, Out_ptr,           # rows of F; Out may be W (in place: the forced normalisation)
    F, scale, eps,
    HAS_GAIN: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * F
    cols = tl.arange(0, BLOCK_F)
    # -- pass 1: the row's sum of squares
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        w = tl.load(W_ptr + row + f0 + cols, mask=f0 + cols < F, other=0.0).to(tl.float32)
        acc += w * w
    k = scale / (eps + tl.sqrt(tl.sum(acc, axis=0) / F))
    if HAS_GAIN:
        k = k * tl.load(Gain_ptr).to(tl.float32)
    # -- pass 2: scale and store (every load of a chunk precedes its store: in place is safe)
    for f0 in range(0, F, BLOCK_F):
        m = f0 + cols < F
        w = tl.load(W_ptr + row + f0 + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Out_ptr + row + f0 + cols, (w * k).to(Out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mp_weight_bwd_kernel(
    DOut_ptr, W_ptr, Gain_ptr, DW_ptr, DGainPart_ptr,   # DGainPart: (rows,) fp32
    F, scale, eps,
    HAS_GAIN: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * F
    cols = tl.arange(0, BLOCK_F)
    gain = 1.0
    if HAS_GAIN:
        gain = tl.load(Gain_ptr).to(tl.float32)
    # -- pass 1: sum w^2 and sum dout * w
    acc_ww = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_gw = tl.zeros([BLOCK_F], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        m = f0 + cols < F
        w = tl.load(W_ptr + row + f0 + cols, mask=m, other=0.0).to(tl.float32)
        dout = tl.load(DOut_ptr + row + f0 + cols, mask=m, other=0.0).to(tl.float32)
        acc_ww += w * w
        acc_gw += dout * w
    rms = tl.sqrt(tl.sum(acc_ww, axis=0) / F)
    d = eps + rms
    sum_gn = tl.sum(acc_gw, axis=0) / d                          # sum(dout * n), n = w / d
    if HAS_GAIN:
        tl.store(DGainPart_ptr + pid, scale * sum_gn)
    # -- pass 2: dw = scale gain (dout - n sum(dout n) d / (F r)) / d
    coef = sum_gn * d / (F * tl.maximum(rms, 1e-30))
    k = scale * gain / d
    for f0 in range(0, F, BLOCK_F):
        m = f0 + cols < F
        w = tl.load(W_ptr + row + f0 + cols, mask=m, other=0.0).to(tl.float32)
        dout = tl.load(DOut_ptr + row + f0 + cols, mask=m, other=0.0).to(tl.float32)
        dw = k * (dout - (w / d) * coef)
        tl.store(DW_ptr + row + f0 + cols, dw.to(DW_ptr.dtype.element_ty), mask=m)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated
# them): then they run on CPU tensors; otherwise they need CUDA tensors.
INTERPRETED = type(_normalize_fwd_kernel).__name__ == "InterpretedFunction"
# Triton's interpreter: small tiles and weight blocks, so that the kernels' tests cover several tiles and tails
# (a model's tests may raise them: the interpreter's cost is per program and per loop step)
INTERPRETER_TILE = 256
INTERPRETER_WEIGHT_BLOCK = 64


# ----------------------------------------------------------------------------------------------
# Layouts, checks, launch shapes.

def _alloc_like(t: Tensor, shape=None, dtype: torch.dtype | None = None) -> Tensor:
    """Every activation-shaped buffer the launchers hand to a kernel: t's layout (tests patch this)."""
    shape = t.shape if shape is None else shape
    fmt = torch.channels_last if len(shape) == 4 and _channels_last(t) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def _channels_last(t: Tensor) -> bool:
    """Rows (M, C) and channels_last (B, C, H, W) tensors: each pixel's channels contiguous."""
    if t.dim() == 2:
        return True
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense(t: Tensor, channels_last: bool | None = None) -> Tensor:
    """t dense in the given layout (default: its own if dense, else NCHW); a no-op when it already is."""
    if channels_last is None:
        channels_last = _channels_last(t)
    if t.dim() == 4 and channels_last:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _check(op: str, t: Tensor, dims=(2, 4)) -> None:
    checks.activation(op, t, dims)
    _check_device(op, t)


def _check_device(op: str, t: Tensor) -> None:
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(f"archirf_kernels {op}: the Triton kernels need CUDA tensors, got {t.device}; "
                         "use impl='auto' or 'reference'")


def _bcs(t: Tensor) -> tuple[int, int, int]:
    """(B, C, S) of the kernels' view: (B, C, H*W), or (1, C, M) for (M, C) rows."""
    if t.dim() == 2:
        return ints(1, t.shape[1], t.shape[0])
    return ints(t.shape[0], t.shape[1], t.shape[2] * t.shape[3])


def _row_grid(op: str, B: int, C: int, S: int, device: torch.device) -> tuple[int, int, int, int]:
    """-> (BLOCK_S, BLOCK_C, programs, num_warps) for a row op over (B, C, S)."""
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"archirf_kernels.{op}: C={C} channels exceed the fused row limit {MAX_BLOCK_C}; "
                         "use impl='reference'")
    tile = TILE_ELEMENTS if device.type == "cuda" else INTERPRETER_TILE
    block_s = max(1, min(tile // block_c, triton.next_power_of_2(max(S, 1))))
    num_s_blocks = triton.cdiv(S, block_s)
    num_warps = min(max(block_s * block_c // 512, 1), 8)
    return block_s, block_c, num_s_blocks, num_warps


def _flat_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, FLAT_BLOCK),)


# ----------------------------------------------------------------------------------------------
# Launchers (real tensors) and their shape functions (shared with the fake implementations, so that
# compiled graphs see exactly the strides the kernels produce).

def _normalize_fwd(x: Tensor, eps: float, with_silu: bool) -> tuple[Tensor, Tensor]:
    x = _dense(x)
    n = _alloc_like(x)
    s = _alloc_like(x) if with_silu else n
    B, C, S = _bcs(x)
    block_s, block_c, nsb, warps = _row_grid("normalize", B, C, S, x.device)
    if x.numel():
        launch(_normalize_fwd_kernel, INTERPRETED)[(B * nsb,)](
            x, n, s, C, S, nsb, eps, WITH_SILU=with_silu, CHANNELS_LAST=_channels_last(x), BLOCK_S=block_s,
            BLOCK_C=block_c, num_warps=warps)
    return n, s


def _normalize_bwd(dn: Tensor | None, ds: Tensor | None, x: Tensor, eps: float) -> Tensor:
    cl = _channels_last(x)
    dn = _dense(dn, cl) if dn is not None else None
    ds = _dense(ds, cl) if ds is not None else None
    dx = _alloc_like(x)
    B, C, S = _bcs(x)
    block_s, block_c, nsb, warps = _row_grid("normalize", B, C, S, x.device)
    if x.numel():
        launch(_normalize_bwd_kernel, INTERPRETED)[(B * nsb,)](
            x, dn if dn is not None else x, ds if ds is not None else x, dx, C, S, nsb, eps, HAS_DN=dn is not None,
            HAS_DS=ds is not None, CHANNELS_LAST=cl, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return dx


def _modulated_silu_fwd(y: Tensor, c: Tensor) -> Tensor:
    y, c = _dense(y), c.contiguous()
    out = _alloc_like(y)
    B, C, S = _bcs(y)
    block_s, block_c, nsb, warps = _row_grid("modulated_silu", B, C, S, y.device)
    if y.numel():
        launch(_modulated_silu_fwd_kernel, INTERPRETED)[(B * nsb,)](
            y, c, out, C, S, nsb, CHANNELS_LAST=_channels_last(y), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return out


def _modulated_silu_bwd(dout: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    cl = _channels_last(y)
    dout = _dense(dout, cl)
    B, C, S = _bcs(y)
    block_s, block_c, nsb, warps = _row_grid("modulated_silu", B, C, S, y.device)
    dy = _alloc_like(y)
    part = torch.zeros((B, nsb, C), dtype=torch.float32, device=y.device)
    if y.numel():
        launch(_modulated_silu_bwd_kernel, INTERPRETED)[(B * nsb,)](
            dout, y, c, dy, part, C, S, nsb, CHANNELS_LAST=cl, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return dy, part.sum(1).to(c.dtype)


def _cat_shape(a: Tensor, b: Tensor) -> tuple[int, ...]:
    return (a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])


def _mp_cat_fwd(a: Tensor, b: Tensor, t: float, with_silu: bool) -> tuple[Tensor, Tensor]:
    a = _dense(a)
    cl = _channels_last(a)
    b = _dense(b, cl)
    x = _alloc_like(a, _cat_shape(a, b))
    s = _alloc_like(a, _cat_shape(a, b)) if with_silu else x
    B, CA, S = _bcs(a)
    CB = int(b.shape[1])
    wa, wb = mp_cat_weights(CA, CB, t)
    block_s, block_c, nsb, warps = _row_grid("mp_cat", B, CA + CB, S, a.device)
    if x.numel():
        launch(_mp_cat_fwd_kernel, INTERPRETED)[(B * nsb,)](
            a, b, x, s, CA, CB, S, nsb, wa, wb, WITH_SILU=with_silu, CHANNELS_LAST=cl, BLOCK_S=block_s, BLOCK_C=block_c,
            num_warps=warps)
    return x, s


def _mp_cat_bwd(dx: Tensor | None, ds: Tensor | None, x: Tensor, ca: int, t: float,
                a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    cl = _channels_last(x)
    dx = _dense(dx, cl) if dx is not None else None
    ds = _dense(ds, cl) if ds is not None else None
    B, C, S = _bcs(x)
    ca = int(ca)
    cb = C - ca
    da = _alloc_like(x, (x.shape[0], ca, *x.shape[2:]), a_dtype)
    db = _alloc_like(x, (x.shape[0], cb, *x.shape[2:]), b_dtype)
    wa, wb = mp_cat_weights(ca, cb, t)
    block_s, block_c, nsb, warps = _row_grid("mp_cat", B, C, S, x.device)
    if x.numel():
        launch(_mp_cat_bwd_kernel, INTERPRETED)[(B * nsb,)](
            dx if dx is not None else x, ds if ds is not None else x, x, da, db, ca, cb, S, nsb, wa, wb, HAS_DX=dx is
            not None, HAS_DS=ds is not None, CHANNELS_LAST=cl, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return da, db


def _mp_silu_fwd(x: Tensor) -> Tensor:
    x = _dense(x)
    out = _alloc_like(x)
    if x.numel():
        launch(_mp_silu_fwd_kernel, INTERPRETED)[_flat_grid(int(x.numel()))](x, out, int(x.numel()), BLOCK=FLAT_BLOCK)
    return out


def _mp_silu_bwd(dout: Tensor, x: Tensor) -> Tensor:
    dout = _dense(dout, _channels_last(x))
    dx = _alloc_like(x)
    if x.numel():
        launch(_mp_silu_bwd_kernel, INTERPRETED)[_flat_grid(int(x.numel()))](
            dout, x, dx, int(x.numel()), BLOCK=FLAT_BLOCK)
    return dx


def _sum_weights(t: float) -> tuple[float, float]:
    norm = ((1 - t) ** 2 + t ** 2) ** 0.5
    return (1 - t) / norm, t / norm


def _mp_sum_fwd(a: Tensor, b: Tensor, t: float, clip: float | None) -> Tensor:
    a = _dense(a)
    b = _dense(b, _channels_last(a))
    out = _alloc_like(a)
    wa, wb = _sum_weights(t)
    if a.numel():
        launch(_mp_sum_fwd_kernel, INTERPRETED)[_flat_grid(int(a.numel()))](
            a, b, out, int(a.numel()), wa, wb, clip or 0.0, HAS_CLIP=clip is not None, BLOCK=FLAT_BLOCK)
    return out


def _mp_sum_bwd(dout: Tensor, out: Tensor, t: float, clip: float | None, b_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    dout = _dense(dout, _channels_last(out))
    da, db = _alloc_like(out), _alloc_like(out, dtype=b_dtype)
    wa, wb = _sum_weights(t)
    if out.numel():
        launch(_mp_sum_bwd_kernel, INTERPRETED)[_flat_grid(int(out.numel()))](
            dout, out, da, db, int(out.numel()), wa, wb, clip or 0.0, HAS_CLIP=clip is not None, BLOCK=FLAT_BLOCK)
    return da, db


def _weight_block(fan_in: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(fan_in), WEIGHT_BLOCK if device.type == "cuda" else INTERPRETER_WEIGHT_BLOCK)


def _mp_weight_fwd(w: Tensor, gain: Tensor | None, eps: float, scale: float, out: Tensor | None = None) -> Tensor:
    w = w.contiguous()
    out = torch.empty_like(w) if out is None else out
    fan_in = int(math.prod(w.shape[1:]))    # (not w[0]: an FSDP2 shard may hold no rows)
    if w.numel():
        launch(_mp_weight_fwd_kernel, INTERPRETED)[(int(w.shape[0]),)](
            w, gain if gain is not None else w, out, fan_in, scale, eps, HAS_GAIN=gain is not None,
            BLOCK_F=_weight_block(fan_in, w.device), num_warps=4)
    return out


def _mp_weight_bwd(dout: Tensor, w: Tensor, gain: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None]:
    dout, w = dout.contiguous(), w.contiguous()
    fan_in = int(math.prod(w.shape[1:]))    # (not w[0]: an FSDP2 shard may hold no rows)
    dw = torch.empty_like(w)
    part = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    if w.numel():
        launch(_mp_weight_bwd_kernel, INTERPRETED)[(int(w.shape[0]),)](
            dout, w, gain if gain is not None else w, dw, part, fan_in, fan_in ** -0.5, eps, HAS_GAIN=gain is not None,
            BLOCK_F=_weight_block(fan_in, w.device), num_warps=4)
    dgain = part.sum().reshape(gain.shape).to(gain.dtype) if gain is not None else None
    return dw, dgain


# ----------------------------------------------------------------------------------------------
# Custom ops. Forward and backward of each op are opaque to torch.compile, which sees their fake
# implementations (the same shape functions as the launchers); autograd connects them. Absent
# gradients come back from the backward ops as empty tensors (custom ops return no None).

_EMPTY = (0,)


def _fake_like(t: Tensor, shape=None, dtype=None) -> Tensor:
    return _alloc_like(_dense(t), shape, dtype)


# -- normalize / normalize_silu

_define = definer(INTERPRETED, globals())      # registry.define with this module's flag and kernels


def _mp_normalize_fake(x, eps):
    _check("normalize", x)
    return _fake_like(x)


@_define("mp_normalize", fake=_mp_normalize_fake)
def _normalize_op(x: Tensor, eps: float) -> Tensor:
    _check("normalize", x)
    return _normalize_fwd(x, eps, with_silu=False)[0]


def _mp_normalize_silu_fake(x, eps):
    _check("normalize_silu", x)
    return _fake_like(x), _fake_like(x)


@_define("mp_normalize_silu", fake=_mp_normalize_silu_fake)
def _normalize_silu_op(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check("normalize_silu", x)
    return _normalize_fwd(x, eps, with_silu=True)


def _mp_normalize_backward_fake(dn, ds, x, eps):
    return _fake_like(x)


@_define("mp_normalize_backward", fake=_mp_normalize_backward_fake)
def _normalize_backward_op(dn: Tensor | None, ds: Tensor | None, x: Tensor, eps: float) -> Tensor:
    return _normalize_bwd(dn, ds, _dense(x), eps)


def _normalize_setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _normalize_backward(ctx, dn):
    (x,) = ctx.saved_tensors
    return torch.ops.archirf_kernels.mp_normalize_backward(dn, None, x, ctx.eps), None


def _normalize_silu_backward(ctx, dn, ds):
    (x,) = ctx.saved_tensors
    return torch.ops.archirf_kernels.mp_normalize_backward(dn, ds, x, ctx.eps), None


_normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)
_normalize_silu_op.register_autograd(_normalize_silu_backward, setup_context=_normalize_setup_context)


# -- mp_silu

def _mp_silu_fake(x):
    return _fake_like(x)


@_define("mp_silu", fake=_mp_silu_fake)
def _mp_silu_op(x: Tensor) -> Tensor:
    _check("mp_silu", x, dims=range(0, 9))
    return _mp_silu_fwd(x)


def _mp_silu_backward_fake(dout, x):
    return _fake_like(x)


@_define("mp_silu_backward", fake=_mp_silu_backward_fake)
def _mp_silu_backward_op(dout: Tensor, x: Tensor) -> Tensor:
    return _mp_silu_bwd(dout, _dense(x))


def _mp_silu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _mp_silu_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return torch.ops.archirf_kernels.mp_silu_backward(dout, x)


_mp_silu_op.register_autograd(_mp_silu_backward, setup_context=_mp_silu_setup_context)


# -- mp_sum (+ clip)

def _mp_sum_fake(a, b, t, clip):
    checks.mp_sum(a, b, clip)
    return _fake_like(a)


@_define("mp_sum", fake=_mp_sum_fake)
def _mp_sum_op(a: Tensor, b: Tensor, t: float, clip: float | None) -> Tensor:
    _check_device("mp_sum", a)
    checks.mp_sum(a, b, clip)
    return _mp_sum_fwd(a, b, t, clip)


def _mp_sum_backward_fake(dout, out, t, clip, b_dtype):
    return _fake_like(out), _fake_like(out, dtype=b_dtype)


@_define("mp_sum_backward", fake=_mp_sum_backward_fake)
def _mp_sum_backward_op(dout: Tensor, out: Tensor, t: float, clip: float | None,
                        b_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _mp_sum_bwd(dout, out, t, clip, b_dtype)


def _mp_sum_setup_context(ctx, inputs, output):
    _, b, t, clip = inputs
    # only the clip's mask needs a tensor: the output (the next layer keeps it anyway)
    ctx.save_for_backward(output if clip is not None else None)
    ctx.t, ctx.clip, ctx.b_dtype = t, clip, b.dtype


def _mp_sum_backward(ctx, dout):
    (out,) = ctx.saved_tensors
    if out is None:     # no clip: the gradient is linear in dout alone
        out = dout
    da, db = torch.ops.archirf_kernels.mp_sum_backward(dout, out, ctx.t, ctx.clip, ctx.b_dtype)
    return da, db, None, None


_mp_sum_op.register_autograd(_mp_sum_backward, setup_context=_mp_sum_setup_context)


# -- modulated_silu

def _mp_modulated_silu_fake(y, c):
    checks.modulated_silu(y, c)
    return _fake_like(y)


@_define("mp_modulated_silu", fake=_mp_modulated_silu_fake)
def _modulated_silu_op(y: Tensor, c: Tensor) -> Tensor:
    checks.modulated_silu(y, c)
    _check_device("modulated_silu", y)
    return _modulated_silu_fwd(y, c)


def _mp_modulated_silu_backward_fake(dout, y, c):
    return _fake_like(y), c.new_empty(c.shape)


@_define("mp_modulated_silu_backward", fake=_mp_modulated_silu_backward_fake)
def _modulated_silu_backward_op(dout: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    return _modulated_silu_bwd(dout, _dense(y), c.contiguous())


def _modulated_silu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _modulated_silu_backward(ctx, dout):
    y, c = ctx.saved_tensors
    return torch.ops.archirf_kernels.mp_modulated_silu_backward(dout, y, c)


_modulated_silu_op.register_autograd(_modulated_silu_backward, setup_context=_modulated_silu_setup_context)


# -- mp_cat / mp_cat_silu

def _mp_cat_fake(a, b, t):
    checks.mp_cat("mp_cat", a, b)
    return _fake_like(a, _cat_shape(a, b))


@_define("mp_cat", fake=_mp_cat_fake)
def _mp_cat_op(a: Tensor, b: Tensor, t: float) -> Tensor:
    checks.mp_cat("mp_cat", a, b)
    _check_device("mp_cat", a)
    return _mp_cat_fwd(a, b, t, with_silu=False)[0]


def _mp_cat_silu_fake(a, b, t):
    checks.mp_cat("mp_cat_silu", a, b)
    return _fake_like(a, _cat_shape(a, b)), _fake_like(a, _cat_shape(a, b))


@_define("mp_cat_silu", fake=_mp_cat_silu_fake)
def _mp_cat_silu_op(a: Tensor, b: Tensor, t: float) -> tuple[Tensor, Tensor]:
    checks.mp_cat("mp_cat_silu", a, b)
    _check_device("mp_cat_silu", a)
    return _mp_cat_fwd(a, b, t, with_silu=True)


def _mp_cat_backward_fake(dx, ds, x, ca, t, a_dtype, b_dtype):
    return (_fake_like(x, (x.shape[0], ca, *x.shape[2:]), a_dtype),
            _fake_like(x, (x.shape[0], x.shape[1] - ca, *x.shape[2:]), b_dtype))


@_define("mp_cat_backward", fake=_mp_cat_backward_fake)
def _mp_cat_backward_op(dx: Tensor | None, ds: Tensor | None, x: Tensor, ca: int, t: float,
                        a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _mp_cat_bwd(dx, ds, x, ca, t, a_dtype, b_dtype)


def _mp_cat_setup_context(ctx, inputs, output):
    a, b, t = inputs
    x = output[0] if isinstance(output, tuple) else output
    ctx.save_for_backward(x)      # the concatenation: mp_silu's gradient needs it (the next conv keeps it)
    ctx.ca, ctx.t, ctx.a_dtype, ctx.b_dtype = a.shape[1], t, a.dtype, b.dtype


def _mp_cat_backward(ctx, dx):
    (x,) = ctx.saved_tensors
    da, db = torch.ops.archirf_kernels.mp_cat_backward(dx, None, x, ctx.ca, ctx.t, ctx.a_dtype, ctx.b_dtype)
    return da, db, None


def _mp_cat_silu_backward(ctx, dx, ds):
    (x,) = ctx.saved_tensors
    da, db = torch.ops.archirf_kernels.mp_cat_backward(dx, ds, x, ctx.ca, ctx.t, ctx.a_dtype, ctx.b_dtype)
    return da, db, None


_mp_cat_op.register_autograd(_mp_cat_backward, setup_context=_mp_cat_setup_context)
_mp_cat_silu_op.register_autograd(_mp_cat_silu_backward, setup_context=_mp_cat_setup_context)


# -- mp_weight

def _mp_weight_fake(w, gain, eps):
    checks.mp_weight("mp_weight", w, gain)
    return torch.empty_like(w.contiguous())


@_define("mp_weight", fake=_mp_weight_fake)
def _mp_weight_op(w: Tensor, gain: Tensor | None, eps: float) -> Tensor:
    checks.mp_weight("mp_weight", w, gain)
    _check_device("mp_weight", w)
    return _mp_weight_fwd(w, gain, eps, w[0].numel() ** -0.5)


def _mp_weight_backward_fake(dout, w, gain, eps):
    return torch.empty_like(w.contiguous()), gain.new_empty(gain.shape) if gain is not None else w.new_empty(_EMPTY)


@_define("mp_weight_backward", fake=_mp_weight_backward_fake)
def _mp_weight_backward_op(dout: Tensor, w: Tensor, gain: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    dw, dgain = _mp_weight_bwd(dout, w, gain, eps)
    return dw, dgain if dgain is not None else w.new_empty(_EMPTY)


def _mp_weight_setup_context(ctx, inputs, output):
    w, gain, eps = inputs
    ctx.save_for_backward(w, gain)
    ctx.eps = eps


def _mp_weight_backward(ctx, dout):
    w, gain = ctx.saved_tensors
    dw, dgain = torch.ops.archirf_kernels.mp_weight_backward(dout, w, gain, ctx.eps)
    return dw, dgain if gain is not None else None, None


_mp_weight_op.register_autograd(_mp_weight_backward, setup_context=_mp_weight_setup_context)


# ----------------------------------------------------------------------------------------------
# Differentiable entry points (archirf_kernels.* dispatches here for impl="triton").

def normalize(x: Tensor, eps: float = MP_EPS) -> Tensor:
    return torch.ops.archirf_kernels.mp_normalize(x, eps)


def normalize_silu(x: Tensor, eps: float = MP_EPS) -> tuple[Tensor, Tensor]:
    return torch.ops.archirf_kernels.mp_normalize_silu(x, eps)


def mp_silu(x: Tensor) -> Tensor:
    return torch.ops.archirf_kernels.mp_silu(x)


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5, clip: float | None = None) -> Tensor:
    return torch.ops.archirf_kernels.mp_sum(a, b, t, clip)


def modulated_silu(y: Tensor, c: Tensor) -> Tensor:
    return torch.ops.archirf_kernels.mp_modulated_silu(y, c)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    return torch.ops.archirf_kernels.mp_cat(a, b, t)


def mp_cat_silu(a: Tensor, b: Tensor, t: float = 0.5) -> tuple[Tensor, Tensor]:
    return torch.ops.archirf_kernels.mp_cat_silu(a, b, t)


def mp_weight(w: Tensor, gain: Tensor | None = None, eps: float = MP_EPS) -> Tensor:
    return torch.ops.archirf_kernels.mp_weight(w, gain, eps)


@torch.no_grad()
def normalize_weight_(w: Tensor, eps: float = MP_EPS) -> Tensor:
    """Forced weight normalisation in place (rows over their fan-in to unit RMS); w must be contiguous."""
    checks.mp_weight("normalize_weight_", w, None)
    _check_device("normalize_weight_", w)
    if not w.is_contiguous():
        raise ValueError("archirf_kernels.normalize_weight_: w must be contiguous (it is written in place)")
    return _mp_weight_fwd(w, None, eps, 1.0, out=w)
