"""Fused norm + SiLU of the autoencoder's ResnetBlock (conv(silu(norm(x))), LDM), forward and backward.

    y           = silu(GN(x) * w + b)                          group_norm_silu
    s, y        = x + residual, silu(GN(s) * w + b)            group_norm_silu(..., residual=)
    y           = silu(x / max(|x|_C, eps) * sqrt(C) * w)      channel_rms_norm_silu

reference.py is the spec. x is (B, C, H, W), dense NCHW or channels_last (the channel RMSNorm also takes
(M, C) rows); the kernels see (B, C, S = H * W) and compute both layouts' offsets (CHANNELS_LAST), every
tensor of a call in x's layout. Math in fp32, outputs in x's dtype, gradients in their input's dtype.

GroupNorm reduces over (C / groups) x S elements per (sample, group): 16k at 64 x 64 with 4 channels
a group, 262k at 256 x 256. A launch plan (_group_plan) picks one of three shapes:
- fused: a program holds whole groups in registers (all their pixels; in channels_last several adjacent
  groups, so that each pixel's run of channels is long enough to load in full sectors), computes the
  statistics exactly in two passes over its registers (mean, then the centred sum of squares), and
  writes y: x is read once. Chosen when the groups fit (FUSED_*_ELEMENTS) and B x groups programs fill
  the GPU.
- split: a reduction pass over tiles of BLOCK_S pixels x BLOCK_C channels, each program looping over a
  chunk of its sample's pixels and accumulating, elementwise in registers, the shifted sums of
  d = x - k and d^2 per channel, with k the chunk's first tile's own per-channel mean (the shifted-data
  algorithm: no E[x^2] - E[x]^2 cancellation, one cross-thread reduction per chunk); the chunk's
  (mean, M2) follow, and a combine kernel merges the chunks' and channels' partials of each group with
  Chan et al.'s pairwise formula. Then an elementwise pass reads x again. It walks the tiles in reverse
  order, so that it starts on what the reduction pass read last, still in L2. About SPLIT_WAVES x SMs
  programs whatever B is (B = 1 still fills the GPU).
- looped (off by default: LOOPED_CHANNELS): whole groups of one sample per program, looping over its
  pixels: the shifted sums, then the output pass in reverse order, in one launch.
The forward saves mean and rstd per (sample, group), fp32.

Backward, per (b, g) with N = (C / groups) S elements, xhat = (s - mean) rstd, z = xhat w + b,
dz = dy silu'(z), and ds the gradient of the s output (residual form; else 0):

    dw_c = sum_{b, pixels} dz xhat        db_c = sum_{b, pixels} dz
    A    = sum_{c in g} w_c sum_pixels dz          Bs = sum_{c in g} w_c sum_pixels dz xhat
    dx   = rstd (dz w - (A + xhat Bs) / N) + ds    (= dresidual)

The per-(sample, channel) sums come from the same fused, looped or split shapes (split: a partials
pass, a combine kernel, then the dx pass). The channel RMSNorm is a row op over C, like mp.normalize: with
d = max(|x|, eps), u = x / d, k = sqrt(C) w, z = u k:

    dw_c = sqrt(C) sum dz u               dx = (dz k - u sum_C(dz k u) [|x| >= eps]) / d

Parameter gradients are written as fp32 partials per program (or per sample and channel) and summed
by torch: no atomics, the same bits every run. Registered as torch.library custom ops
(archirf_kernels::group_norm_silu etc.) with fake and autograd implementations, so torch.compile
(fullgraph=True) traces through them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import checks
from .mp import _alloc_like, _bcs, _channels_last, _check_device, _dense, _dsilu, _fake_like, _row_grid, _silu, _tile

Tensor = torch.Tensor

# Launch plan of the GroupNorm kernels on a GPU (see _group_plan), set from benchmarks/sweep_norm_silu_launch.py's
# H100 sweep (benchmarks/results/nvidia-h100-80gb-hbm3/norm_silu_launch_sweep.txt): fused programs of at most
# 8 warps, split tiles of 4096 elements on 4 warps; the looped shape won at few shapes and is off.
FUSED_FWD_ELEMENTS = 16384   # a fused forward program holds at most this many elements (padded) in registers
FUSED_BWD_ELEMENTS = 16384   # the same for the backward, which holds s and dy
MIN_CL_RUN = 16              # channels_last, fused: whole groups per program until a pixel's run is this long
TILE_ELEMENTS = 4096         # split: pixels x channels per tile
SPLIT_WAVES = 4              # split: reduction programs per SM
LOOPED_CHANNELS = 0          # looped: channels (whole groups, at least one) per program; 0: never looped
RMS_BWD_PROGRAMS_PER_SM = 8  # channel RMSNorm backward: programs per SM, each looping over tiles
LOOPED_WAVES = 4             # looped: chosen when B x its programs per sample reach this many per SM
COMBINE_CHANNELS = 64        # split: channels (whole groups) per program of the kernels combining partials
# In Triton's interpreter: small tiles and several per program, so that CPU tests cover every loop.
INTERPRETER = {"fused_elements": 1024, "groups_per_program": 4, "tile": 256, "programs": 4, "looped": False,
               "looped_channels": 8}


# ----------------------------------------------------------------------------------------------
# Kernels. Shapes on the right: BS = BLOCK_S pixels, BC = BLOCK_C channels, BG = BLOCK_G groups.

@triton.jit
def _offsets(s, c, C, S, CHANNELS_LAST: tl.constexpr):
    """Offsets of pixels s (BS,) x channels c (BC,) within one sample of a (B, C, S) tensor -> (BS, BC),
    int32 (a sample holds < 2^31 elements); the sample's int64 start is added to the pointers."""
    if CHANNELS_LAST:
        return s[:, None] * C + c[None, :]
    else:
        return c[None, :] * S + s[:, None]


@triton.jit
def _load_s(X_ptr, R_ptr, S_ptr, offs, mask, HAS_RES: tl.constexpr):
    """The norm's input in fp32: x, or s = x + residual rounded to x's dtype (and stored to S)."""
    v = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (v + tl.load(R_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(S_ptr.dtype.element_ty)
        tl.store(S_ptr + offs, s, mask=mask)
        v = s.to(tl.float32)
    return v


@triton.jit
def _affine(W_ptr, Bias_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel weight (1 if absent) and bias (0 if absent), fp32 (BC,) each."""
    w = tl.where(cmask, 1.0, 0.0)
    b = tl.where(cmask, 0.0, 0.0)
    if HAS_W:
        w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(Bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _group_sum(per_channel, onehot):
    """(BC,) channel values -> (BG,) sums over each group's channels; onehot (BC, BG)."""
    return tl.sum(per_channel[:, None] * onehot, axis=0)


@triton.jit
def _spread(per_group, onehot):
    """(BG,) group values -> (BC,) each channel's group's value."""
    return tl.sum(onehot * per_group[None, :], axis=1)


@triton.jit
def _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """The channels of groups [g0, g0 + GROUPS_PER_PROGRAM) -> (c (BC,), their mask, onehot (BC, BG) of
    each channel's group, the groups' mask (BG,))."""
    lc = tl.arange(0, BLOCK_C)
    c = g0 * CG + lc
    cmask = (lc < GROUPS_PER_PROGRAM * CG) & (c < C)
    j = tl.arange(0, BLOCK_G)
    onehot = ((lc // CG)[:, None] == j[None, :]).to(tl.float32)
    return c, cmask, onehot, (j < GROUPS_PER_PROGRAM) & (g0 + j < G)


@triton.jit
def _groups_tile(pid, C, S, G, CG, num_gblocks, GROUPS_PER_PROGRAM: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """A fused program's tile: all pixels x the channels of GROUPS_PER_PROGRAM groups of one sample
    -> (the sample's start, offsets within it, mask, b, channels, their mask, onehot, groups, their mask)."""
    b = (pid // num_gblocks).to(tl.int64)
    g0 = (pid % num_gblocks) * GROUPS_PER_PROGRAM
    c, cmask, onehot, gmask = _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM, BLOCK_C, BLOCK_G)
    s = tl.arange(0, BLOCK_S)                                                       # (BS,)
    mask = (s < S)[:, None] & cmask[None, :]                                        # (BS, BC)
    offs = _offsets(s, c, C, S, CHANNELS_LAST)
    return b * C * S, offs, mask, b, c, cmask, onehot, b * G + g0 + tl.arange(0, BLOCK_G), gmask


@triton.jit
def _split_tile(pid, C, S, num_cblocks, num_sblocks, CHANNELS_LAST: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile pid of (sample, channel block, pixel block), pixel blocks fastest -> (the sample's start,
    offsets within it, mask, b, channels, their mask)."""
    sb = pid % num_sblocks
    cb = (pid // num_sblocks) % num_cblocks
    b = (pid // (num_sblocks * num_cblocks)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = c < C
    mask = (s < S)[:, None] & cmask[None, :]
    return b * C * S, _offsets(s, c, C, S, CHANNELS_LAST), mask, b, c, cmask


@triton.jit
def _gn_fwd_fused_kernel(
    X_ptr, R_ptr, S_ptr, Y_ptr,         # x, residual, s = x + residual (HAS_RES), y
    W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr,  # (C,) affine; (B, G) fp32 statistics out
    C, S, G, CG: tl.constexpr, num_gblocks, eps,
    GROUPS_PER_PROGRAM: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    base, offs, mask, _, c, cmask, onehot, gi, gmask = _groups_tile(
        tl.program_id(0), C, S, G, CG, num_gblocks, GROUPS_PER_PROGRAM, CHANNELS_LAST, BLOCK_S, BLOCK_C, BLOCK_G)
    v = _load_s(X_ptr + base, R_ptr + base, S_ptr + base, offs, mask, HAS_RES)      # (BS, BC)
    n = CG * S * 1.0                    # fp32 (CG, S may be constexpr 1: Triton specialises 1s)
    # -- statistics, two passes over the registers: the mean, then the centred sum of squares
    mean = _group_sum(tl.sum(v, axis=0), onehot) / n                                # (BG,)
    d = tl.where(mask, v - _spread(mean, onehot)[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(_group_sum(tl.sum(d * d, axis=0), onehot) / n + eps)       # (BG,)
    tl.store(Mean_ptr + gi, mean, mask=gmask)
    tl.store(Rstd_ptr + gi, rstd, mask=gmask)
    # -- y = silu(xhat w + b)
    w, b = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    z = d * (_spread(rstd, onehot) * w)[None, :] + b[None, :]
    tl.store(Y_ptr + base + offs, _silu(z).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    X_ptr, R_ptr, S_ptr,                # x, residual, s = x + residual written here (HAS_RES)
    PMean_ptr, PM2_ptr,                 # (B, num_chunks, C) fp32: each chunk's per-channel mean and M2
    C, S, num_cblocks, num_chunks, chunk_tiles,
    HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    cb = (pid // num_chunks) % num_cblocks
    b = (pid // (num_chunks * num_cblocks)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = b * C * S
    s0 = chunk * chunk_tiles * BLOCK_S
    n_tiles = tl.minimum(chunk_tiles, tl.cdiv(S - s0, BLOCK_S))
    shift, acc1, acc2 = _shifted_sums(X_ptr + base, R_ptr + base, S_ptr + base, c, cmask, C, S, s0, n_tiles,
                                      HAS_RES, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    count = tl.minimum(S - s0, chunk_tiles * BLOCK_S).to(tl.float32)
    sum1 = tl.sum(acc1, axis=0)                                                     # (BC,)
    part = (b * num_chunks + chunk) * C + c
    tl.store(PMean_ptr + part, shift + sum1 / count, mask=cmask)
    tl.store(PM2_ptr + part, tl.maximum(tl.sum(acc2, axis=0) - sum1 * sum1 / count, 0.0), mask=cmask)


@triton.jit
def _shifted_sums(X_ptr, R_ptr, S_ptr, c, cmask, C, S, s0, n_tiles,
                  HAS_RES: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel statistics of pixels [s0, s0 + n_tiles BLOCK_S) of one sample (pointers at its start):
    -> (shift (BC,), sums of d = s - shift (BS, BC), sums of d^2 (BS, BC)), accumulated elementwise in
    registers (one cross-thread reduction per chunk, not per tile). The shift is the first tile's own
    per-channel mean, so that d is centred to within the data's drift: the shifted-data algorithm, free of
    E[x^2] - E[x]^2's cancellation of a large mean; its error grows with (shift - the chunk's mean)^2 /
    variance, i.e. when the first tile (few pixels in channels_last at large C) is far from typical."""
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & cmask[None, :]
    v = _load_s(X_ptr, R_ptr, S_ptr, _offsets(s, c, C, S, CHANNELS_LAST), mask, HAS_RES)
    shift = tl.sum(v, axis=0) / tl.minimum(S - s0, BLOCK_S).to(tl.float32)            # (BC,)
    acc1 = tl.where(mask, v - shift[None, :], 0.0)
    acc2 = acc1 * acc1
    for t in range(1, n_tiles):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        v = _load_s(X_ptr, R_ptr, S_ptr, _offsets(s, c, C, S, CHANNELS_LAST), mask, HAS_RES)
        d = tl.where(mask, v - shift[None, :], 0.0)
        acc1 += d
        acc2 += d * d
    return shift, acc1, acc2


@triton.jit
def _gn_fwd_looped_kernel(
    X_ptr, R_ptr, S_ptr, Y_ptr, W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr,   # as _gn_fwd_fused_kernel's
    C, S, G, CG: tl.constexpr, num_gblocks, eps,
    GROUPS_PER_PROGRAM: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Whole groups of one sample per program, looping over its pixels in tiles: the statistics pass, then
    the output pass over the same pixels in reverse order (what the first pass read last is still in L2).
    One launch, no partials."""
    pid = tl.program_id(0)
    b = (pid // num_gblocks).to(tl.int64)
    g0 = (pid % num_gblocks) * GROUPS_PER_PROGRAM
    c, cmask, onehot, gmask = _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM, BLOCK_C, BLOCK_G)
    base = b * C * S
    n_tiles = tl.cdiv(S, BLOCK_S)
    shift, acc1, acc2 = _shifted_sums(X_ptr + base, R_ptr + base, S_ptr + base, c, cmask, C, S, 0, n_tiles,
                                      HAS_RES, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    # -- each channel's mean and M2, merged into its group's (equal counts: Chan et al.'s formula)
    npix = S * 1.0
    sum1 = tl.sum(acc1, axis=0)
    mean_c = tl.where(cmask, shift + sum1 / npix, 0.0)                              # (BC,)
    m2_c = tl.where(cmask, tl.maximum(tl.sum(acc2, axis=0) - sum1 * sum1 / npix, 0.0), 0.0)
    mean = _group_sum(mean_c, onehot) / CG                                          # (BG,)
    dm = tl.where(cmask, mean_c - _spread(mean, onehot), 0.0)
    rstd = 1.0 / tl.sqrt(_group_sum(m2_c + npix * dm * dm, onehot) / (CG * npix) + eps)
    gi = b * G + g0 + tl.arange(0, BLOCK_G)
    tl.store(Mean_ptr + gi, mean, mask=gmask)
    tl.store(Rstd_ptr + gi, rstd, mask=gmask)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    mean_s = _spread(mean, onehot)
    scale = _spread(rstd, onehot) * w
    if HAS_RES:
        tl.debug_barrier()              # s, written by the first pass, is read back by other threads
    for i in range(0, n_tiles):
        s = (n_tiles - 1 - i) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = _offsets(s, c, C, S, CHANNELS_LAST)
        v = tl.load(S_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z = (v - mean_s[None, :]) * scale[None, :] + bias[None, :]
        tl.store(Y_ptr + base + offs, _silu(z).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_combine_kernel(
    PMean_ptr, PM2_ptr, Mean_ptr, Rstd_ptr,   # chunk partials (B, P, C) -> mean, rstd (B, G)
    C, S, G, CG: tl.constexpr, P, chunk_s, num_gblocks, eps,
    GROUPS_PER_PROGRAM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_gblocks
    g0 = (pid % num_gblocks) * GROUPS_PER_PROGRAM
    c, cmask, onehot, gmask = _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM, BLOCK_C, BLOCK_G)
    n = CG * S * 1.0                    # fp32 (CG, S may be constexpr 1: Triton specialises 1s)
    # -- pass 1: each group's mean, from the chunks' means weighted by their pixel counts
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        count = tl.minimum(tl.maximum(S - p * chunk_s, 0), chunk_s).to(tl.float32)   # (BP,)
        m = (p < P)[:, None] & cmask[None, :]
        offs = (b * P + p)[:, None] * C + c[None, :]                                 # (BP, BC)
        acc += tl.sum(count[:, None] * tl.load(PMean_ptr + offs, mask=m, other=0.0), axis=0)
    mean = _group_sum(acc, onehot) / n                                               # (BG,)
    mean_c = _spread(mean, onehot)
    # -- pass 2: M2 = sum of the partial M2s + count * (partial mean - mean)^2 (Chan et al.)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        count = tl.minimum(tl.maximum(S - p * chunk_s, 0), chunk_s).to(tl.float32)
        m = (p < P)[:, None] & cmask[None, :]
        offs = (b * P + p)[:, None] * C + c[None, :]
        delta = tl.load(PMean_ptr + offs, mask=m, other=0.0) - mean_c[None, :]
        m2 = tl.load(PM2_ptr + offs, mask=m, other=0.0) + count[:, None] * delta * delta
        acc += tl.sum(tl.where(m, m2, 0.0), axis=0)
    gi = b * G + g0 + tl.arange(0, BLOCK_G)
    tl.store(Mean_ptr + gi, mean, mask=gmask)
    tl.store(Rstd_ptr + gi, 1.0 / tl.sqrt(_group_sum(acc, onehot) / n + eps), mask=gmask)


@triton.jit
def _gn_fwd_apply_kernel(
    S_ptr, Y_ptr, W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr,
    C, S, G, CG: tl.constexpr, num_cblocks, num_sblocks,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # last tiles first: the statistics pass read them last, so they are the ones still in L2
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    base, offs, mask, b, c, cmask = _split_tile(pid, C, S, num_cblocks, num_sblocks, CHANNELS_LAST, BLOCK_S,
                                                BLOCK_C)
    grp = b * G + c // CG                                                           # (BC,)
    mean = tl.load(Mean_ptr + grp, mask=cmask, other=0.0)
    rstd = tl.load(Rstd_ptr + grp, mask=cmask, other=0.0)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    v = tl.load(S_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)           # (BS, BC)
    z = (v - mean[None, :]) * (rstd * w)[None, :] + bias[None, :]
    tl.store(Y_ptr + base + offs, _silu(z).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_fused_kernel(
    S_ptr, DY_ptr, DS_ptr, DX_ptr,      # s (saved), grads of y and of s (HAS_DS), dx = d(residual)
    W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr,
    P1_ptr, P2_ptr,                     # (B, C) fp32 out: sum over pixels of dz xhat, of dz
    C, S, G, CG: tl.constexpr, num_gblocks,
    GROUPS_PER_PROGRAM: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    base, offs, mask, b, c, cmask, onehot, gi, gmask = _groups_tile(
        tl.program_id(0), C, S, G, CG, num_gblocks, GROUPS_PER_PROGRAM, CHANNELS_LAST, BLOCK_S, BLOCK_C, BLOCK_G)
    mean = _spread(tl.load(Mean_ptr + gi, mask=gmask, other=0.0), onehot)            # (BC,)
    rstd = _spread(tl.load(Rstd_ptr + gi, mask=gmask, other=0.0), onehot)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    v = tl.load(S_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)                  # (BS, BC)
    dy = tl.load(DY_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (v - mean[None, :]) * rstd[None, :]
    dz = dy * _dsilu(xhat * w[None, :] + bias[None, :])                             # 0 where masked
    # -- per-channel sums: the parameter gradients' partials, and the group sums A, Bs
    p1 = tl.sum(dz * xhat, axis=0)                                                  # (BC,)
    p2 = tl.sum(dz, axis=0)
    tl.store(P1_ptr + b * C + c, p1, mask=cmask)
    tl.store(P2_ptr + b * C + c, p2, mask=cmask)
    n = CG * S * 1.0                    # fp32 (CG, S may be constexpr 1: Triton specialises 1s)
    a = _spread(_group_sum(w * p2, onehot), onehot)                                 # (BC,)
    bs = _spread(_group_sum(w * p1, onehot), onehot)
    dx = rstd[None, :] * (dz * w[None, :] - (a[None, :] + xhat * bs[None, :]) / n)
    if HAS_DS:
        dx += tl.load(DS_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX_ptr + base + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_dx_tile(S_ptr, DY_ptr, DS_ptr, DX_ptr, offs, mask, mean, rstd, w, bias, a, bs, n, HAS_DS: tl.constexpr):
    """dx of one tile (pointers at the sample's start; per-channel (BC,) mean, rstd, affine, group sums A, Bs)."""
    v = tl.load(S_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = (v - mean[None, :]) * rstd[None, :]
    dz = dy * _dsilu(xhat * w[None, :] + bias[None, :])
    dx = rstd[None, :] * (dz * w[None, :] - (a[None, :] + xhat * bs[None, :]) / n)
    if HAS_DS:
        dx += tl.load(DS_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_looped_kernel(
    S_ptr, DY_ptr, DS_ptr, DX_ptr, W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr, P1_ptr, P2_ptr,  # as the fused one's
    C, S, G, CG: tl.constexpr, num_gblocks,
    GROUPS_PER_PROGRAM: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """The forward's looped shape: the per-channel sums over all of a sample's pixels, then dx in reverse."""
    pid = tl.program_id(0)
    b = (pid // num_gblocks).to(tl.int64)
    g0 = (pid % num_gblocks) * GROUPS_PER_PROGRAM
    c, cmask, onehot, gmask = _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM, BLOCK_C, BLOCK_G)
    gi = b * G + g0 + tl.arange(0, BLOCK_G)
    mean = _spread(tl.load(Mean_ptr + gi, mask=gmask, other=0.0), onehot)            # (BC,)
    rstd = _spread(tl.load(Rstd_ptr + gi, mask=gmask, other=0.0), onehot)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    base = b * C * S
    n_tiles = tl.cdiv(S, BLOCK_S)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for t in range(0, n_tiles):
        s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = _offsets(s, c, C, S, CHANNELS_LAST)
        v = tl.load(S_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (v - mean[None, :]) * rstd[None, :]
        dz = dy * _dsilu(xhat * w[None, :] + bias[None, :])                         # 0 where masked
        acc1 += dz * xhat
        acc2 += dz
    p1 = tl.sum(acc1, axis=0)                                                       # (BC,)
    p2 = tl.sum(acc2, axis=0)
    tl.store(P1_ptr + b * C + c, p1, mask=cmask)
    tl.store(P2_ptr + b * C + c, p2, mask=cmask)
    n = CG * S * 1.0
    a = _spread(_group_sum(w * p2, onehot), onehot)
    bs = _spread(_group_sum(w * p1, onehot), onehot)
    for i in range(0, n_tiles):
        s = (n_tiles - 1 - i) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        _gn_dx_tile(S_ptr + base, DY_ptr + base, DS_ptr + base, DX_ptr + base, _offsets(s, c, C, S, CHANNELS_LAST),
                    mask, mean, rstd, w, bias, a, bs, n, HAS_DS)


@triton.jit
def _gn_bwd_partials_kernel(
    S_ptr, DY_ptr, W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr,
    Part1_ptr, Part2_ptr,               # (B, num_chunks, C) fp32 out: sums of dz xhat and of dz per chunk
    C, S, G, CG: tl.constexpr, num_cblocks, num_chunks, chunk_tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    cb = (pid // num_chunks) % num_cblocks
    b = (pid // (num_chunks * num_cblocks)).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    grp = b * G + c // CG
    mean = tl.load(Mean_ptr + grp, mask=cmask, other=0.0)
    rstd = tl.load(Rstd_ptr + grp, mask=cmask, other=0.0)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    base = b * C * S
    s0 = chunk * chunk_tiles * BLOCK_S
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for t in range(0, tl.minimum(chunk_tiles, tl.cdiv(S - s0, BLOCK_S))):
        s = s0 + t * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = _offsets(s, c, C, S, CHANNELS_LAST)
        v = tl.load(S_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (v - mean[None, :]) * rstd[None, :]
        dz = dy * _dsilu(xhat * w[None, :] + bias[None, :])
        acc1 += dz * xhat
        acc2 += dz
    part = (b * num_chunks + chunk) * C + c
    tl.store(Part1_ptr + part, tl.sum(acc1, axis=0), mask=cmask)
    tl.store(Part2_ptr + part, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _gn_bwd_combine_kernel(
    Part1_ptr, Part2_ptr, W_ptr,        # chunk partials (B, P, C)
    P1_ptr, P2_ptr, A_ptr, Bs_ptr,      # out: per-(sample, channel) sums (B, C); group sums A, Bs (B, G)
    C, G, CG: tl.constexpr, P, num_gblocks,
    HAS_W: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_gblocks
    g0 = (pid % num_gblocks) * GROUPS_PER_PROGRAM
    c, cmask, onehot, gmask = _group_channels(g0, C, G, CG, GROUPS_PER_PROGRAM, BLOCK_C, BLOCK_G)
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        offs = (b * P + p)[:, None] * C + c[None, :]
        acc1 += tl.sum(tl.load(Part1_ptr + offs, mask=m, other=0.0), axis=0)
        acc2 += tl.sum(tl.load(Part2_ptr + offs, mask=m, other=0.0), axis=0)
    tl.store(P1_ptr + b * C + c, acc1, mask=cmask)
    tl.store(P2_ptr + b * C + c, acc2, mask=cmask)
    w = tl.where(cmask, 1.0, 0.0)
    if HAS_W:
        w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    gi = b * G + g0 + tl.arange(0, BLOCK_G)
    tl.store(A_ptr + gi, _group_sum(w * acc2, onehot), mask=gmask)
    tl.store(Bs_ptr + gi, _group_sum(w * acc1, onehot), mask=gmask)


@triton.jit
def _gn_bwd_apply_kernel(
    S_ptr, DY_ptr, DS_ptr, DX_ptr,
    W_ptr, Bias_ptr, Mean_ptr, Rstd_ptr, A_ptr, Bs_ptr,
    C, S, G, CG: tl.constexpr, num_cblocks, num_sblocks,
    HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)       # reverse order, as the forward's apply pass
    base, offs, mask, b, c, cmask = _split_tile(pid, C, S, num_cblocks, num_sblocks, CHANNELS_LAST, BLOCK_S,
                                                BLOCK_C)
    grp = b * G + c // CG
    mean = tl.load(Mean_ptr + grp, mask=cmask, other=0.0)
    rstd = tl.load(Rstd_ptr + grp, mask=cmask, other=0.0)
    a = tl.load(A_ptr + grp, mask=cmask, other=0.0)
    bs = tl.load(Bs_ptr + grp, mask=cmask, other=0.0)
    w, bias = _affine(W_ptr, Bias_ptr, c, cmask, HAS_W, HAS_B)
    n = CG * S * 1.0                    # fp32 (CG, S may be constexpr 1: Triton specialises 1s)
    _gn_dx_tile(S_ptr + base, DY_ptr + base, DS_ptr + base, DX_ptr + base, offs, mask, mean, rstd, w, bias, a, bs,
                n, HAS_DS)


@triton.jit
def _rms_load(X_ptr, W_ptr, offs, mask, C, eps, scale, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile's rows: (u = x / d, |x| per row, d = max(|x|, eps), k = sqrt(C) w per channel), fp32."""
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)                  # (BS, BC)
    norm = tl.sqrt(tl.sum(x * x, axis=1))                                           # (BS,)
    d = tl.maximum(norm, eps)
    cols = tl.arange(0, BLOCK_C)
    k = tl.where(cols < C, scale, 0.0)
    if HAS_W:
        k = k * tl.load(W_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    return x / d[:, None], norm, d, k


@triton.jit
def _rms_fwd_kernel(
    X_ptr, W_ptr, Y_ptr,
    C, S, num_s_blocks, eps, scale,
    HAS_W: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs, mask, _ = _tile(tl.program_id(0), C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
    u, _, _, k = _rms_load(X_ptr, W_ptr, offs, mask, C, eps, scale, HAS_W, BLOCK_C)
    tl.store(Y_ptr + offs, _silu(u * k[None, :]).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_kernel(
    X_ptr, W_ptr, DY_ptr, DX_ptr, Part_ptr,   # Part: (programs, C) fp32 partial sums of dweight
    C, S, num_s_blocks, num_tiles, eps, scale,
    HAS_W: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program p takes tiles p, p + programs, ...: dweight's partials accumulate elementwise in registers
    and are reduced and written once per program."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        offs, mask, _ = _tile(tile, C, S, num_s_blocks, CHANNELS_LAST, BLOCK_S, BLOCK_C)
        u, norm, d, k = _rms_load(X_ptr, W_ptr, offs, mask, C, eps, scale, HAS_W, BLOCK_C)
        dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * _dsilu(u * k[None, :])                                            # (BS, BC)
        if HAS_W:
            acc += dz * u
        du = dz * k[None, :]
        # -- dx = (du - u sum(du u)) / d; a row clamped at eps (|x| < eps) is a plain scaling: du / eps
        coef = tl.where(norm >= eps, tl.sum(du * u, axis=1), 0.0)                   # (BS,)
        dx = (du - u * coef[:, None]) / d[:, None]
        tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    if HAS_W:
        cols = tl.arange(0, BLOCK_C)
        tl.store(Part_ptr + pid.to(tl.int64) * C + cols, tl.sum(acc, axis=0) * scale, mask=cols < C)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated them).
INTERPRETED = type(_gn_fwd_fused_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# Launch plans.

class GroupPlan(NamedTuple):
    fused: bool                 # whole groups per program (else the split reduction)
    groups_per_program: int     # fused
    block_s: int                # fused: >= S; split: pixels per tile
    block_c: int                # fused: >= groups_per_program * C / groups; split: channels per tile
    chunk_tiles: int            # split: tiles per reduction program (its chunk of one sample's pixels)
    num_warps: int
    looped: bool = False        # (not fused) whole groups per program, looping over the pixels in tiles


def _pow2_floor(n: float) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _group_plan(B: int, C: int, S: int, groups: int, channels_last: bool, device: torch.device,
                backward: bool) -> GroupPlan:
    cuda = device.type == "cuda"
    cg = C // groups
    if cuda:
        fused_max, tile = (FUSED_BWD_ELEMENTS if backward else FUSED_FWD_ELEMENTS), TILE_ELEMENTS
        min_programs, programs = _sm_count(device), SPLIT_WAVES * _sm_count(device)
    else:
        fused_max, tile = INTERPRETER["fused_elements"], INTERPRETER["tile"]
        min_programs, programs = 1, INTERPRETER["programs"]
    # -- fused: whole groups (channels_last: enough adjacent ones for a run of MIN_CL_RUN channels)
    gpp = 1
    while channels_last and gpp * cg < MIN_CL_RUN and gpp < groups:
        gpp *= 2
    if not cuda:
        gpp = min(INTERPRETER["groups_per_program"], triton.next_power_of_2(groups))
    block_s, block_c = triton.next_power_of_2(S), triton.next_power_of_2(gpp * cg)
    if block_s * block_c <= fused_max and B * triton.cdiv(groups, gpp) >= min_programs:
        warps = min(max(_pow2_floor(block_s * block_c / (16 if backward else 32) / 32), 1), 8)
        return GroupPlan(True, gpp, block_s, block_c, 1, warps)
    # -- looped: whole groups of LOOPED_CHANNELS channels (at least one group) per program, tiles of `tile`
    looped_channels = LOOPED_CHANNELS if cuda else INTERPRETER["looped_channels"]
    if looped_channels and (cuda or INTERPRETER["looped"]):
        gpp = min(max(looped_channels // cg, 1), triton.next_power_of_2(groups))
        block_c = triton.next_power_of_2(gpp * cg)
        if B * triton.cdiv(groups, gpp) >= (LOOPED_WAVES * min_programs if cuda else 1):
            block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
            warps = min(max(_pow2_floor(block_s * block_c / 16 / 32), 1), 8)
            return GroupPlan(False, gpp, block_s, block_c, 1, warps, True)
    # -- split: tiles of `tile` elements, along the contiguous dim; chunks so that ~`programs` reduce
    if channels_last:
        block_c = min(triton.next_power_of_2(C), tile)
        block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
    else:
        block_s = min(triton.next_power_of_2(S), max(tile // 4, 1))
        block_c = max(1, min(triton.next_power_of_2(C), tile // block_s))
    s_tiles = triton.cdiv(S, block_s)
    chunks = min(max(triton.cdiv(programs, B * triton.cdiv(C, block_c)), 1), s_tiles)
    warps = min(max(_pow2_floor(block_s * block_c / 32 / 32), 1), 8)
    return GroupPlan(False, 1, block_s, block_c, triton.cdiv(s_tiles, chunks), warps)


def _combine_plan(C: int, groups: int, chunks: int, device: torch.device) -> tuple[int, int, int, int]:
    """(groups per program, BLOCK_P, BLOCK_C, BLOCK_G) of the combine kernels: whole groups of about
    COMBINE_CHANNELS channels (the interpreter: all of a sample's), chunks in blocks of BLOCK_P."""
    cg = C // groups
    want = COMBINE_CHANNELS if device.type == "cuda" else C
    gpp = min(triton.next_power_of_2(max(want // cg, 1)), triton.next_power_of_2(groups))
    block_c = triton.next_power_of_2(gpp * cg)
    return gpp, min(triton.next_power_of_2(chunks), max(4096 // block_c, 1)), block_c, gpp


# ----------------------------------------------------------------------------------------------
# Launchers (real tensors) and shape functions (shared with the fake implementations).

def _stats_like(x: Tensor, groups: int) -> Tensor:
    return _alloc_like(x, (x.shape[0], groups), torch.float32)


def _gn_forward(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (s (x itself without residual), y, mean, rstd)."""
    x = _dense(x)
    cl = _channels_last(x)
    res = _dense(residual, cl) if residual is not None else None
    s = _alloc_like(x) if res is not None else x
    y = _alloc_like(x)
    mean, rstd = _stats_like(x, groups), _stats_like(x, groups)
    B, C, S = _bcs(x)
    cg = C // groups
    if x.numel() == 0:
        return s, y, mean.zero_(), rstd.zero_()
    plan = _group_plan(B, C, S, groups, cl, x.device, backward=False)
    affine, flags = _affine_launch(weight, bias, x, cl, plan)
    if plan.fused or plan.looped:
        ngb = triton.cdiv(groups, plan.groups_per_program)
        (_gn_fwd_fused_kernel if plan.fused else _gn_fwd_looped_kernel)[(B * ngb,)](
            x, res if res is not None else x, s, y, *affine, mean, rstd, C, S, groups, cg, ngb, eps,
            GROUPS_PER_PROGRAM=plan.groups_per_program, HAS_RES=res is not None,
            BLOCK_G=triton.next_power_of_2(plan.groups_per_program), **flags)
        return s, y, mean, rstd
    ncb, nsb = triton.cdiv(C, plan.block_c), triton.cdiv(S, plan.block_s)
    chunks = triton.cdiv(nsb, plan.chunk_tiles)
    pmean, pm2 = _alloc_like(x, (B, chunks, C), torch.float32), _alloc_like(x, (B, chunks, C), torch.float32)
    _gn_stats_kernel[(B * ncb * chunks,)](
        x, res if res is not None else x, s, pmean, pm2, C, S, ncb, chunks, plan.chunk_tiles,
        HAS_RES=res is not None, CHANNELS_LAST=cl, BLOCK_S=plan.block_s, BLOCK_C=plan.block_c,
        num_warps=plan.num_warps)
    gpp, block_p, block_c, block_g = _combine_plan(C, groups, chunks, x.device)
    ngb = triton.cdiv(groups, gpp)
    _gn_combine_kernel[(B * ngb,)](pmean, pm2, mean, rstd, C, S, groups, cg, chunks, plan.chunk_tiles * plan.block_s,
                                   ngb, eps, GROUPS_PER_PROGRAM=gpp, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_G=block_g)
    _gn_fwd_apply_kernel[(B * ncb * nsb,)](s, y, *affine, mean, rstd, C, S, groups, cg, ncb, nsb, **flags)
    return s, y, mean, rstd


def _affine_launch(weight: Tensor | None, bias: Tensor | None, placeholder: Tensor, cl: bool, plan):
    """The affine pointers (a placeholder tensor for an absent one) and the launch flags the GroupNorm kernels
    share, forward and backward."""
    affine = (weight if weight is not None else placeholder, bias if bias is not None else placeholder)
    return affine, dict(HAS_W=weight is not None, HAS_B=bias is not None, CHANNELS_LAST=cl,
                        BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, num_warps=plan.num_warps)


def _gn_backward(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor | None, bias: Tensor | None,
                 mean: Tensor, rstd: Tensor, groups: int,
                 grad_dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """-> (d(s) in grad_dtype: dx, and d(residual) where there is one; dweight; dbias)."""
    cl = _channels_last(s)
    dy = _dense(dy, cl)
    ds = _dense(ds, cl) if ds is not None else None
    B, C, S = _bcs(s)
    cg = C // groups
    dx = _alloc_like(s, dtype=grad_dtype)
    p1, p2 = _alloc_like(s, (B, C), torch.float32), _alloc_like(s, (B, C), torch.float32)
    if s.numel() == 0:
        p1.zero_(), p2.zero_()
    else:
        plan = _group_plan(B, C, S, groups, cl, s.device, backward=True)
        affine, flags = _affine_launch(weight, bias, s, cl, plan)
        if plan.fused or plan.looped:
            ngb = triton.cdiv(groups, plan.groups_per_program)
            (_gn_bwd_fused_kernel if plan.fused else _gn_bwd_looped_kernel)[(B * ngb,)](
                s, dy, ds if ds is not None else dy, dx, *affine, mean, rstd, p1, p2, C, S, groups, cg, ngb,
                GROUPS_PER_PROGRAM=plan.groups_per_program, HAS_DS=ds is not None,
                BLOCK_G=triton.next_power_of_2(plan.groups_per_program), **flags)
        else:
            ncb, nsb = triton.cdiv(C, plan.block_c), triton.cdiv(S, plan.block_s)
            chunks = triton.cdiv(nsb, plan.chunk_tiles)
            part1 = _alloc_like(s, (B, chunks, C), torch.float32)
            part2 = _alloc_like(s, (B, chunks, C), torch.float32)
            _gn_bwd_partials_kernel[(B * ncb * chunks,)](
                s, dy, *affine, mean, rstd, part1, part2, C, S, groups, cg, ncb, chunks, plan.chunk_tiles, **flags)
            a, bs = _stats_like(s, groups), _stats_like(s, groups)
            gpp, block_p, block_c, block_g = _combine_plan(C, groups, chunks, s.device)
            ngb = triton.cdiv(groups, gpp)
            _gn_bwd_combine_kernel[(B * ngb,)](part1, part2, affine[0], p1, p2, a, bs, C, groups, cg, chunks, ngb,
                                               HAS_W=weight is not None, GROUPS_PER_PROGRAM=gpp, BLOCK_P=block_p,
                                               BLOCK_C=block_c, BLOCK_G=block_g)
            _gn_bwd_apply_kernel[(B * ncb * nsb,)](
                s, dy, ds if ds is not None else dy, dx, *affine, mean, rstd, a, bs, C, S, groups, cg, ncb, nsb,
                HAS_DS=ds is not None, **flags)
    dweight = p1.sum(0).to(weight.dtype) if weight is not None else None
    dbias = p2.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def _rms_grid(B: int, C: int, S: int, device: torch.device) -> tuple[int, int, int, int]:
    return _row_grid("channel_rms_norm_silu", B, C, S, device)


def _rms_forward(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    x = _dense(x)
    y = _alloc_like(x)
    B, C, S = _bcs(x)
    block_s, block_c, nsb, warps = _rms_grid(B, C, S, x.device)
    if x.numel():
        _rms_fwd_kernel[(B * nsb,)](x, weight if weight is not None else x, y, C, S, nsb, eps, math.sqrt(C),
                                    HAS_W=weight is not None, CHANNELS_LAST=_channels_last(x),
                                    BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    return y


def _rms_backward(dy: Tensor, x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor | None]:
    cl = _channels_last(x)
    dy = _dense(dy, cl)
    dx = _alloc_like(x)
    B, C, S = _bcs(x)
    block_s, block_c, nsb, warps = _rms_grid(B, C, S, x.device)
    tiles = B * nsb
    per_sm = RMS_BWD_PROGRAMS_PER_SM if x.device.type == "cuda" else 0
    programs = min(tiles, per_sm * _sm_count(x.device) if per_sm else INTERPRETER["programs"])
    part = _alloc_like(x, (programs if weight is not None else 0, C), torch.float32)
    if x.numel():
        _rms_bwd_kernel[(programs,)](x, weight if weight is not None else x, dy, dx, part, C, S, nsb, tiles, eps,
                                     math.sqrt(C), HAS_W=weight is not None, CHANNELS_LAST=cl,
                                     BLOCK_S=block_s, BLOCK_C=block_c, num_warps=warps)
    elif weight is not None:
        part.zero_()
    return dx, part.sum(0).to(weight.dtype) if weight is not None else None


# ----------------------------------------------------------------------------------------------
# Custom ops. Absent gradients come back from the backward ops as empty tensors (custom ops return
# no None).

_EMPTY = (0,)


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_EMPTY)


def _check_gn(x, weight, bias, groups, residual) -> None:
    checks.group_norm_silu(x, weight, bias, groups, residual)
    checks.sample_size("group_norm_silu", x)        # the Triton path only: the reference has no such limit
    _check_device("group_norm_silu", x)


# -- group_norm_silu (+ residual)

@torch.library.custom_op("archirf_kernels::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_gn(x, weight, bias, groups, None)
    _, y, mean, rstd = _gn_forward(x, None, weight, bias, groups, eps)
    return y, mean, rstd


@_group_norm_silu_op.register_fake
def _(x, weight, bias, groups, eps):
    checks.group_norm_silu(x, weight, bias, groups, None)
    return _fake_like(x), _stats_like(x, groups), _stats_like(x, groups)


@torch.library.custom_op("archirf_kernels::group_norm_silu_residual", mutates_args=())
def _group_norm_silu_residual_op(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                                 groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_gn(x, weight, bias, groups, residual)
    return _gn_forward(x, residual, weight, bias, groups, eps)


@_group_norm_silu_residual_op.register_fake
def _(x, residual, weight, bias, groups, eps):
    checks.group_norm_silu(x, weight, bias, groups, residual)
    return _fake_like(x), _fake_like(x), _stats_like(x, groups), _stats_like(x, groups)


@torch.library.custom_op("archirf_kernels::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor | None,
                                 bias: Tensor | None, mean: Tensor, rstd: Tensor, groups: int,
                                 grad_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _gn_backward(dy, ds, _dense(s), weight, bias, mean, rstd, groups, grad_dtype)
    return dx, _empty_if_none(dweight, s), _empty_if_none(dbias, s)


@_group_norm_silu_backward_op.register_fake
def _(dy, ds, s, weight, bias, mean, rstd, groups, grad_dtype):
    return (_fake_like(s, dtype=grad_dtype), weight.new_empty(weight.shape) if weight is not None else
            s.new_empty(_EMPTY), bias.new_empty(bias.shape) if bias is not None else s.new_empty(_EMPTY))


def _group_norm_silu_setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.groups = groups
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_silu_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.archirf_kernels.group_norm_silu_backward(
        dy, None, x, weight, bias, mean, rstd, ctx.groups, x.dtype)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None, None, None


def _group_norm_silu_residual_setup_context(ctx, inputs, output):
    x, residual, weight, bias, groups, eps = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd)     # s: the residual stream, which is kept anyway
    ctx.groups, ctx.x_dtype, ctx.residual_dtype = groups, x.dtype, residual.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_silu_residual_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:      # only s is used downstream: the gradient passes straight to x and the residual
        return ds.to(ctx.x_dtype), ds.to(ctx.residual_dtype), None, None, None, None
    # one gradient for x and residual (s = x + residual), in the wider dtype of the two
    grad, dweight, dbias = torch.ops.archirf_kernels.group_norm_silu_backward(
        dy, ds, s, weight, bias, mean, rstd, ctx.groups, torch.promote_types(ctx.x_dtype, ctx.residual_dtype))
    return (grad.to(ctx.x_dtype), grad.to(ctx.residual_dtype), dweight if weight is not None else None,
            dbias if bias is not None else None, None, None)


_group_norm_silu_op.register_autograd(_group_norm_silu_backward, setup_context=_group_norm_silu_setup_context)
_group_norm_silu_residual_op.register_autograd(_group_norm_silu_residual_backward,
                                               setup_context=_group_norm_silu_residual_setup_context)


# -- channel_rms_norm_silu

@torch.library.custom_op("archirf_kernels::channel_rms_norm_silu", mutates_args=())
def _channel_rms_norm_silu_op(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    checks.channel_rms_norm_silu(x, weight)
    _check_device("channel_rms_norm_silu", x)
    return _rms_forward(x, weight, eps)


@_channel_rms_norm_silu_op.register_fake
def _(x, weight, eps):
    checks.channel_rms_norm_silu(x, weight)
    return _fake_like(x)


@torch.library.custom_op("archirf_kernels::channel_rms_norm_silu_backward", mutates_args=())
def _channel_rms_norm_silu_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None,
                                       eps: float) -> tuple[Tensor, Tensor]:
    dx, dweight = _rms_backward(dy, _dense(x), weight, eps)
    return dx, _empty_if_none(dweight, x)


@_channel_rms_norm_silu_backward_op.register_fake
def _(dy, x, weight, eps):
    return _fake_like(x), weight.new_empty(weight.shape) if weight is not None else x.new_empty(_EMPTY)


def _channel_rms_norm_silu_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _channel_rms_norm_silu_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight = torch.ops.archirf_kernels.channel_rms_norm_silu_backward(dy, x, weight, ctx.eps)
    return dx, dweight if weight is not None else None, None


_channel_rms_norm_silu_op.register_autograd(_channel_rms_norm_silu_backward,
                                            setup_context=_channel_rms_norm_silu_setup_context)


# ----------------------------------------------------------------------------------------------
# Differentiable entry points (archirf_kernels.* dispatches here for impl="triton").

def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float = 1e-6,
                    residual: Tensor | None = None):
    checks.group_norm_silu(x, weight, bias, groups, residual)     # before the op's schema sees a bad `groups`
    if residual is None:
        return torch.ops.archirf_kernels.group_norm_silu(x, weight, bias, groups, eps)[0]
    s, y, _, _ = torch.ops.archirf_kernels.group_norm_silu_residual(x, residual, weight, bias, groups, eps)
    return s, y


def channel_rms_norm_silu(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    return torch.ops.archirf_kernels.channel_rms_norm_silu(x, weight, eps)
