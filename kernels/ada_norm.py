"""Fused adaLN for DiT / MMDiT blocks: ada_layer_norm, gated_residual and their block-boundary fusion.

    h            = modulate(N(x), shift, scale)            ada_layer_norm
    x_new        = x + gate * y                            gated_residual
    x_new, h     = x + gate * y, modulate(N(x_new), ...)   gated_residual_ada_layer_norm

N is LayerNorm or RMSNorm over C with an optional affine (weight, bias); modulate is
reference.modulate, the spec of every op here (DiT Sec. 3.2). x, y: (B, N, C); shift, scale, gate
per sample (B, C) / (B, 1, C) or per token (B, N, C), each in its own dtype (bf16 activations with
fp32 modulation is fine). All math in fp32; outputs in x's dtype, gradients in their input's dtype.

Kernel layout. A program handles `tiles` consecutive tiles of ROWS tokens of one sample b; a tile
is ROWS whole rows (at DiT widths: one), held in registers, so the norm's statistics and the
backward's row reductions need no second read. The tile loop is software-pipelined (NUM_STAGES):
the next tiles' loads land in shared memory while this one computes, which keeps enough bytes in
flight at the few programs per SM that the registers allow. Triton blocks are
powers of two; rather than pad C to the next one (C = 1152 -> 2048: 44% of the lanes masked), a row
is split into a main block of BLOCK_A = the largest power of two <= C channels, never masked, and
a tail block of BLOCK_B = next_pow2(C - BLOCK_A) channels (DiT widths are exact: 1152 = 1024 + 128,
1536 = 1024 + 512, 768 = 512 + 256; none when C is a power of two). Per-sample conditioning and
the affine are loaded once per program. Reductions over tokens (per-sample dshift, dscale, dgate;
dweight, dbias) accumulate in fp32 registers across the program's tiles and are written once as a
partial row per program, (num_programs, C) in fp32; one small kernel (_sum_partials_kernel) then
adds the few partials of each sample in a fixed order and writes every such gradient in its
dtype (no atomics: same bits every run, as bit-exact resume needs).

Forward saves mean and rstd per row (fp32; no mean for RMSNorm) and, for the fusion, x_new (which is
an output anyway); the backward recomputes the normalised row from them.

Memory traffic, bytes per element of (B, N, C) in bf16 with per-sample conditioning (each is one
pass: every activation is read or written once):
    ada_layer_norm                 fwd  4 (x -> h)               bwd  6 (x, dh -> dx)
    gated_residual                 fwd  6 (x, y -> x_new)        bwd  6 (dout, y -> dy; dx = dout)
    gated_residual_ada_layer_norm  fwd  8 (x, y -> x_new, h)     bwd 12 (dx_new, dh, x_new, y -> dx, dy)
plus, in backward, 8 / (rows per program) bytes per element for each sum over tokens (partial row
written and read back in fp32). Per-token conditioning adds its own reads (and gradient writes).
Launch shapes (split or padded row, ROWS, num_warps, NUM_STAGES, programs in waves of what fits on
the GPU at once) come from LAUNCH / _launch_config, tuned on an H100 with
benchmarks/sweep_adaln_launch.py (results in benchmarks/results/<gpu>/adaln_launch_sweep.txt).

Registered as torch.library custom ops (archirf_kernels::*) with fake and autograd implementations,
so torch.compile(fullgraph=True) traces through a model that uses them.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import checks
from .registry import definer, ints, launch, stand_ins, tracing

Tensor = torch.Tensor

MAX_BLOCK_C = 65536          # one row in registers; beyond this a row would have to be tiled


# ----------------------------------------------------------------------------------------------
# Kernels. Shapes on the right: R = ROWS (tokens of a tile), K = BLOCK_A or BLOCK_B (channels).

@triton.jit
def _modulate(n, shift, scale):
    # reference.modulate: adaLN (Peebles & Xie 2023, Sec. 3.2).
    return n * (1.0 + scale) + shift


@triton.jit
def _load(ptr, offs, mask):
    if mask is None:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


# Per-row values of a tile: (R,) vectors; with ROWS == 1, scalars. A row's two blocks have different
# register layouts (a 128-channel tail cannot be spread like a 1024-channel block), and combining
# their (R,) sums made the compiler shuffle whole tiles through shared memory to one layout; scalars
# have no layout, so one-row tiles need no shuffle at all.
@triton.jit
def _row_sum(v, ROWS: tl.constexpr):
    if ROWS == 1:
        return tl.sum(v, axis=None)                                                  # ()
    else:
        return tl.sum(v, axis=1)                                                     # (R,)


@triton.jit
def _col(v, ROWS: tl.constexpr):
    """A per-row value, broadcastable against a (R, K) tile."""
    if ROWS == 1:
        return v
    else:
        return v[:, None]


@triton.jit
def _load_stat(ptr, row0, n0, N, ROWS: tl.constexpr):
    if ROWS == 1:
        return tl.load(ptr + row0)
    else:
        r = tl.arange(0, ROWS)
        return tl.load(ptr + row0 + r, mask=n0 + r < N, other=0.0)


@triton.jit
def _store_stat(ptr, row0, n0, N, v, ROWS: tl.constexpr):
    if ROWS == 1:
        tl.store(ptr + row0, v)
    else:
        r = tl.arange(0, ROWS)
        tl.store(ptr + row0 + r, v, mask=n0 + r < N)


@triton.jit
def _residual_part(X_ptr, Y_ptr, Gate_ptr, XNew_ptr, x_rows, y_rows, gate_rows, out_rows, cols, mask, gate,
                   HAS_RESIDUAL: tl.constexpr, GATE_PER_TOKEN: tl.constexpr):
    """One block of a tile: x, or x_new = x + gate * y (stored, and returned as stored: the norm sees
    x_new rounded to x's dtype, as backward will)."""
    x = _load(X_ptr, x_rows[:, None] + cols[None, :], mask)                         # (R, K)
    if HAS_RESIDUAL:
        y = _load(Y_ptr, y_rows[:, None] + cols[None, :], mask)
        if GATE_PER_TOKEN:
            g = _load(Gate_ptr, gate_rows[:, None] + cols[None, :], mask)
        else:
            g = gate[None, :]
        x_new = (x + g * y).to(XNew_ptr.dtype.element_ty)
        tl.store(XNew_ptr + out_rows[:, None] + cols[None, :], x_new, mask=mask)
        x = x_new.to(tl.float32)
    return x


@triton.jit
def _modulate_part(H_ptr, Shift_ptr, Scale_ptr, shift_rows, scale_rows, out_rows, cols, mask,
                   xc, rstd, w, bias, shift, scale,
                   MOD_PER_TOKEN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ROWS: tl.constexpr):
    """One block of a tile: h = modulate(xc * rstd * w + bias, shift, scale), stored."""
    nrm = xc * _col(rstd, ROWS)                                                       # (R, K)
    if HAS_WEIGHT:
        nrm = nrm * w[None, :]
    if HAS_BIAS:
        nrm = nrm + bias[None, :]
    if MOD_PER_TOKEN:
        h = _modulate(nrm, _load(Shift_ptr, shift_rows[:, None] + cols[None, :], mask),
                      _load(Scale_ptr, scale_rows[:, None] + cols[None, :], mask))
    else:
        h = _modulate(nrm, shift[None, :], scale[None, :])
    tl.store(H_ptr + out_rows[:, None] + cols[None, :], h.to(H_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_row_blocks", "tiles_per_program"])  # loop bounds: one compile
def _ada_norm_fwd_kernel(
    X_ptr, Y_ptr, Gate_ptr, Shift_ptr, Scale_ptr, W_ptr, B_ptr,   # inputs (Y, Gate: HAS_RESIDUAL only)
    XNew_ptr, H_ptr, Mean_ptr, Rstd_ptr,                          # outputs; XNew, H contiguous (B*N, C)
    stride_xb, stride_xn, stride_yb, stride_yn,
    stride_gate_b, stride_gate_n, stride_shift_b, stride_shift_n, stride_scale_b, stride_scale_n,
    N, C, num_row_blocks, tiles_per_program, eps,
    HAS_RESIDUAL: tl.constexpr,     # x_new = x + gate * y first (the block-boundary fusion)
    GATE_PER_TOKEN: tl.constexpr,
    MOD_PER_TOKEN: tl.constexpr,    # shift and scale are (B, N, C); else one row per sample
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ROWS: tl.constexpr,             # tokens per tile
    BLOCK_A: tl.constexpr,          # main block: channels [0, BLOCK_A), all < C
    BLOCK_B: tl.constexpr,          # tail block: channels [BLOCK_A, BLOCK_A + BLOCK_B), masked
    HAS_TAIL: tl.constexpr,         # C > BLOCK_A (else the tail block is skipped)
    MASK_A: tl.constexpr,           # BLOCK_A > C: one padded block, no split (masked too)
    NUM_STAGES: tl.constexpr,       # software pipelining of the tile loop: loads of the next tiles in flight
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_first = (pid % num_row_blocks).to(tl.int64) * ROWS * tiles_per_program
    num_tiles = tl.minimum(tiles_per_program, tl.cdiv(N - n_first, ROWS))  # the last program may be short
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = None
    if MASK_A:
        mask_a = cols_a < C
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < C

    # -- per-sample conditioning and the affine: loaded once for all tiles of this program
    gate_a, gate_b, shift_a, shift_b, scale_a, scale_b = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0   # (absent: unused)
    w_a, w_b, bias_a, bias_b = 0.0, 0.0, 0.0, 0.0
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        gate_a = _load(Gate_ptr, b * stride_gate_b + cols_a, mask_a)
        gate_b = _load(Gate_ptr, b * stride_gate_b + cols_b, mask_b)
    if not MOD_PER_TOKEN:
        shift_a = _load(Shift_ptr, b * stride_shift_b + cols_a, mask_a)
        shift_b = _load(Shift_ptr, b * stride_shift_b + cols_b, mask_b)
        scale_a = _load(Scale_ptr, b * stride_scale_b + cols_a, mask_a)
        scale_b = _load(Scale_ptr, b * stride_scale_b + cols_b, mask_b)
    if HAS_WEIGHT:
        w_a, w_b = _load(W_ptr, cols_a, mask_a), _load(W_ptr, cols_b, mask_b)
    if HAS_BIAS:
        bias_a, bias_b = _load(B_ptr, cols_a, mask_a), _load(B_ptr, cols_b, mask_b)

    for t in tl.range(num_tiles, num_stages=NUM_STAGES):
        n0 = n_first + t * ROWS
        n = n0 + tl.arange(0, ROWS)                                                  # (R,) tokens
        if ROWS == 1:       # tiles are counted exactly: a one-row tile is always in range
            mask_b2 = mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a[None, :]
            else:
                mask_a2 = None
        else:
            row_mask = n < N
            mask_a2, mask_b2 = row_mask[:, None], row_mask[:, None] & mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a2 & mask_a[None, :]
        row = b * N + n
        x_rows, y_rows = b * stride_xb + n * stride_xn, b * stride_yb + n * stride_yn
        gate_rows = b * stride_gate_b + n * stride_gate_n
        # -- gated residual
        x_a = _residual_part(X_ptr, Y_ptr, Gate_ptr, XNew_ptr, x_rows, y_rows, gate_rows, row * C, cols_a,
                             mask_a2, gate_a, HAS_RESIDUAL, GATE_PER_TOKEN)
        if HAS_TAIL:
            x_b = _residual_part(X_ptr, Y_ptr, Gate_ptr, XNew_ptr, x_rows, y_rows, gate_rows, row * C, cols_b,
                                 mask_b2, gate_b, HAS_RESIDUAL, GATE_PER_TOKEN)
        # -- statistics of the rows (two-pass in registers: no cancellation in the variance)
        if IS_RMS:
            xc_a = x_a
            if HAS_TAIL:
                xc_b = x_b
        else:
            s = _row_sum(x_a, ROWS)
            if HAS_TAIL:
                s += _row_sum(x_b, ROWS)
            mean = s / C                                                             # (R,)
            xc_a = x_a - _col(mean, ROWS)
            if MASK_A:
                xc_a = tl.where(mask_a[None, :], xc_a, 0.0)
            if HAS_TAIL:
                xc_b = tl.where(mask_b[None, :], x_b - _col(mean, ROWS), 0.0)
            _store_stat(Mean_ptr, b * N + n0, n0, N, mean, ROWS)
        ss = _row_sum(xc_a * xc_a, ROWS)
        if HAS_TAIL:
            ss += _row_sum(xc_b * xc_b, ROWS)
        rstd = 1.0 / tl.sqrt(ss / C + eps)                                           # (R,)
        _store_stat(Rstd_ptr, b * N + n0, n0, N, rstd, ROWS)
        # -- normalise, affine, modulate
        shift_rows = b * stride_shift_b + n * stride_shift_n
        scale_rows = b * stride_scale_b + n * stride_scale_n
        _modulate_part(H_ptr, Shift_ptr, Scale_ptr, shift_rows, scale_rows, row * C, cols_a, mask_a2,
                       xc_a, rstd, w_a, bias_a, shift_a, scale_a, MOD_PER_TOKEN, HAS_WEIGHT, HAS_BIAS, ROWS)
        if HAS_TAIL:
            _modulate_part(H_ptr, Shift_ptr, Scale_ptr, shift_rows, scale_rows, row * C, cols_b, mask_b2,
                           xc_b, rstd, w_b, bias_b, shift_b, scale_b, MOD_PER_TOKEN, HAS_WEIGHT, HAS_BIAS, ROWS)


# Backward, per row (token). With xhat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm),
# n = xhat * w + b and h = n * (1 + scale) + shift, given dh = dL/dh:
#
#     dshift = dh                    dscale = dh * n              (per sample: summed over tokens)
#     dn     = dh * (1 + scale)
#     dbias  = sum_rows dn           dweight = sum_rows dn * xhat
#     dxhat  = dn * w
#     dx     = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(xhat * dxhat))     LayerNorm
#     dx     = rstd * (dxhat - xhat * mean_C(xhat * dxhat))                      RMSNorm
#
# For the fusion x_new = x + gate * y, h = ada_norm(x_new), the residual stream also sends
# dx_new_in into x_new, so with g = dx_new_in + dx (dx as above, taken at x_new):
#
#     dx = g      dy = g * gate      dgate = g * y   (per sample: summed over tokens)
#
# The row sums mean_C(.) need the whole row: it is in registers (both blocks). The sums over tokens
# are accumulated per program in fp32 and written once as a partial row (see the module docstring).
@triton.jit
def _norm_grad_part(x, dh, mean, rstd, col_mask, w, bias, scale, DShift_ptr, DScale_ptr, Scale_ptr,
                    scale_rows, out_rows, cols, mask, dshift_acc, dscale_acc, dw_acc, db_acc,
                    MOD_PER_TOKEN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IS_RMS: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr):
    """One block of a tile, up to the row sums: -> xhat, dxhat and the updated sums over tokens."""
    if IS_RMS:
        xhat = x * _col(rstd, ROWS)                                                  # (R, K)
    else:
        xhat = (x - _col(mean, ROWS)) * _col(rstd, ROWS)
        if MASKED:
            xhat = tl.where(col_mask[None, :], xhat, 0.0)
    nrm = xhat
    if HAS_WEIGHT:
        nrm = nrm * w[None, :]
    if HAS_BIAS:
        nrm = nrm + bias[None, :]
    # -- modulation: dshift = dh, dscale = dh * n
    if MOD_PER_TOKEN:
        sc = _load(Scale_ptr, scale_rows[:, None] + cols[None, :], mask)
        tl.store(DShift_ptr + out_rows[:, None] + cols[None, :], dh.to(DShift_ptr.dtype.element_ty), mask=mask)
        tl.store(DScale_ptr + out_rows[:, None] + cols[None, :], (dh * nrm).to(DScale_ptr.dtype.element_ty),
                 mask=mask)
    else:
        sc = scale[None, :]
        dshift_acc += tl.sum(dh, axis=0)                                             # (K,)
        dscale_acc += tl.sum(dh * nrm, axis=0)
    dn = dh * (1.0 + sc)
    # -- affine
    dxhat = dn
    if HAS_WEIGHT:
        dw_acc += tl.sum(dn * xhat, axis=0)
        dxhat = dn * w[None, :]
    if HAS_BIAS:
        db_acc += tl.sum(dn, axis=0)
    return xhat, dxhat, dshift_acc, dscale_acc, dw_acc, db_acc


@triton.jit
def _input_grad_part(xhat, dxhat, c1, c2, rstd, dx_new_in, y, gate, Gate_ptr, DX_ptr, DY_ptr, DGate_ptr,
                     gate_rows, out_rows, cols, mask, dgate_acc,
                     HAS_RESIDUAL: tl.constexpr, HAS_DXNEW: tl.constexpr, GATE_PER_TOKEN: tl.constexpr,
                     IS_RMS: tl.constexpr, ROWS: tl.constexpr):
    """One block of a tile, after the row sums: dx through the norm, then the gated residual's split."""
    if IS_RMS:
        dx = (dxhat - xhat * _col(c1, ROWS)) * _col(rstd, ROWS)                      # (R, K)
    else:
        dx = (dxhat - (xhat * _col(c1, ROWS) + _col(c2, ROWS))) * _col(rstd, ROWS)
    offs = out_rows[:, None] + cols[None, :]
    if HAS_RESIDUAL:
        if HAS_DXNEW:
            dx += dx_new_in
        if GATE_PER_TOKEN:
            g = _load(Gate_ptr, gate_rows[:, None] + cols[None, :], mask)
            tl.store(DGate_ptr + offs, (dx * y).to(DGate_ptr.dtype.element_ty), mask=mask)
        else:
            g = gate[None, :]
            dgate_acc += tl.sum(dx * y, axis=0)                                      # (K,)
        tl.store(DY_ptr + offs, (dx * g).to(DY_ptr.dtype.element_ty), mask=mask)
    tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    return dgate_acc


@triton.jit
def _store_partial(Part_ptr, part, cols_a, mask_a, cols_b, mask_b, acc_a, acc_b, HAS_TAIL: tl.constexpr):
    tl.store(Part_ptr + part + cols_a, acc_a, mask=mask_a)
    if HAS_TAIL:
        tl.store(Part_ptr + part + cols_b, acc_b, mask=mask_b)


@triton.jit(do_not_specialize=["num_row_blocks", "tiles_per_program"])  # loop bounds: one compile
def _ada_norm_bwd_kernel(
    DH_ptr, DXNewIn_ptr, X_ptr, Y_ptr, Gate_ptr, Scale_ptr, W_ptr, B_ptr, Mean_ptr, Rstd_ptr,
    DX_ptr, DY_ptr, DGate_ptr, DShift_ptr, DScale_ptr, DW_ptr, DB_ptr,
    stride_xb, stride_xn, stride_yb, stride_yn,
    stride_gate_b, stride_gate_n, stride_scale_b, stride_scale_n,
    N, C, num_row_blocks, tiles_per_program,
    HAS_RESIDUAL: tl.constexpr,     # X is x_new; also produce dy, dgate
    HAS_DXNEW: tl.constexpr,        # a gradient flows into x_new from the residual stream
    GATE_PER_TOKEN: tl.constexpr,   # else DGate holds per-program partial sums
    MOD_PER_TOKEN: tl.constexpr,    # else DShift, DScale hold per-program partial sums
    HAS_WEIGHT: tl.constexpr,       # DW holds per-program partial sums
    HAS_BIAS: tl.constexpr,         # DB holds per-program partial sums
    IS_RMS: tl.constexpr,
    ROWS: tl.constexpr,             # tokens per tile
    BLOCK_A: tl.constexpr,          # main block of channels (unmasked)
    BLOCK_B: tl.constexpr,          # tail block of channels (masked)
    HAS_TAIL: tl.constexpr,         # C > BLOCK_A
    MASK_A: tl.constexpr,           # BLOCK_A > C
    EARLY_LOADS: tl.constexpr,      # load dx_new_in and y with x and dh (else after the row sums)
    NUM_STAGES: tl.constexpr,       # software pipelining of the tile loop
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_first = (pid % num_row_blocks).to(tl.int64) * ROWS * tiles_per_program
    num_tiles = tl.minimum(tiles_per_program, tl.cdiv(N - n_first, ROWS))
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = None
    if MASK_A:
        mask_a = cols_a < C
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < C

    # -- per-sample conditioning, affine, and fp32 accumulators of the sums over this program's rows
    gate_a, gate_b, scale_a, scale_b = 0.0, 0.0, 0.0, 0.0   # (absent: unused)
    w_a, w_b, bias_a, bias_b = 0.0, 0.0, 0.0, 0.0
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        gate_a = _load(Gate_ptr, b * stride_gate_b + cols_a, mask_a)
        gate_b = _load(Gate_ptr, b * stride_gate_b + cols_b, mask_b)
    if not MOD_PER_TOKEN:
        scale_a = _load(Scale_ptr, b * stride_scale_b + cols_a, mask_a)
        scale_b = _load(Scale_ptr, b * stride_scale_b + cols_b, mask_b)
    if HAS_WEIGHT:
        w_a, w_b = _load(W_ptr, cols_a, mask_a), _load(W_ptr, cols_b, mask_b)
    if HAS_BIAS:
        bias_a, bias_b = _load(B_ptr, cols_a, mask_a), _load(B_ptr, cols_b, mask_b)
    # (unused accumulators are never stored; the compiler drops them)
    dgate_a, dgate_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)
    dshift_a, dshift_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)
    dscale_a, dscale_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)
    dw_a, dw_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)
    db_a, db_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)

    for t in tl.range(num_tiles, num_stages=NUM_STAGES):
        n0 = n_first + t * ROWS
        n = n0 + tl.arange(0, ROWS)                                                  # (R,) tokens
        if ROWS == 1:       # tiles are counted exactly: a one-row tile is always in range
            mask_b2 = mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a[None, :]
            else:
                mask_a2 = None
        else:
            row_mask = n < N
            mask_a2, mask_b2 = row_mask[:, None], row_mask[:, None] & mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a2 & mask_a[None, :]
        out_rows = (b * N + n) * C
        x_rows, y_rows = b * stride_xb + n * stride_xn, b * stride_yb + n * stride_yn
        gate_rows = b * stride_gate_b + n * stride_gate_n
        scale_rows = b * stride_scale_b + n * stride_scale_n
        # -- EARLY_LOADS: every activation of the tile is loaded up front, all four streams in flight
        # together (more registers); else dx_new_in and y only after the row sums
        x_a = _load(X_ptr, x_rows[:, None] + cols_a[None, :], mask_a2)
        dh_a = _load(DH_ptr, out_rows[:, None] + cols_a[None, :], mask_a2)
        if HAS_TAIL:
            x_b = _load(X_ptr, x_rows[:, None] + cols_b[None, :], mask_b2)
            dh_b = _load(DH_ptr, out_rows[:, None] + cols_b[None, :], mask_b2)
        dxn_a, dxn_b, y_a, y_b = 0.0, 0.0, 0.0, 0.0
        if HAS_RESIDUAL and EARLY_LOADS:
            if HAS_DXNEW:
                dxn_a = _load(DXNewIn_ptr, out_rows[:, None] + cols_a[None, :], mask_a2)
                if HAS_TAIL:
                    dxn_b = _load(DXNewIn_ptr, out_rows[:, None] + cols_b[None, :], mask_b2)
            y_a = _load(Y_ptr, y_rows[:, None] + cols_a[None, :], mask_a2)
            if HAS_TAIL:
                y_b = _load(Y_ptr, y_rows[:, None] + cols_b[None, :], mask_b2)
        rstd = _load_stat(Rstd_ptr, b * N + n0, n0, N, ROWS)                         # (R,)
        mean = 0.0
        if not IS_RMS:
            mean = _load_stat(Mean_ptr, b * N + n0, n0, N, ROWS)
        # -- normalised rows recomputed from the saved statistics; modulation and affine gradients
        xhat_a, dxhat_a, dshift_a, dscale_a, dw_a, db_a = _norm_grad_part(
            x_a, dh_a, mean, rstd, mask_a, w_a, bias_a, scale_a, DShift_ptr, DScale_ptr, Scale_ptr,
            scale_rows, out_rows, cols_a, mask_a2, dshift_a, dscale_a, dw_a, db_a,
            MOD_PER_TOKEN, HAS_WEIGHT, HAS_BIAS, IS_RMS, MASK_A, ROWS)
        c1 = _row_sum(xhat_a * dxhat_a, ROWS)                                        # (R,)
        c2 = _row_sum(dxhat_a, ROWS)
        if HAS_TAIL:
            xhat_b, dxhat_b, dshift_b, dscale_b, dw_b, db_b = _norm_grad_part(
                x_b, dh_b, mean, rstd, mask_b, w_b, bias_b, scale_b, DShift_ptr, DScale_ptr, Scale_ptr,
                scale_rows, out_rows, cols_b, mask_b2, dshift_b, dscale_b, dw_b, db_b,
                MOD_PER_TOKEN, HAS_WEIGHT, HAS_BIAS, IS_RMS, True, ROWS)
            c1 += _row_sum(xhat_b * dxhat_b, ROWS)
            c2 += _row_sum(dxhat_b, ROWS)
        c1, c2 = c1 / C, c2 / C
        if HAS_RESIDUAL and not EARLY_LOADS:
            if HAS_DXNEW:
                dxn_a = _load(DXNewIn_ptr, out_rows[:, None] + cols_a[None, :], mask_a2)
                if HAS_TAIL:
                    dxn_b = _load(DXNewIn_ptr, out_rows[:, None] + cols_b[None, :], mask_b2)
            y_a = _load(Y_ptr, y_rows[:, None] + cols_a[None, :], mask_a2)
            if HAS_TAIL:
                y_b = _load(Y_ptr, y_rows[:, None] + cols_b[None, :], mask_b2)
        # -- through the norm, then the gated residual
        dgate_a = _input_grad_part(xhat_a, dxhat_a, c1, c2, rstd, dxn_a, y_a, gate_a, Gate_ptr, DX_ptr, DY_ptr,
                                   DGate_ptr, gate_rows, out_rows, cols_a, mask_a2, dgate_a,
                                   HAS_RESIDUAL, HAS_DXNEW, GATE_PER_TOKEN, IS_RMS, ROWS)
        if HAS_TAIL:
            dgate_b = _input_grad_part(xhat_b, dxhat_b, c1, c2, rstd, dxn_b, y_b, gate_b, Gate_ptr, DX_ptr,
                                       DY_ptr, DGate_ptr, gate_rows, out_rows, cols_b, mask_b2, dgate_b,
                                       HAS_RESIDUAL, HAS_DXNEW, GATE_PER_TOKEN, IS_RMS, ROWS)

    # -- one partial row per program for every sum over tokens
    part = pid.to(tl.int64) * C
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        _store_partial(DGate_ptr, part, cols_a, mask_a, cols_b, mask_b, dgate_a, dgate_b, HAS_TAIL)
    if not MOD_PER_TOKEN:
        _store_partial(DShift_ptr, part, cols_a, mask_a, cols_b, mask_b, dshift_a, dshift_b, HAS_TAIL)
        _store_partial(DScale_ptr, part, cols_a, mask_a, cols_b, mask_b, dscale_a, dscale_b, HAS_TAIL)
    if HAS_WEIGHT:
        _store_partial(DW_ptr, part, cols_a, mask_a, cols_b, mask_b, dw_a, dw_b, HAS_TAIL)
    if HAS_BIAS:
        _store_partial(DB_ptr, part, cols_a, mask_a, cols_b, mask_b, db_a, db_b, HAS_TAIL)


@triton.jit(do_not_specialize=["num_row_blocks", "tiles_per_program"])  # loop bounds: one compile
def _gated_residual_fwd_kernel(
    X_ptr, Y_ptr, Gate_ptr, Out_ptr,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_gate_b, stride_gate_n,
    N, C, num_row_blocks, tiles_per_program,
    GATE_PER_TOKEN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HAS_TAIL: tl.constexpr,
    MASK_A: tl.constexpr, NUM_STAGES: tl.constexpr,                                           # as _ada_norm_fwd_kernel's
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_first = (pid % num_row_blocks).to(tl.int64) * ROWS * tiles_per_program
    num_tiles = tl.minimum(tiles_per_program, tl.cdiv(N - n_first, ROWS))
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = None
    if MASK_A:
        mask_a = cols_a < C
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < C
    gate_a, gate_b = 0.0, 0.0
    if not GATE_PER_TOKEN:
        gate_a = _load(Gate_ptr, b * stride_gate_b + cols_a, mask_a)
        gate_b = _load(Gate_ptr, b * stride_gate_b + cols_b, mask_b)
    for t in tl.range(num_tiles, num_stages=NUM_STAGES):
        n0 = n_first + t * ROWS
        n = n0 + tl.arange(0, ROWS)
        if ROWS == 1:       # tiles are counted exactly: a one-row tile is always in range
            mask_b2 = mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a[None, :]
            else:
                mask_a2 = None
        else:
            row_mask = n < N
            mask_a2, mask_b2 = row_mask[:, None], row_mask[:, None] & mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a2 & mask_a[None, :]
        x_rows, y_rows = b * stride_xb + n * stride_xn, b * stride_yb + n * stride_yn
        gate_rows, out_rows = b * stride_gate_b + n * stride_gate_n, (b * N + n) * C
        _residual_part(X_ptr, Y_ptr, Gate_ptr, Out_ptr, x_rows, y_rows, gate_rows, out_rows, cols_a,
                       mask_a2, gate_a, True, GATE_PER_TOKEN)
        if HAS_TAIL:
            _residual_part(X_ptr, Y_ptr, Gate_ptr, Out_ptr, x_rows, y_rows, gate_rows, out_rows, cols_b,
                           mask_b2, gate_b, True, GATE_PER_TOKEN)


@triton.jit
def _gated_residual_grad_part(DOut_ptr, Y_ptr, Gate_ptr, DY_ptr, DGate_ptr, y_rows, gate_rows, out_rows,
                              cols, mask, gate, dgate_acc, GATE_PER_TOKEN: tl.constexpr):
    offs = out_rows[:, None] + cols[None, :]
    dout = _load(DOut_ptr, offs, mask)                                               # (R, K)
    y = _load(Y_ptr, y_rows[:, None] + cols[None, :], mask)
    if GATE_PER_TOKEN:
        g = _load(Gate_ptr, gate_rows[:, None] + cols[None, :], mask)
        tl.store(DGate_ptr + offs, (dout * y).to(DGate_ptr.dtype.element_ty), mask=mask)
    else:
        g = gate[None, :]
        dgate_acc += tl.sum(dout * y, axis=0)
    tl.store(DY_ptr + offs, (dout * g).to(DY_ptr.dtype.element_ty), mask=mask)
    return dgate_acc


# Backward of x_new = x + gate * y: dx = dout (no kernel), dy = dout * gate, dgate = dout * y
# (per sample: summed over tokens, as partial rows like _ada_norm_bwd_kernel's).
@triton.jit(do_not_specialize=["num_row_blocks", "tiles_per_program"])  # loop bounds: one compile
def _gated_residual_bwd_kernel(
    DOut_ptr, Y_ptr, Gate_ptr, DY_ptr, DGate_ptr,
    stride_yb, stride_yn, stride_gate_b, stride_gate_n,
    N, C, num_row_blocks, tiles_per_program,
    GATE_PER_TOKEN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HAS_TAIL: tl.constexpr,
    MASK_A: tl.constexpr, NUM_STAGES: tl.constexpr,                                           # as _ada_norm_fwd_kernel's
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_first = (pid % num_row_blocks).to(tl.int64) * ROWS * tiles_per_program
    num_tiles = tl.minimum(tiles_per_program, tl.cdiv(N - n_first, ROWS))
    cols_a = tl.arange(0, BLOCK_A)
    mask_a = None
    if MASK_A:
        mask_a = cols_a < C
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < C
    gate_a, gate_b = 0.0, 0.0
    if not GATE_PER_TOKEN:
        gate_a = _load(Gate_ptr, b * stride_gate_b + cols_a, mask_a)
        gate_b = _load(Gate_ptr, b * stride_gate_b + cols_b, mask_b)
    dgate_a, dgate_b = tl.zeros([BLOCK_A], dtype=tl.float32), tl.zeros([BLOCK_B], dtype=tl.float32)
    for t in tl.range(num_tiles, num_stages=NUM_STAGES):
        n0 = n_first + t * ROWS
        n = n0 + tl.arange(0, ROWS)
        if ROWS == 1:       # tiles are counted exactly: a one-row tile is always in range
            mask_b2 = mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a[None, :]
            else:
                mask_a2 = None
        else:
            row_mask = n < N
            mask_a2, mask_b2 = row_mask[:, None], row_mask[:, None] & mask_b[None, :]
            if MASK_A:
                mask_a2 = mask_a2 & mask_a[None, :]
        y_rows, gate_rows = b * stride_yb + n * stride_yn, b * stride_gate_b + n * stride_gate_n
        out_rows = (b * N + n) * C
        dgate_a = _gated_residual_grad_part(DOut_ptr, Y_ptr, Gate_ptr, DY_ptr, DGate_ptr, y_rows, gate_rows,
                                            out_rows, cols_a, mask_a2, gate_a, dgate_a, GATE_PER_TOKEN)
        if HAS_TAIL:
            dgate_b = _gated_residual_grad_part(DOut_ptr, Y_ptr, Gate_ptr, DY_ptr, DGate_ptr, y_rows, gate_rows,
                                                out_rows, cols_b, mask_b2, gate_b, dgate_b, GATE_PER_TOKEN)
    if not GATE_PER_TOKEN:
        _store_partial(DGate_ptr, pid.to(tl.int64) * C, cols_a, mask_a, cols_b, mask_b, dgate_a, dgate_b, HAS_TAIL)


@triton.jit
def _sum_partials_kernel(
    Part_ptr, Out0_ptr, Out1_ptr, Out2_ptr,      # partials (K, G * P, C) fp32 -> K sums (G, C), own dtypes
    P, C, stride_k,
    K: tl.constexpr,                             # 1 to 3 sums
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Finishes the sums over tokens: out_k[g, c] = sum_p part[k, g * P + p, c], in a fixed order."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    for k in tl.static_range(K):
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = k * stride_k + (g * P + p)[:, None] * C + cols[None, :]
            acc += tl.load(Part_ptr + offs, mask=(p < P)[:, None] & col_mask[None, :], other=0.0)
        total = tl.sum(acc, axis=0)
        if k == 0:
            tl.store(Out0_ptr + g * C + cols, total.to(Out0_ptr.dtype.element_ty), mask=col_mask)
        elif k == 1:
            tl.store(Out1_ptr + g * C + cols, total.to(Out1_ptr.dtype.element_ty), mask=col_mask)
        else:
            tl.store(Out2_ptr + g * C + cols, total.to(Out2_ptr.dtype.element_ty), mask=col_mask)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated
# them): then they run on CPU tensors; otherwise they need CUDA tensors.
INTERPRETED = type(_ada_norm_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# Checks, layouts, heuristics.

def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers hand to a kernel (tests patch this to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


EARLY_LOADS = True  # fusion backward: load all four activations of a tile before its row sums


def _blocks(C: int, split: bool = True) -> tuple[int, int, bool, bool]:
    """C channels -> (BLOCK_A, BLOCK_B, HAS_TAIL, MASK_A). Split: the largest power of 2 <= C, never
    masked, and the next power of 2 >= the rest (masked; 1 and unused when C is a power of 2). Not split:
    one block of next_pow2(C) channels, masked."""
    if C < 1:
        raise ValueError("archirf_kernels adaLN: the norm needs C >= 1 channels")
    if C > MAX_BLOCK_C:
        raise ValueError(f"archirf_kernels adaLN: C={C} channels exceed the fused row limit "
                         f"{MAX_BLOCK_C}; use impl='reference'")
    if not split:
        block_a = triton.next_power_of_2(C)
        return block_a, 1, False, block_a > C
    block_a = 1 << (C.bit_length() - 1)
    return block_a, triton.next_power_of_2(max(C - block_a, 1)), C > block_a, False


def _pow2_floor(n: float) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


class Launch(NamedTuple):
    split: bool             # a row as main + tail blocks (else one padded block)
    rows: int               # ROWS: tokens per tile
    num_warps: int
    num_stages: int         # tile-loop pipelining depth (1: none)
    waves: float = 1.0      # programs = waves x (programs resident per SM) x SMs; 0: one tile per program
    tiles: int = 0          # tiles per program, if set (overrides waves)


# Launch shape per kernel kind. A tile of ROWS tokens holds ~TILE_ELEMENTS elements (at DiT widths:
# one row), spread over num_warps = tile / ELEMENTS_PER_THREAD / 32, and the tile loop is pipelined
# NUM_STAGES deep (the next tiles' loads go to shared memory while this one computes). A kind runs
# WAVES x (programs one SM holds at once, from the compiled kernel's registers and shared memory) x
# SMs programs, each looping over tiles of one sample: backward half a wave (few fp32 partial rows,
# no half-empty last wave), forward several. Set from the H100 sweep, benchmarks/sweep_adaln_launch.py
# (results/<gpu>/adaln_launch_sweep.txt); any C works, these only set the speed.
#                 kind            SPLIT  TILE_ELEMENTS  ELEMENTS_PER_THREAD  NUM_STAGES  WAVES
LAUNCH = {
    "ada_fwd":      (True,  1024,          16,                  3,          8),       # ada_layer_norm
    "ada_bwd":      (True,  1024,          16,                  3,          0.5),
    "fused_fwd":    (True,  1024,          16,                  3,          8),       # the block-boundary fusion
    "fused_bwd":    (True,  1024,          16,                  3,          0.5),
    "residual_fwd": (True,  8192,          32,                  3,          8),       # gated_residual
    "residual_bwd": (True,  8192,          32,                  3,          0.5),
}


def _launch_config(kind: str, B: int, N: int, C: int, device: torch.device) -> Launch:
    if device.type != "cuda":       # the interpreter: small tiles, several per program, so tests cover the loop
        return Launch(True, 2, 1, 1, tiles=2)
    preferred, tile_elements, per_thread, num_stages, waves = LAUNCH[kind]
    for split in (preferred, False):
        block_a, block_b, tail, _ = _blocks(C, split)
        width = block_a + (block_b if tail else 0)
        rows = min(_pow2_floor(tile_elements / width), triton.next_power_of_2(max(N, 1)))
        # Several rows with a tail: the (R,) row sums of the two blocks come in different register
        # layouts, and reconciling them costs a shared-memory shuffle of the whole tile: pad instead.
        if rows == 1 or not tail or kind.startswith("residual"):
            break
    num_warps = min(max(_pow2_floor(rows * width / per_thread / 32), 1), 16)
    return Launch(split, rows, num_warps, num_stages, waves)


_RESIDENT: dict[tuple, int] = {}


def _resident_programs(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """Programs of this compiled kernel one SM holds at once: its registers, shared memory and warps
    (compiled, or found in Triton's cache, once per variant)."""
    key = (kernel.fn.__name__, tuple(meta.items()), device.index,
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    if key not in _RESIDENT:
        warps = meta["num_warps"]
        try:
            compiled = kernel.warmup(*(stand_ins(args) if tracing() else args), grid=(1,), **meta)
            compiled._init_handles()
            n_regs, shared = compiled.n_regs, compiled.metadata.shared
        except Exception as e:  # noqa: BLE001  (a Triton without these internals: assume one program per SM)
            warnings.warn(f"archirf_kernels adaLN: cannot read the compiled kernel's resources ({e!r}); "
                          "launching for one resident program per SM", stacklevel=3)
            n_regs, shared = 65536 // (32 * warps), 0
        props = torch.cuda.get_device_properties(device)
        regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256                    # allocated per warp in 256s
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // warps
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
        smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
        by_smem = smem // (shared + 1024)                                        # 1 KB reserved per block
        _RESIDENT[key] = max(1, min(by_regs, by_threads, by_smem, 32))
    return _RESIDENT[key]


def _plan(kernel, kind: str, B: int, N: int, C: int, device: torch.device, args: tuple, flags: dict):
    """-> (num_row_blocks, tiles per program, launch kwargs) for a kernel that walks (B, N) in tiles of
    whole rows. `args`: the kernel's arguments (partial-sum buffers may be stand-ins of their dtype)."""
    launch = _launch_config(kind, B, N, C, device)
    block_a, block_b, tail, mask_a = _blocks(C, launch.split)
    meta = {**flags, "ROWS": launch.rows, "BLOCK_A": block_a, "BLOCK_B": block_b, "HAS_TAIL": tail,
            "MASK_A": mask_a, "NUM_STAGES": launch.num_stages, "num_warps": launch.num_warps}
    row_tiles = triton.cdiv(N, launch.rows)
    if launch.tiles:
        tiles = launch.tiles
    elif launch.waves == 0:
        tiles = 1
    else:
        programs = launch.waves * _resident_programs(kernel, args, meta, device) * \
            torch.cuda.get_device_properties(device).multi_processor_count
        blocks_per_sample = max(int(programs // max(B, 1)), 1)                   # each within one sample
        tiles = triton.cdiv(row_tiles, blocks_per_sample)
    tiles = max(1, min(tiles, row_tiles))
    return triton.cdiv(N, launch.rows * tiles), tiles, meta


def _rows(t: Tensor) -> Tensor:
    """Unit stride along C (the kernels' only layout requirement); other strides are passed on."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"archirf_kernels adaLN: the Triton kernels need CUDA tensors, got {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter, "
                         "or use impl='reference')")


def _check_ada_norm(x, shift, scale, weight, bias, norm) -> None:
    checks.ada_layer_norm(x, shift, scale, weight, bias, norm)
    _blocks(x.shape[-1])


def _strides(t: Tensor | None, N: int) -> tuple[int, int]:
    """(stride over B, stride over N) of a (B, N, C) tensor, or of a per-sample one broadcast over N."""
    if t is None:
        return 0, 0
    if t.dim() == 2:
        return int(t.stride(0)), 0
    return int(t.stride(0)), (int(t.stride(1)) if t.shape[1] == N and N > 1 else 0)


def _per_token(t: Tensor, N: int) -> bool:
    return t.dim() == 3 and t.shape[1] == N and N > 1


def _stats_shapes(x: Tensor, norm: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    B, N, _ = x.shape
    return ((B, N) if norm == "layer" else (0,)), (B, N)




# ----------------------------------------------------------------------------------------------
# Launchers. They return fresh contiguous outputs; (B, N, C) inputs may be strided views (e.g.
# a slice of the token axis, a chunk of the modulation vector) as long as C has unit stride.

def _ada_norm_forward(x, y, gate, shift, scale, weight, bias, eps, norm):
    """Forward of ada_layer_norm (y = gate = None) or of the fusion -> (x_new or None, h, mean, rstd)."""
    B, N, C = ints(*x.shape)
    _check_device(x)
    x, shift, scale = _rows(x), _rows(shift), _rows(scale)
    weight, bias = (_rows(t) if t is not None else None for t in (weight, bias))
    residual = y is not None
    if residual:
        y, gate = _rows(y), _rows(gate)
    x_new = _alloc((B, N, C), x.dtype, x.device) if residual else None
    h = _alloc((B, N, C), x.dtype, x.device)
    mean_shape, rstd_shape = _stats_shapes(x, norm)
    mean = _alloc(mean_shape, torch.float32, x.device)
    rstd = _alloc(rstd_shape, torch.float32, x.device)
    if B * N == 0:
        return x_new, h, mean, rstd

    def args(num_row_blocks, tiles):
        return (x, y if residual else x, gate if residual else x, shift, scale,
                weight if weight is not None else x, bias if bias is not None else x,
                x_new if residual else h, h, mean if norm == "layer" else rstd, rstd,
                *_strides(x, N), *_strides(y, N), *_strides(gate, N), *_strides(shift, N), *_strides(scale, N),
                N, C, num_row_blocks, tiles, eps)

    flags = {"HAS_RESIDUAL": residual, "GATE_PER_TOKEN": residual and _per_token(gate, N),
             "MOD_PER_TOKEN": _per_token(shift, N), "HAS_WEIGHT": weight is not None,
             "HAS_BIAS": bias is not None, "IS_RMS": norm == "rms"}
    num_row_blocks, tiles, meta = _plan(_ada_norm_fwd_kernel, "fused_fwd" if residual else "ada_fwd",
                                        B, N, C, x.device, args(2, 2), flags)
    launch(_ada_norm_fwd_kernel, INTERPRETED)[(B * num_row_blocks,)](*args(num_row_blocks, tiles), **meta)
    return x_new, h, mean, rstd


def _or(*candidates):
    """The first that is not None."""
    return next(t for t in candidates if t is not None)


def _sum_partials(partials: Tensor, outs: list, groups: int) -> list[Tensor]:
    """(K, groups * P, C) fp32 partial rows -> K sums over the P partials of each group, the k-th
    written as outs[k] = (dtype, shape) (a view of (groups, C)). One launch, fixed order."""
    K, total, C = ints(*partials.shape)
    sums = [_alloc((groups, C), dtype, partials.device) for dtype, _ in outs]
    if K and groups * C:
        P = total // groups
        block_c = min(256, triton.next_power_of_2(C))
        block_p = min(16, triton.next_power_of_2(max(P, 1)))
        launch(_sum_partials_kernel, INTERPRETED)[(groups, triton.cdiv(C, block_c))](
            partials, *(sums + sums[:1] * (3 - K)), P, C, total * C, K=K, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4)
    return [s.view(shape) for s, (_, shape) in zip(sums, outs)]


def _ada_norm_backward(dx_new_in, dh, x, y, gate, scale, weight, bias, mean, rstd, norm, shift_dtype):
    """Backward of ada_layer_norm (y = gate = None; x is its input) or of the fusion (x is x_new)
    -> (dx, dy, dgate, dshift, dscale, dweight, dbias); absent inputs get None."""
    B, N, C = ints(*x.shape)
    _check_device(x)
    residual = y is not None
    dh = dh.contiguous()
    x, scale = _rows(x), _rows(scale)
    weight, bias = (_rows(t) if t is not None else None for t in (weight, bias))
    if residual:
        y, gate = _rows(y), _rows(gate)
        dx_new_in = dx_new_in.contiguous() if dx_new_in is not None else None
    gate_per_token = residual and _per_token(gate, N)
    mod_per_token = _per_token(scale, N)
    dx = _alloc((B, N, C), x.dtype, x.device)
    dy = _alloc((B, N, C), y.dtype, x.device) if residual else None
    dgate = _alloc((B, N, C), gate.dtype, x.device) if gate_per_token else None
    dshift = dscale = None
    if mod_per_token:
        dshift, dscale = _alloc((B, N, C), shift_dtype, x.device), _alloc((B, N, C), scale.dtype, x.device)

    def args(num_row_blocks, tiles, partial=None):
        """partial: stand-in for every partial-sum buffer (only to look up the compiled kernel)."""
        return (dh, dx_new_in if dx_new_in is not None else dh, x, y if residual else x,
                gate if residual else x, scale,
                weight if weight is not None else x, bias if bias is not None else x,
                mean if norm == "layer" else rstd, rstd,
                dx, dy if residual else dx, _or(dgate, partial, dx), _or(dshift, partial), _or(dscale, partial),
                _or(dweight, partial, dx), _or(dbias, partial, dx),
                *_strides(x, N), *_strides(y, N), *_strides(gate, N), *_strides(scale, N),
                N, C, num_row_blocks, tiles)

    flags = {"HAS_RESIDUAL": residual, "HAS_DXNEW": residual and dx_new_in is not None,
             "GATE_PER_TOKEN": gate_per_token, "MOD_PER_TOKEN": mod_per_token, "HAS_WEIGHT": weight is not None,
             "HAS_BIAS": bias is not None, "IS_RMS": norm == "rms", "EARLY_LOADS": EARLY_LOADS}
    dweight = dbias = None
    num_row_blocks, tiles, meta = _plan(
        _ada_norm_bwd_kernel, "fused_bwd" if residual else "ada_bwd", B, N, C, x.device,
        args(2, 2, partial=torch.empty(4, dtype=torch.float32, device=x.device)), flags)
    num_programs = B * num_row_blocks

    # sums over tokens: per sample (dgate, dshift, dscale) and over everything (dweight, dbias), each
    # first as one fp32 partial row per program
    per_sample = ([(gate.dtype, gate.shape)] if residual and not gate_per_token else []) + (
        [(shift_dtype, scale.shape), (scale.dtype, scale.shape)] if not mod_per_token else [])
    overall = [(t.dtype, t.shape) for t in (weight, bias) if t is not None]
    part_sample = _alloc((len(per_sample), num_programs, C), torch.float32, x.device)
    part_overall = _alloc((len(overall), num_programs, C), torch.float32, x.device)
    slots = iter(part_sample)
    if residual and not gate_per_token:
        dgate = next(slots)
    if not mod_per_token:
        dshift, dscale = next(slots), next(slots)
    slots = iter(part_overall)
    dweight = next(slots) if weight is not None else None
    dbias = next(slots) if bias is not None else None
    if num_programs:
        launch(_ada_norm_bwd_kernel, INTERPRETED)[(num_programs,)](*args(num_row_blocks, tiles), **meta)
    # (with no tokens, no partials: the sums come out zero)
    sums = iter(_sum_partials(part_sample, per_sample, B))
    if residual and not gate_per_token:
        dgate = next(sums)
    if not mod_per_token:
        dshift, dscale = next(sums), next(sums)
    sums = iter(_sum_partials(part_overall, overall, 1))
    dweight = next(sums) if weight is not None else None
    dbias = next(sums) if bias is not None else None
    return dx, dy, dgate, dshift, dscale, dweight, dbias


def _gated_residual_forward(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    B, N, C = ints(*x.shape)
    _check_device(x)
    x, y, gate = _rows(x), _rows(y), _rows(gate)
    out = _alloc((B, N, C), x.dtype, x.device)
    if x.numel() == 0:
        return out
    def args(num_row_blocks, tiles):
        return (x, y, gate, out, *_strides(x, N), *_strides(y, N), *_strides(gate, N), N, C, num_row_blocks, tiles)

    num_row_blocks, tiles, meta = _plan(_gated_residual_fwd_kernel, "residual_fwd", B, N, C, x.device, args(2, 2),
                                        {"GATE_PER_TOKEN": _per_token(gate, N)})
    launch(_gated_residual_fwd_kernel, INTERPRETED)[(B * num_row_blocks,)](*args(num_row_blocks, tiles), **meta)
    return out


def _gated_residual_backward(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dy, dgate); dx is dout itself."""
    B, N, C = ints(*y.shape)
    _check_device(y)
    dout, y, gate = dout.contiguous(), _rows(y), _rows(gate)
    gate_per_token = _per_token(gate, N)
    dy = _alloc((B, N, C), y.dtype, y.device)
    if C == 0:
        return dy, _alloc(gate.shape, gate.dtype, y.device)
    def args(num_row_blocks, tiles, dgate):
        return (dout, y, gate, dy, dgate, *_strides(y, N), *_strides(gate, N), N, C, num_row_blocks, tiles)

    dgate = _alloc((B, N, C), gate.dtype, y.device) if gate_per_token else None
    num_row_blocks, tiles, meta = _plan(
        _gated_residual_bwd_kernel, "residual_bwd", B, N, C, y.device,
        args(2, 2, dgate if gate_per_token else torch.empty(4, dtype=torch.float32, device=y.device)),
        {"GATE_PER_TOKEN": gate_per_token})
    num_programs = B * num_row_blocks
    partials = None
    if not gate_per_token:
        partials = _alloc((1, num_programs, C), torch.float32, y.device)
        dgate = partials[0]
    if num_programs:
        launch(_gated_residual_bwd_kernel, INTERPRETED)[(num_programs,)](
            *args(num_row_blocks, tiles, dgate), **meta)
    if not gate_per_token:
        (dgate,) = _sum_partials(partials, [(gate.dtype, gate.shape)], B)
    return dy, dgate


# ----------------------------------------------------------------------------------------------
# Ops (kernels/registry.py): forward and backward are separate torch.library ops that autograd
# connects; on a GPU they are triton_ops that torch.compile traces into, in the interpreter opaque
# custom ops. mean/rstd are outputs so that setup_context can save them; absent gradients come back
# from the backward ops as empty tensors (ops return no None), and the autograd functions turn them
# into None.

_define = definer(INTERPRETED, globals())      # registry.define with this module's flag and kernels
_EMPTY = (0,)


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_EMPTY)


def _ada_layer_norm_fake(x, shift, scale, weight, bias, eps, norm):
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    mean_shape, rstd_shape = _stats_shapes(x, norm)
    return (x.new_empty(x.shape), x.new_empty(mean_shape, dtype=torch.float32),
            x.new_empty(rstd_shape, dtype=torch.float32))


@_define("ada_layer_norm", fake=_ada_layer_norm_fake)
def _ada_layer_norm_op(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    _, h, mean, rstd = _ada_norm_forward(x, None, None, shift, scale, weight, bias, eps, norm)
    return h, mean, rstd


def _ada_layer_norm_backward_fake(dh, x, scale, weight, bias, mean, rstd, norm, shift_dtype):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty(_EMPTY),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(_EMPTY))


@_define("ada_layer_norm_backward", fake=_ada_layer_norm_backward_fake)
def _ada_layer_norm_backward_op(dh: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None,
                                bias: Tensor | None, mean: Tensor, rstd: Tensor, norm: str,
                                shift_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale, dweight, dbias = _ada_norm_backward(
        None, dh, x, None, None, scale, weight, bias, mean, rstd, norm, shift_dtype)
    return dx, dshift, dscale, _empty_if_none(dweight, x), _empty_if_none(dbias, x)


def _ada_layer_norm_setup_context(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, norm = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
    ctx.norm, ctx.shift_dtype = norm, shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _ada_layer_norm_backward(ctx, dh, _dmean, _drstd):
    if dh is None:
        return (None,) * 7
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = torch.ops.archirf_kernels.ada_layer_norm_backward(
        dh, x, scale, weight, bias, mean, rstd, ctx.norm, ctx.shift_dtype)
    return (dx, dshift, dscale, dweight if weight is not None else None,
            dbias if bias is not None else None, None, None)


_ada_layer_norm_op.register_autograd(_ada_layer_norm_backward, setup_context=_ada_layer_norm_setup_context)


def _gated_residual_fake(x, y, gate):
    checks.gated_residual(x, y, gate)
    return x.new_empty(x.shape)


@_define("gated_residual", fake=_gated_residual_fake)
def _gated_residual_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    checks.gated_residual(x, y, gate)
    return _gated_residual_forward(x, y, gate)


def _gated_residual_backward_fake(dout, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


@_define("gated_residual_backward", fake=_gated_residual_backward_fake)
def _gated_residual_backward_op(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return _gated_residual_backward(dout, y, gate)


def _gated_residual_setup_context(ctx, inputs, output):
    _, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _gated_residual_backward_fn(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = torch.ops.archirf_kernels.gated_residual_backward(dout, y, gate)
    return dout, dy, dgate


_gated_residual_op.register_autograd(_gated_residual_backward_fn, setup_context=_gated_residual_setup_context)


def _gated_residual_ada_layer_norm_fake(x, y, gate, shift, scale, weight, bias, eps, norm):
    checks.gated_residual(x, y, gate)
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    mean_shape, rstd_shape = _stats_shapes(x, norm)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(mean_shape, dtype=torch.float32),
            x.new_empty(rstd_shape, dtype=torch.float32))


@_define("gated_residual_ada_layer_norm", fake=_gated_residual_ada_layer_norm_fake)
def _gated_residual_ada_layer_norm_op(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                      weight: Tensor | None, bias: Tensor | None, eps: float,
                                      norm: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    checks.gated_residual(x, y, gate)
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    x_new, h, mean, rstd = _ada_norm_forward(x, y, gate, shift, scale, weight, bias, eps, norm)
    return x_new, h, mean, rstd


def _gated_residual_ada_layer_norm_backward_fake(dx_new, dh, x_new, y, gate, scale, weight, bias, mean, rstd, norm,
                                                 shift_dtype):
    return (x_new.new_empty(x_new.shape), y.new_empty(y.shape), gate.new_empty(gate.shape),
            scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape),
            weight.new_empty(weight.shape) if weight is not None else x_new.new_empty(_EMPTY),
            bias.new_empty(bias.shape) if bias is not None else x_new.new_empty(_EMPTY))


@_define("gated_residual_ada_layer_norm_backward", fake=_gated_residual_ada_layer_norm_backward_fake)
def _gated_residual_ada_layer_norm_backward_op(
        dx_new: Tensor | None, dh: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
        weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, norm: str,
        shift_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dy, dgate, dshift, dscale, dweight, dbias = _ada_norm_backward(
        dx_new, dh, x_new, y, gate, scale, weight, bias, mean, rstd, norm, shift_dtype)
    return dx, dy, dgate, dshift, dscale, _empty_if_none(dweight, x_new), _empty_if_none(dbias, x_new)


def _gated_residual_ada_layer_norm_setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, norm = inputs
    x_new, _, mean, rstd = output
    ctx.save_for_backward(x_new, y, gate, scale, weight, bias, mean, rstd)
    ctx.norm, ctx.shift_dtype = norm, shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _gated_residual_ada_layer_norm_backward(ctx, dx_new, dh, _dmean, _drstd):
    x_new, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    if dh is None:      # only x_new is used downstream: the norm's backward sees dh = 0
        dh = torch.zeros(x_new.shape, dtype=x_new.dtype, device=x_new.device)
    dx, dy, dgate, dshift, dscale, dweight, dbias = (
        torch.ops.archirf_kernels.gated_residual_ada_layer_norm_backward(
            dx_new, dh, x_new, y, gate, scale, weight, bias, mean, rstd, ctx.norm, ctx.shift_dtype))
    return (dx, dy, dgate, dshift, dscale, dweight if weight is not None else None,
            dbias if bias is not None else None, None, None)


_gated_residual_ada_layer_norm_op.register_autograd(
    _gated_residual_ada_layer_norm_backward, setup_context=_gated_residual_ada_layer_norm_setup_context)


# ----------------------------------------------------------------------------------------------
# Differentiable entry points (archirf_kernels.* dispatches here for impl="triton").

def ada_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-6, norm: str = "layer") -> Tensor:
    return torch.ops.archirf_kernels.ada_layer_norm(x, shift, scale, weight, bias, eps, norm)[0]


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return torch.ops.archirf_kernels.gated_residual(x, y, gate)


def gated_residual_ada_layer_norm(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                  weight: Tensor | None = None, bias: Tensor | None = None,
                                  eps: float = 1e-6, norm: str = "layer") -> tuple[Tensor, Tensor]:
    x_new, h, _, _ = torch.ops.archirf_kernels.gated_residual_ada_layer_norm(
        x, y, gate, shift, scale, weight, bias, eps, norm)
    return x_new, h
