"""Fused QK-RMSNorm + flash attention, forward and backward, for DiT and MMDiT joint attention.

    out = softmax(N_q(q) N_k(k)^T * scale) v          N_x(x) = x / sqrt(mean_D(x^2) + eps) * w_x

reference.qk_norm_attention and reference.joint_qk_norm_attention are the spec. Input straight from
the qkv projection, (B, N, 3, H, D) (or separate (B, N, H, D) q, k, v views with any strides, unit
stride over D); output (B, N, H*D), the heads merged, ready for the output projection; no permute
copies on the way in or out. Joint attention (SD3's MMDiT): a second stream (context tokens) with its
own qkv and norm weights; queries of both streams attend to the keys [img, ctx]; the streams' q, k, v
and outputs are never concatenated (only the prep pass's qhat, khat below lie end to end).
qk_norm=False compiles the norm out (NORM constexpr; the prep pass then writes q * scale * log2(e)
and a copy of k): the same kernels serve plain attention. Storage fp16 / bf16 / fp32 (fp32: dots in
three TF32 passes, fp32-accurate), all math and accumulation in fp32, outputs in the storage dtype,
weight gradients in the weights' dtype.

How the norm is fused. A prep pass, one read of q and k, computes each row's rstd (rq, rk: one per
token and head) and writes the operands of the attention proper,

    qhat = q * rq * w_q * scale * log2(e)        khat = k * rk * w_k          (storage dtype),

for both streams end to end per (b, h); the attention kernels are then plain flash attention on
(qhat, khat, v) with every operand loaded straight from memory, and the softmax runs in base 2 (the
saved log-sum-exp is in log2 units). Folding the weights into an operand inside the attention
kernels instead leaves that operand in registers, where the matmul holds or re-reads it each step:
compiled for sm_90a, such backward kernels spill. The backward's prep pass recomputes qhat, khat
from the raw q, k and the saved rq, rk (no reduction), with delta = rowsum(dO * O); each backward
kernel ends with the norm's backward of its block, from the raw rows, written straight into d(qkv).
The transient qhat, khat are the only extra memory; nothing normalised is kept for the backward.

Head dims. A power-of-two head dim D is one tile column block. Any other D is split into a
power-of-two main part DA plus a power-of-two tail DB >= 16 (tl.dot needs K, N >= 16), the tail's
columns >= D masked on load and store: DiT-XL's 72 = 64 + 16 (8 masked) costs 80/72 of the matmul
work instead of 128/72 for padding to the next power of two. Every product sums (S, dP) or produces
(P V, dQ, dK, dV) both parts, and the RMS statistics cover both; nothing padded exists in memory.
Where DA + DB would not be smaller than the next power of two (D = 24, 112, or D < 16) D is padded
and masked as one block.

Grids. Forward and dq: one program per (query block of BLOCK_M tokens of [img, ctx], b * H + h);
dk/dv: one per (key block of BLOCK_N, b * H + h); a program's fixed block may straddle the streams.
It walks the key (query) tiles of the image stream, then of the context stream, each with its own
pointers; each stream's full tiles run unmasked and its last partial tile masked. The gradients of
the (D,) weights are reduced per program and stream into fp32 partial rows, one per MIN_BLOCK tokens
(a program of a larger block writes zeros into its other slots, so the layout is the same for every
autotuned block size), and summed by torch: no atomics, same bits every run (the fused backend; the
sdpa backend's attention backward is PyTorch's, whose determinism follows
torch.use_deterministic_algorithms).

Registered as torch.library custom ops (archirf_kernels::qk_norm_attention for the packed qkv,
archirf_kernels::qk_norm_attention_split for separate q, k, v) with fake and autograd
implementations, so torch.compile(fullgraph=True) traces through a model that uses them.

Two backends (`backend=`): 'fused', the kernels above; 'sdpa', a Triton pass that writes SDPA's
operands (archirf_kernels::qkv_prep: qhat, khat and a copy of v, (B, N0 + N1, H, D), no softmax scale
folded; the streams concatenated) feeding PyTorch's scaled_dot_product_attention (cuDNN first),
whose gradients go through one Triton pass of the norm's backward straight into d(qkv) and the
weight gradients. The norm then costs two memory-bound passes around the fastest attention kernel
the installed PyTorch has. 'auto' picks from measurements (choose_backend): the fused kernels for
short sequences (<= 512 tokens) with head dims up to 64, SDPA otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import checks
from .reference import ATTENTION_BACKENDS, ATTENTION_MAX_HEAD_DIM, qk_eps

Tensor = torch.Tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = ATTENTION_MAX_HEAD_DIM
MIN_BLOCK = 16          # the smallest BLOCK_M / BLOCK_N of any config: one dw partial slot per this many tokens
_MIN_BLOCK = tl.constexpr(MIN_BLOCK)
ROWSTAT_ROWS = 64       # tokens per program of the prep passes


def head_split(D: int) -> tuple[int, int, bool]:
    """(DA, DB, TAIL): the head dim as a power-of-two main part DA plus, where TAIL, a power-of-two
    tail of DB >= 16 columns (masked beyond D); without a tail DA >= D is masked beyond D (D < 16, or
    where the split would not save work) and DB is a placeholder."""
    full = max(16, triton.next_power_of_2(D))
    if D <= 16 or full == D:
        return full, 16, False
    main = full // 2
    tail = max(16, triton.next_power_of_2(D - main))
    if main + tail < full:
        return main, tail, True
    return full, 16, False


# ----------------------------------------------------------------------------------------------
# Block sizes. Autotuned per (TUNE_N = next power of 2 of all tokens, HEAD_DIM, NORM, HAS_CTX) and,
# implicitly (Triton appends every tensor argument's dtype to the key), the storage dtype. The
# candidates are pruned by the tiled head width (DA + DB: <= 64, <= 96, <= 128, larger) and by N (no
# block longer than the sequence), so that a shape tries at most three configs per kernel: each
# costs a compile of a few seconds on its first call. For sm_90 (wgmma: 64-row warpgroup tiles) and
# sm_80: the forward takes 64-128 queries x 64-128 keys (FlashAttention-2's split, Dao 2023, Sec.
# 3.3); the backward kernels hold two fp32 accumulators (dq: one) of their fixed block and stream
# narrow tiles through deep pipelines (Triton tutorial 06: 128 keys x 32 queries for dk/dv, 128
# queries x 32 keys for dq), on 8 warps once the accumulators outgrow 4 warps' registers. Every
# candidate up to D = 128 compiles for sm_90a without register spills (ptxas, Triton 3.x). The first
# config of each list is the untuned default (ARCHIRF_ATTN_AUTOTUNE=0, or AUTOTUNE = False at run
# time: no tuning, e.g. for numerics tests). The interpreter gets one 16 x 16 config so that the CPU
# tests are fast and cover multi-tile loops and partial blocks.

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("ARCHIRF_ATTN_AUTOTUNE", "1") != "0"
TUNE_KEY = ["TUNE_N", "HEAD_DIM", "NORM", "HAS_CTX"]
WIDTH_CLASSES = (64, 96, 128, MAX_HEAD_DIM)     # tiled head width (DA + DB) up to each: one candidate list

#          (BLOCK_M queries, BLOCK_N keys, warps, stages) per width class
FWD_CANDIDATES = ([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
                  [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
                  [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
                  [(128, 32, 8, 2), (64, 32, 4, 2)])
DQ_CANDIDATES = ([(128, 64, 8, 3), (128, 32, 4, 5), (64, 32, 4, 4)],
                 [(128, 32, 8, 4), (128, 64, 8, 3), (64, 32, 4, 4)],
                 [(128, 32, 8, 4), (64, 64, 8, 3), (128, 64, 8, 3)],
                 [(64, 32, 8, 2)])
DKDV_CANDIDATES = ([(32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 4)],
                   [(32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 4)],
                   [(32, 64, 8, 4), (64, 64, 8, 3), (16, 128, 8, 4)],
                   [(16, 64, 8, 2)])


def _tiled_width(D: int) -> int:
    da, db, tail = head_split(D)
    return da + db if tail else da


def _width_class(D: int) -> int:
    return next(i for i, w in enumerate(WIDTH_CLASSES) if _tiled_width(D) <= w)


def _configs(candidates) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": MIN_BLOCK, "BLOCK_N": MIN_BLOCK}, num_warps=1, num_stages=1)]
    shapes = list(dict.fromkeys(c for cls in candidates for c in cls))     # every class; the prune picks one
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _signature(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def candidates_for(candidates, D: int, n_tokens: int, fp32: bool = False) -> list[tuple[int, int, int, int]]:
    """The configs tried for head dim D and n_tokens tokens in all, default first: the width class's
    list, without blocks longer than the sequence (short sequences: a block of padding costs its full
    work), and only the default when AUTOTUNE is off. fp32 storage (an accuracy path, 3-pass TF32
    dots with twice the bytes per operand) takes the class's smallest config alone."""
    wanted = candidates[_width_class(D)]
    if fp32:
        return wanted[-1:]
    fit = [c for c in wanted if max(c[0], c[1]) <= max(64, triton.next_power_of_2(n_tokens))] or wanted[:1]
    return fit if AUTOTUNE else fit[:1]


def _pruner(candidates):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        wanted = candidates_for(candidates, kwargs["HEAD_DIM"], kwargs["TUNE_N"],
                                named_args["QH"].dtype == torch.float32)
        keep = {_signature(c): c for c in configs if _signature(c) in wanted}
        return [keep[w] for w in wanted if w in keep]
    return {"early_config_prune": prune}


FWD_CONFIGS, DQ_CONFIGS, DKDV_CONFIGS = (_configs(c) for c in (FWD_CANDIDATES, DQ_CANDIDATES, DKDV_CANDIDATES))


# ----------------------------------------------------------------------------------------------
# Tile helpers. A token sequence is the image stream's N0 rows followed by the context's N1 (per
# (b, h)); a tile is BLOCK of its rows x the head dim, held as two column parts: xa (columns [0, DA))
# and, where TAIL, xb (columns [DA, DA + DB)); columns >= HEAD_DIM are masked (loaded as 0, never
# stored). Without a tail xb is a placeholder that no code path reads. The fixed block of a program
# may straddle the two streams (_load_rows, _store_rows); the streamed tiles never do: the loops walk
# each stream's tiles with its own pointers (a per-row choice of stream inside the loop would defeat
# the vectorised, pipelined loads).

@triton.jit
def _load_part(ptrs, row_mask, COL0: tl.constexpr, WIDTH: tl.constexpr, MASK_ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    p = ptrs[:, None] + cols[None, :]
    if COL0 + WIDTH > HEAD_DIM:
        if MASK_ROWS:
            x = tl.load(p, mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(p, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        if MASK_ROWS:
            x = tl.load(p, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(p)
    return x


@triton.jit
def _load_tile(ptrs, row_mask, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
               TAIL: tl.constexpr):
    xa = _load_part(ptrs, row_mask, 0, DA, MASK_ROWS, HEAD_DIM)
    if TAIL:
        xb = _load_part(ptrs, row_mask, DA, DB, MASK_ROWS, HEAD_DIM)
    else:
        xb = xa
    return xa, xb


@triton.jit
def _store_part(ptrs, row_mask, x, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(ptrs[:, None] + cols[None, :], x, mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _store_tile(ptrs, row_mask, xa, xb, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                TAIL: tl.constexpr):
    _store_part(ptrs, row_mask, xa.to(ptrs.dtype.element_ty), 0, DA, HEAD_DIM)
    if TAIL:
        _store_part(ptrs, row_mask, xb.to(ptrs.dtype.element_ty), DA, DB, HEAD_DIM)


@triton.jit
def _load_rows(X0, X1, rows, row_mask, N0, stride0, stride1, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
               DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr):
    """The rows `rows` of [stream 0 (X0, N0 rows), stream 1 (X1)], a block that may straddle the two:
    two complementary masked loads (each a plain strided tile, vectorised), summed."""
    xa, xb = _load_tile(X0 + rows * stride0, row_mask & (rows < N0), True, HEAD_DIM, DA, DB, TAIL)
    if HAS_CTX:
        ya, yb = _load_tile(X1 + (rows - N0) * stride1, row_mask & (rows >= N0), True, HEAD_DIM, DA, DB, TAIL)
        xa += ya
        xb += yb
    return xa, xb


@triton.jit
def _store_rows(X0, X1, rows, row_mask, N0, stride0, stride1, xa, xb, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
                DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr):
    _store_tile(X0 + rows * stride0, row_mask & (rows < N0), xa, xb, HEAD_DIM, DA, DB, TAIL)
    if HAS_CTX:
        _store_tile(X1 + (rows - N0) * stride1, row_mask & (rows >= N0), xa, xb, HEAD_DIM, DA, DB, TAIL)


@triton.jit
def _load_weight(W0, W1, rows, N0, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_CTX: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of the (D,) fp32 weight of each row's stream: (1 or rows, WIDTH)."""
    cols = COL0 + tl.arange(0, WIDTH)
    w = tl.load(W0 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :]
    if HAS_CTX:
        w1 = tl.load(W1 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :]
        w = tl.where((rows < N0)[:, None], w, w1)
    return w


@triton.jit
def _row_dot(xa, xb, ya, yb, TAIL: tl.constexpr):
    """Per row, sum over the head dim of x * y (fp32)."""
    s = tl.sum(xa.to(tl.float32) * ya.to(tl.float32), 1)
    if TAIL:
        s += tl.sum(xb.to(tl.float32) * yb.to(tl.float32), 1)
    return s


@triton.jit
def _dot_nt(xa, xb, ya, yb, TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """x @ y^T summed over both column parts: (rows of x, rows of y), fp32."""
    s = tl.dot(xa, tl.trans(ya), input_precision=PRECISION)
    if TAIL:
        s = tl.dot(xb, tl.trans(yb), s, input_precision=PRECISION)
    return s


@triton.jit
def _dot_acc(acc_a, acc_b, p, ya, yb, TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """acc += p @ y per column part (p cast to y's dtype)."""
    p = p.to(ya.dtype)
    acc_a = tl.dot(p, ya, acc_a, input_precision=PRECISION)
    if TAIL:
        acc_b = tl.dot(p, yb, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _store_weight_partial(DW, part, slot0, num_slots, COL0: tl.constexpr, WIDTH: tl.constexpr,
                          HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr):
    """This program's partial sum of columns [COL0, COL0 + WIDTH) into slot `slot0` and zeros into its
    other SLOTS - 1 slots (those below num_slots), so that every slot is written whatever the block size."""
    r = tl.arange(0, SLOTS)
    cols = COL0 + tl.arange(0, WIDTH)
    vals = tl.where(r[:, None] == 0, part[None, :], 0.0)
    ptrs = DW + (slot0 + r)[:, None] * HEAD_DIM + cols[None, :]
    tl.store(ptrs, vals, mask=((slot0 + r) < num_slots)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _weight_partials(DW, dxhat, xn, rows, row_mask, N0, stream_stride, slot0, num_slots, COL0: tl.constexpr,
                     WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_CTX: tl.constexpr, SLOTS: tl.constexpr):
    """dw = sum over this block's rows of dxhat * xn, per stream (stream 1's at DW + stream_stride)."""
    g = dxhat * xn
    if HAS_CTX:
        _store_weight_partial(DW, tl.sum(tl.where((rows < N0)[:, None], g, 0.0), 0), slot0, num_slots,
                              COL0, WIDTH, HEAD_DIM, SLOTS)
        _store_weight_partial(DW + stream_stride, tl.sum(tl.where((rows >= N0)[:, None], g, 0.0), 0), slot0,
                              num_slots, COL0, WIDTH, HEAD_DIM, SLOTS)
    else:
        _store_weight_partial(DW, tl.sum(g, 0), slot0, num_slots, COL0, WIDTH, HEAD_DIM, SLOTS)


@triton.jit
def _norm_backward(dxa, dxb, X0, X1, rows, row_mask, stride0, stride1, r, W0, W1, DW, N0, stream_stride, slot0,
                   num_slots, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr,
                   HAS_CTX: tl.constexpr, SLOTS: tl.constexpr):
    """Through x -> xn = x * r -> xhat = xn * w, per row: dx = r * (dxn - xn * mean_D(xn * dxn)) with
    dxn = dxhat * w; and this block's partial dw = sum_rows dxhat * xn per stream. dxhat must be zero in
    rows outside row_mask; xn is recomputed from the raw x."""
    xa, xb = _load_rows(X0, X1, rows, row_mask, N0, stride0, stride1, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    xna = xa.to(tl.float32) * r[:, None]
    dna = dxa * _load_weight(W0, W1, rows, N0, 0, DA, HEAD_DIM, HAS_CTX)
    dot = tl.sum(xna * dna, 1)
    _weight_partials(DW, dxa, xna, rows, row_mask, N0, stream_stride, slot0, num_slots, 0, DA, HEAD_DIM, HAS_CTX,
                     SLOTS)
    xnb, dnb = xna, dna
    if TAIL:
        xnb = xb.to(tl.float32) * r[:, None]
        dnb = dxb * _load_weight(W0, W1, rows, N0, DA, DB, HEAD_DIM, HAS_CTX)
        dot += tl.sum(xnb * dnb, 1)
        _weight_partials(DW, dxb, xnb, rows, row_mask, N0, stream_stride, slot0, num_slots, DA, DB, HEAD_DIM,
                         HAS_CTX, SLOTS)
    mean = dot / HEAD_DIM
    return r[:, None] * (dna - xna * mean[:, None]), r[:, None] * (dnb - xnb * mean[:, None])


@triton.jit
def _input_grad(dxa, dxb, X0, X1, DX0, DX1, R, W0, W1, DW, rows, row_mask, block, N0, S, s0_n, s1_n, g0_n, g1_n,
                NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                TAIL: tl.constexpr, BLOCK: tl.constexpr):
    """A block's epilogue: dx~ (the gradient of its normalised, weighted rows; zero in rows outside
    row_mask) through the norm (with the rows' rstd R and the raw X) into dx, stored at DX0 / DX1; the
    weight-gradient partials into this block's slots of DW (stream 1's one (B*H, S, D) plane after)."""
    if NORM:
        r = tl.load(R + rows, mask=row_mask, other=0.0)
        dxa, dxb = _norm_backward(dxa, dxb, X0, X1, rows, row_mask, s0_n, s1_n, r, W0, W1, DW, N0,
                                  tl.num_programs(1).to(tl.int64) * S * HEAD_DIM, block * (BLOCK // _MIN_BLOCK), S,
                                  HEAD_DIM, DA, DB, TAIL, HAS_CTX, BLOCK // _MIN_BLOCK)
    _store_rows(DX0, DX1, rows, row_mask, N0, g0_n, g1_n, dxa, dxb, HAS_CTX, HEAD_DIM, DA, DB, TAIL)


# ----------------------------------------------------------------------------------------------
# Prep pass, one program per ROWSTAT_ROWS tokens of one (b, h), both streams: the attention operands
#
#     qhat = q * rq * w_q * scale * log2(e)        khat = k * rk * w_k         (storage dtype)
#
# into (B*H, N0 + N1, D) scratch buffers (the streams end to end), so that the attention kernels are
# plain flash attention on (qhat, khat, v) with every operand loaded straight from memory (a folded
# operand computed in registers would be held there by the matmul, or re-read each step, and spill).
# Forward: computes and saves rq, rk. Backward (BACKWARD): recomputes qhat, khat from the saved rq, rk
# (no reduction) and computes delta = rowsum(dO * O). Without the norm qhat = q * scale * log2(e),
# khat = k.

@triton.jit
def _row_block(N0, N1, H, BLOCK_R: tl.constexpr):
    """A row pass's program: (pid, bh, b, h, its rows of [img, ctx], their mask, the (b, h) stats offset)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    N = N0 + N1
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    return pid, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), rows, rows < N, bh.to(tl.int64) * N


@triton.jit
def _prep_kernel(
    Q0, K0, Q1, K1, QW0, KW0, QW1, KW1,  # raw q, k of each stream (B, N, H, D); weights fp32
    O0, DO0, O1, DO1,                    # BACKWARD: out and dout of each stream (B, N, H*D)
    QH, KH, RQ, RK, DELTA,               # (B, H, N0 + N1, D) or (B, N0 + N1, H, D) storage dtype; (B*H, N0 + N1) fp32
    s0_b, s0_n, s0_h, s1_b, s1_n, s1_h,  # strides of each stream's q, k (shared)
    h_b, h_n, h_h,                       # strides of qhat, khat (shared)
    N0, N1, H, q_eps, k_eps, qk_scale,
    BACKWARD: tl.constexpr, NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr,
    DB: tl.constexpr, TAIL: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid, bh, b, h, rows, mask, stats = _row_block(N0, N1, H, BLOCK_R)
    out = QH.dtype.element_ty
    scratch = b * h_b + h * h_h + rows * h_n
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    qa, qb = _load_rows(Q0 + in0, Q1 + in1, rows, mask, N0, s0_n, s1_n, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    ka, kb = _load_rows(K0 + in0, K1 + in1, rows, mask, N0, s0_n, s1_n, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    if NORM:
        if BACKWARD:
            rq = tl.load(RQ + stats + rows, mask=mask, other=0.0)
            rk = tl.load(RK + stats + rows, mask=mask, other=0.0)
        else:
            rq = tl.math.rsqrt(_row_dot(qa, qb, qa, qb, TAIL) / HEAD_DIM + q_eps)
            rk = tl.math.rsqrt(_row_dot(ka, kb, ka, kb, TAIL) / HEAD_DIM + k_eps)
            tl.store(RQ + stats + rows, rq, mask=mask)
            tl.store(RK + stats + rows, rk, mask=mask)
        qha = qa.to(tl.float32) * rq[:, None] * (_load_weight(QW0, QW1, rows, N0, 0, DA, HEAD_DIM, HAS_CTX) * qk_scale)
        kha = ka.to(tl.float32) * rk[:, None] * _load_weight(KW0, KW1, rows, N0, 0, DA, HEAD_DIM, HAS_CTX)
        qhb, khb = qha, kha
        if TAIL:
            qhb = qb.to(tl.float32) * rq[:, None] * (_load_weight(QW0, QW1, rows, N0, DA, DB, HEAD_DIM, HAS_CTX)
                                                     * qk_scale)
            khb = kb.to(tl.float32) * rk[:, None] * _load_weight(KW0, KW1, rows, N0, DA, DB, HEAD_DIM, HAS_CTX)
    else:
        qha, qhb, kha, khb = qa.to(tl.float32) * qk_scale, qb.to(tl.float32) * qk_scale, ka, kb
    _store_tile(QH + scratch, mask, qha.to(out), qhb.to(out), HEAD_DIM, DA, DB, TAIL)
    _store_tile(KH + scratch, mask, kha.to(out), khb.to(out), HEAD_DIM, DA, DB, TAIL)
    if BACKWARD:
        o0, o1 = (b * N0 * H + h) * HEAD_DIM, (b * N1 * H + h) * HEAD_DIM
        oa, ob = _load_rows(O0 + o0, O1 + o1, rows, mask, N0, H * HEAD_DIM, H * HEAD_DIM, HAS_CTX, HEAD_DIM, DA, DB,
                            TAIL)
        da, db = _load_rows(DO0 + o0, DO1 + o1, rows, mask, N0, H * HEAD_DIM, H * HEAD_DIM, HAS_CTX, HEAD_DIM, DA, DB,
                            TAIL)
        tl.store(DELTA + stats + rows, _row_dot(oa, ob, da, db, TAIL), mask=mask)


# ----------------------------------------------------------------------------------------------
# Forward. Per query block: for each key tile s = qhat . khat_j (log2 units), the online softmax
# (Milakov & Gimelshein 2018; FlashAttention-2, Dao 2023, Alg. 1) with exp2, and acc += p v. Each
# stream's full key tiles run unmasked, its partial last one masked. Saved: lse = m + log2(l).

@triton.jit
def _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, KH, V, start, N_kv, stride_v,
              MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_kv
    ka, kb = _load_tile(KH + offs_n * HEAD_DIM, mask_n, MASK_N, HEAD_DIM, DA, DB, TAIL)
    s = _dot_nt(qa, qb, ka, kb, TAIL, PRECISION)                            # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # -- update m_i and l_i
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- update the output accumulator
    va, vb = _load_tile(V + offs_n * stride_v, mask_n, MASK_N, HEAD_DIM, DA, DB, TAIL)
    acc_a = acc_a * alpha[:, None]
    if TAIL:
        acc_b = acc_b * alpha[:, None]
    acc_a, acc_b = _dot_acc(acc_a, acc_b, p, va, vb, TAIL, PRECISION)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _fwd_stream(acc_a, acc_b, m_i, l_i, qa, qb, KH, V, N_kv, stride_v, HEAD_DIM: tl.constexpr, DA: tl.constexpr,
                DB: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The keys of one stream (KH, V at its first row): full tiles unmasked, the partial last one masked."""
    n_full = (N_kv // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, KH, V, start, N_kv, stride_v,
                                           False, HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    if n_full < N_kv:
        acc_a, acc_b, m_i, l_i = _fwd_tile(acc_a, acc_b, m_i, l_i, qa, qb, KH, V, n_full, N_kv, stride_v,
                                           True, HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    return acc_a, acc_b, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(FWD_CANDIDATES))
@triton.jit
def _attn_fwd_kernel(
    QH, KH, LSE,                         # (B*H, N0 + N1, D) prepped operands; (B*H, N0 + N1) fp32 log2-sum-exp
    V0, O0, V1, O1,                      # per stream: v (B, N, H, D) and out (B, N, H*D) (V1, O1: HAS_CTX only)
    s0_b, s0_n, s0_h, s1_b, s1_n, s1_h,  # strides of each stream's v
    N0, N1, H,
    TUNE_N,                              # autotune key only
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    TAIL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    N = N0 + N1
    stats = bh.to(tl.int64) * N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    qa, qb = _load_tile(QH + stats * HEAD_DIM + offs_m * HEAD_DIM, mask_m, True, HEAD_DIM, DA, DB, TAIL)
    KH += stats * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    # -- the image stream's keys, then the context's
    acc_a, acc_b, m_i, l_i = _fwd_stream(acc_a, acc_b, m_i, l_i, qa, qb, KH, V0 + b * s0_b + h * s0_h, N0, s0_n,
                                         HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    if HAS_CTX:
        acc_a, acc_b, m_i, l_i = _fwd_stream(acc_a, acc_b, m_i, l_i, qa, qb, KH + N0 * HEAD_DIM,
                                             V1 + b * s1_b + h * s1_h, N1, s1_n, HEAD_DIM, DA, DB, TAIL, BLOCK_N,
                                             PRECISION)
    # -- epilogue: normalise, merge heads on the store, save the log2-sum-exp
    inv_l = 1.0 / l_i
    _store_rows(O0 + (b * N0 * H + h) * HEAD_DIM, O1 + (b * N1 * H + h) * HEAD_DIM, offs_m, mask_m, N0, H * HEAD_DIM,
                H * HEAD_DIM, acc_a * inv_l[:, None], acc_b * inv_l[:, None], HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    tl.store(LSE + stats + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward (FlashAttention-2, Dao 2023, Alg. 2), through the norm. With P = softmax(S) row-wise,
# S_ij = scale * qn_i w_q . kn_j w_k (= qhat_i . khat_j / log2 e), O = P V and dO = dL/dO:
#
#     dV_j     = sum_i P_ij dO_i
#     dP_ij    = dO_i . V_j
#     delta_i  = sum_j P_ij dP_ij = dO_i . O_i
#     dS_ij    = P_ij (dP_ij - delta_i)
#     dq~_i    = scale * sum_j dS_ij khat_j          dk~_j = ln 2 * sum_i dS_ij qhat_i
#
# (x~ = xn * w: the normalised, weighted row), and through RMSNorm (x -> xn = x * r,
# r = 1 / sqrt(mean_D(x^2) + eps)), per row:
#
#     dw       = sum_rows dx~ * xn                   (over tokens, batch and heads; per stream)
#     dxn      = dx~ * w
#     dx       = r * (dxn - xn * mean_D(xn * dxn))
#
# P is recomputed from the saved lse; nothing of size N^2 is stored, and qhat, khat are recomputed
# by the prep pass from the raw q, k and the saved rq, rk. Kernels (Triton tutorial 06's split): the
# prep pass (qhat, khat, delta), then dk/dv (a key block per program, looping over all query tiles)
# and dq (a query block per program, looping over all key tiles), which recompute P each; each ends
# with the norm's backward of its block (the raw rows reloaded) and writes the gradient in place.

@triton.jit
def _dq_tile(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH, V, start, N_kv, stride_v,
             MASK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_kv
    ka, kb = _load_tile(KH + offs_n * HEAD_DIM, mask_n, MASK_N, HEAD_DIM, DA, DB, TAIL)
    va, vb = _load_tile(V + offs_n * stride_v, mask_n, MASK_N, HEAD_DIM, DA, DB, TAIL)
    p = tl.math.exp2(_dot_nt(qa, qb, ka, kb, TAIL, PRECISION) - lse[:, None])   # (BLOCK_M, BLOCK_N)
    if MASK_N:
        p = tl.where(mask_n[None, :], p, 0.0)
    ds = p * (_dot_nt(doa, dob, va, vb, TAIL, PRECISION) - delta[:, None])
    return _dot_acc(acc_a, acc_b, ds, ka, kb, TAIL, PRECISION)


@triton.jit
def _dq_stream(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH, V, N_kv, stride_v, HEAD_DIM: tl.constexpr,
               DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    n_full = (N_kv // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH, V, start, N_kv, stride_v,
                                False, HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    if n_full < N_kv:
        acc_a, acc_b = _dq_tile(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH, V, n_full, N_kv, stride_v,
                                True, HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    return acc_a, acc_b


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(DQ_CANDIDATES))
@triton.jit
def _attn_bwd_dq_kernel(
    QH, KH, LSE, DELTA, RQ,              # prepped operands (B*H, N0 + N1, D); stats (B*H, N0 + N1) fp32
    Q0, V0, DO0, DQ0, QW0,               # stream 0: raw q, v (B, N0, H, D), dout (B, N0, H*D), dq, q weight (fp32)
    Q1, V1, DO1, DQ1, QW1,               # stream 1 (HAS_CTX only)
    DQW,                                 # (streams, B*H, S, D) fp32 weight-gradient partials
    s0_b, s0_n, s0_h, g0_b, g0_n, g0_h,  # strides of stream 0's q, k, v and of its gradients
    s1_b, s1_n, s1_h, g1_b, g1_n, g1_h,
    N0, N1, H, S, sm_scale,
    TUNE_N,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    TAIL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    N = N0 + N1
    stats = bh.to(tl.int64) * N
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    qa, qb = _load_tile(QH + stats * HEAD_DIM + offs_m * HEAD_DIM, mask_m, True, HEAD_DIM, DA, DB, TAIL)
    doa, dob = _load_rows(DO0 + (b * N0 * H + h) * HEAD_DIM, DO1 + (b * N1 * H + h) * HEAD_DIM, offs_m, mask_m, N0,
                          H * HEAD_DIM, H * HEAD_DIM, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    lse = tl.load(LSE + stats + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + stats + offs_m, mask=mask_m, other=0.0)
    KH += stats * HEAD_DIM
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    # -- the image stream's keys, then the context's: acc = sum_j dS_ij khat_j
    acc_a, acc_b = _dq_stream(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH, V0 + in0, N0, s0_n,
                              HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    if HAS_CTX:
        acc_a, acc_b = _dq_stream(acc_a, acc_b, qa, qb, doa, dob, lse, delta, KH + N0 * HEAD_DIM, V1 + in1, N1, s1_n,
                                  HEAD_DIM, DA, DB, TAIL, BLOCK_N, PRECISION)
    # -- through the norm
    _input_grad(acc_a * sm_scale, acc_b * sm_scale, Q0 + in0, Q1 + in1, DQ0 + b * g0_b + h * g0_h,
                DQ1 + b * g1_b + h * g1_h, RQ + stats, QW0, QW1, DQW + bh.to(tl.int64) * S * HEAD_DIM, offs_m, mask_m,
                pid_m, N0, S, s0_n, s1_n, g0_n, g1_n, NORM, HAS_CTX, HEAD_DIM, DA, DB, TAIL, BLOCK_M)


@triton.jit
def _dkdv_tile(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH, DO, LSE, DELTA, start, N_q, stride_o,
               MASK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N_q
    qa, qb = _load_tile(QH + offs_m * HEAD_DIM, mask_m, MASK_M, HEAD_DIM, DA, DB, TAIL)
    if MASK_M:       # padded queries: lse = +inf, so that their column of P is 0
        lse = tl.load(LSE + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    # -- transposed scores: rows are this program's keys, columns the tile's queries
    p_t = tl.math.exp2(_dot_nt(ka, kb, qa, qb, TAIL, PRECISION) - lse[None, :])   # (BLOCK_N, BLOCK_M)
    doa, dob = _load_tile(DO + offs_m * stride_o, mask_m, MASK_M, HEAD_DIM, DA, DB, TAIL)
    dv_a, dv_b = _dot_acc(dv_a, dv_b, p_t, doa, dob, TAIL, PRECISION)
    ds_t = p_t * (_dot_nt(va, vb, doa, dob, TAIL, PRECISION) - delta[None, :])
    dk_a, dk_b = _dot_acc(dk_a, dk_b, ds_t, qa, qb, TAIL, PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def _dkdv_stream(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH, DO, LSE, DELTA, N_q, stride_o, HEAD_DIM: tl.constexpr,
                 DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The queries of one stream (QH, DO, LSE, DELTA at its first row)."""
    m_full = (N_q // BLOCK_M) * BLOCK_M
    for start in range(0, m_full, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_tile(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH, DO, LSE, DELTA, start, N_q,
                                            stride_o, False, HEAD_DIM, DA, DB, TAIL, BLOCK_M, PRECISION)
    if m_full < N_q:
        dk_a, dk_b, dv_a, dv_b = _dkdv_tile(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH, DO, LSE, DELTA, m_full, N_q,
                                            stride_o, True, HEAD_DIM, DA, DB, TAIL, BLOCK_M, PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(DKDV_CANDIDATES))
@triton.jit
def _attn_bwd_dkdv_kernel(
    QH, KH, LSE, DELTA, RK,              # prepped operands (B*H, N0 + N1, D); stats (B*H, N0 + N1) fp32
    K0, V0, DO0, DK0, DV0, KW0,          # stream 0: raw k, v (B, N0, H, D), dout (B, N0, H*D), dk, dv, k weight
    K1, V1, DO1, DK1, DV1, KW1,          # stream 1 (HAS_CTX only)
    DKW,                                 # (streams, B*H, S, D) fp32 weight-gradient partials
    s0_b, s0_n, s0_h, g0_b, g0_n, g0_h,
    s1_b, s1_n, s1_h, g1_b, g1_n, g1_h,
    N0, N1, H, S, dk_scale,              # dk_scale = ln 2 (qhat carries scale * log2 e)
    TUNE_N,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    TAIL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    N = N0 + N1
    stats = bh.to(tl.int64) * N
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ka, kb = _load_tile(KH + stats * HEAD_DIM + offs_n * HEAD_DIM, mask_n, True, HEAD_DIM, DA, DB, TAIL)
    va, vb = _load_rows(V0 + in0, V1 + in1, offs_n, mask_n, N0, s0_n, s1_n, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    QH += stats * HEAD_DIM
    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    # -- the image stream's queries, then the context's
    dk_a, dk_b, dv_a, dv_b = _dkdv_stream(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH,
                                          DO0 + (b * N0 * H + h) * HEAD_DIM, LSE + stats, DELTA + stats, N0,
                                          H * HEAD_DIM, HEAD_DIM, DA, DB, TAIL, BLOCK_M, PRECISION)
    if HAS_CTX:
        dk_a, dk_b, dv_a, dv_b = _dkdv_stream(dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, QH + N0 * HEAD_DIM,
                                              DO1 + (b * N1 * H + h) * HEAD_DIM, LSE + stats + N0,
                                              DELTA + stats + N0, N1, H * HEAD_DIM, HEAD_DIM, DA, DB, TAIL, BLOCK_M,
                                              PRECISION)
    _store_rows(DV0 + b * g0_b + h * g0_h, DV1 + b * g1_b + h * g1_h, offs_n, mask_n, N0, g0_n, g1_n, dv_a, dv_b,
                HAS_CTX, HEAD_DIM, DA, DB, TAIL)
    # -- dk = sum_i dS_ij qhat_i; through the norm. Padded key rows may hold inf (their scores are not
    #    bounded by the lse): zero them before the sums over rows.
    dka = tl.where(mask_n[:, None], dk_a * dk_scale, 0.0)
    dkb = tl.where(mask_n[:, None], dk_b * dk_scale, 0.0)
    _input_grad(dka, dkb, K0 + in0, K1 + in1, DK0 + b * g0_b + h * g0_h, DK1 + b * g1_b + h * g1_h, RK + stats, KW0,
                KW1, DKW + bh.to(tl.int64) * S * HEAD_DIM, offs_n, mask_n, pid_n, N0, S, s0_n, s1_n, g0_n, g1_n,
                NORM, HAS_CTX, HEAD_DIM, DA, DB, TAIL, BLOCK_N)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated
# them): then they run on CPU tensors; otherwise they need CUDA tensors.
INTERPRETED = INTERPRET


# ----------------------------------------------------------------------------------------------
# Checks and layouts.

def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers hand to a kernel (tests patch this to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"archirf_kernels attention: the Triton kernels need CUDA tensors, got {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter, "
                         "or use impl='reference')")


def _check(streams, weights, qk_norm: bool) -> None:
    checks.attention(streams, weights, qk_norm)
    D = streams[0][0].shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"archirf_kernels attention: head dim {D} > {MAX_HEAD_DIM}; use impl='reference'")


def _unit_d(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _shared_strides(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with unit stride over D and one set of (B, N, H) strides (copies only if they differ)."""
    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _bnh(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _weights(weights, D: int, x: Tensor, qk_norm: bool) -> list[Tensor]:
    """The four weights as contiguous fp32 (D,) tensors (one pointer type for both streams; a D-sized
    copy where needed); None -> ones (the kernels always scale; without the norm they are never read)."""
    ones = None
    out = []
    for w in weights:
        if w is None or not qk_norm:
            if ones is None:
                ones = torch.ones(D, dtype=torch.float32, device=x.device)
            w = ones
        out.append(w.to(torch.float32).contiguous())
    return out


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 storage keeps fp32 accuracy (three TF32 passes on the tensor cores
    on the GPU: an IEEE fp32 dot there runs on the FMA units, spills and takes minutes to compile);
    16-bit storage ignores it."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if INTERPRETED else "tf32x3"


class _Launch:
    """What every launch of one call shares: the streams as (q, k, v) views with shared strides (the
    context's = the image's where there is no context, with N1 = 0), sizes, fp32 weights, meta."""

    def __init__(self, streams, weights, qk_norm: bool):
        q0 = streams[0][0]
        _check_device(q0)
        self.has_ctx = streams[1] is not None
        self.s0 = _shared_strides(*streams[0])
        self.s1 = _shared_strides(*streams[1]) if self.has_ctx else self.s0
        self.B, self.N0, self.H, self.D = q0.shape
        self.N1 = streams[1][0].shape[1] if self.has_ctx else 0
        self.N = self.N0 + self.N1
        self.w = _weights(weights, self.D, q0, qk_norm)
        da, db, tail = head_split(self.D)
        self.dims = dict(NORM=qk_norm, HAS_CTX=self.has_ctx, HEAD_DIM=self.D, DA=da, DB=db, TAIL=tail)
        self.meta = dict(TUNE_N=triton.next_power_of_2(max(self.N, 1)),
                         PRECISION=_precision(q0.dtype), **self.dims)
        self.qk_norm, self.device, self.dtype = qk_norm, q0.device, q0.dtype
        self.strides = (*_bnh(self.s0[0]), *_bnh(self.s1[0]))

    def empty(self) -> bool:
        return self.B * self.H * self.N == 0

    def weight_partials(self) -> tuple[int, Tensor, Tensor]:
        """(S, dqw, dkw): the weight-gradient partial rows, (streams, B*H, S, D) fp32 each, S slots of
        MIN_BLOCK tokens per (stream, b, h); zeros when there is nothing to launch."""
        S = triton.cdiv(self.N, MIN_BLOCK)
        dqw = _alloc((1 + self.has_ctx, self.B * self.H, S, self.D), torch.float32, self.device)
        dkw = _alloc((1 + self.has_ctx, self.B * self.H, S, self.D), torch.float32, self.device)
        if self.empty():
            dqw.zero_()
            dkw.zero_()
        return S, dqw, dkw

    @staticmethod
    def weight_grads(dqw: Tensor, dkw: Tensor, weights) -> list[Tensor | None]:
        """The partials summed: [dq_weight, dk_weight, dq_weight_ctx, dk_weight_ctx] in the weights' dtypes."""
        sums = [dqw[0].sum((0, 1)), dkw[0].sum((0, 1)), dqw[-1].sum((0, 1)), dkw[-1].sum((0, 1))]
        return [sm.to(wt.dtype) if wt is not None else None for sm, wt in zip(sums, weights)]

    def grid(self, block: str):
        return lambda META: (triton.cdiv(self.N, META[block]), self.B * self.H)

    def prep(self, outs, douts, stats, delta, q_eps: float, k_eps: float, scale: float):
        """-> (qhat, khat) (B*H, N0 + N1, D) scratch; fills rq, rk (forward, outs None) or delta (backward)."""
        qhat = _alloc((self.B * self.H, self.N, self.D), self.dtype, self.device)
        khat = _alloc((self.B * self.H, self.N, self.D), self.dtype, self.device)
        lse, rq, rk = stats.unbind(0) if self.qk_norm else (stats[0],) * 3
        backward = outs is not None
        o0, do0 = (outs[0], douts[0]) if backward else (qhat, qhat)
        o1, do1 = (outs[1], douts[1]) if backward and self.has_ctx else (o0, do0)
        _prep_kernel[(triton.cdiv(self.N, ROWSTAT_ROWS), self.B * self.H)](
            self.s0[0], self.s0[1], self.s1[0], self.s1[1], *self.w, o0, do0, o1, do1, qhat, khat, rq, rk,
            delta if backward else lse, *self.strides, self.H * self.N * self.D, self.D, self.N * self.D,
            self.N0, self.N1, self.H, q_eps, k_eps, scale * LOG2E,
            BACKWARD=backward, BLOCK_R=ROWSTAT_ROWS, num_warps=4, **self.dims)
        return qhat, khat


# ----------------------------------------------------------------------------------------------
# Launchers. Streams are (q, k, v) tuples of (B, N, H, D) views (streams[1] None without context).

def _forward(streams, weights, q_eps: float, k_eps: float, scale: float, qk_norm: bool):
    """-> (out, out_ctx or None, stats): stats (3, B*H, N0 + N1) fp32 = [log2-sum-exp, rq, rk]
    ((1, B*H, N0 + N1): the log2-sum-exp alone without the norm)."""
    L = _Launch(streams, weights, qk_norm)
    out0 = _alloc((L.B, L.N0, L.H * L.D), L.dtype, L.device)
    out1 = _alloc((L.B, L.N1, L.H * L.D), L.dtype, L.device) if L.has_ctx else out0
    stats = _alloc((3 if qk_norm else 1, L.B * L.H, L.N), torch.float32, L.device)
    if not L.empty():
        qhat, khat = L.prep(None, None, stats, None, q_eps, k_eps, scale)
        _attn_fwd_kernel[L.grid("BLOCK_M")](qhat, khat, stats[0], L.s0[2], out0, L.s1[2], out1, *L.strides,
                                            L.N0, L.N1, L.H, **L.meta)
    return out0, out1 if L.has_ctx else None, stats


def _backward(douts, streams, weights, outs, stats, scale: float, qk_norm: bool, grads):
    """grads: per stream a (dq, dk, dv) tuple of preallocated (B, N, H, D) views with shared strides
    (views of one (B, N, 3, H, D) buffer for the packed op). Fills them and returns the four weight
    gradients (in the weights' dtypes; None where the weight is None)."""
    L = _Launch(streams, weights, qk_norm)
    g0 = grads[0]
    g1 = grads[1] if L.has_ctx else g0
    outs = [outs[0], outs[1] if L.has_ctx else outs[0]]
    douts = [d.contiguous() if d is not None else torch.zeros_like(o) for d, o in zip(douts[:1 + L.has_ctx], outs)]
    douts = douts if L.has_ctx else douts * 2
    S, dqw, dkw = L.weight_partials()
    if not L.empty():
        lse, rq, rk = stats.unbind(0) if qk_norm else (stats[0],) * 3
        delta = _alloc((L.B * L.H, L.N), torch.float32, L.device)
        qhat, khat = L.prep(outs, douts, stats, delta, 0.0, 0.0, scale)
        strides = (*_bnh(L.s0[0]), *_bnh(g0[0]), *_bnh(L.s1[0]), *_bnh(g1[0]), L.N0, L.N1, L.H, S)
        _attn_bwd_dkdv_kernel[L.grid("BLOCK_N")](
            qhat, khat, lse, delta, rk, L.s0[1], L.s0[2], douts[0], g0[1], g0[2], L.w[1],
            L.s1[1], L.s1[2], douts[1], g1[1], g1[2], L.w[3], dkw, *strides, 1 / LOG2E, **L.meta)
        _attn_bwd_dq_kernel[L.grid("BLOCK_M")](
            qhat, khat, lse, delta, rq, L.s0[0], L.s0[2], douts[0], g0[0], L.w[0],
            L.s1[0], L.s1[2], douts[1], g1[0], L.w[2], dqw, *strides, scale, **L.meta)
    return L.weight_grads(dqw, dkw, weights) if qk_norm else [None] * 4


# ----------------------------------------------------------------------------------------------
# Custom ops. The packed op takes the (B, N, 3, H, D) projections whole, so that its backward writes
# d(qkv) into one buffer (no stack of dq, dk, dv); the split op takes (B, N, H, D) views. Forward and
# backward of each are opaque to torch.compile, which sees their fake implementations; autograd
# connects them. stats is an output so that setup_context can save it; absent outputs (no context
# stream, weights None) are empty tensors (custom ops return no None).

_EMPTY = (0,)


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_EMPTY)


def _none_if_empty(t: Tensor | None, present: bool) -> Tensor | None:
    return t if present else None


def _stats_shape(q: Tensor, n_ctx: int, qk_norm: bool) -> tuple[int, int, int]:
    B, N, H, _ = q.shape
    return 3 if qk_norm else 1, B * H, N + n_ctx


def _fake_outputs(q: Tensor, q_ctx: Tensor | None, qk_norm: bool):
    B, N, H, D = q.shape
    n_ctx = q_ctx.shape[1] if q_ctx is not None else 0
    out_ctx = q.new_empty((B, n_ctx, H * D)) if q_ctx is not None else q.new_empty(_EMPTY)
    return q.new_empty((B, N, H * D)), out_ctx, q.new_empty(_stats_shape(q, n_ctx, qk_norm), dtype=torch.float32)


def _packed_streams(qkv: Tensor, qkv_ctx: Tensor | None):
    return checks.attention_streams(qkv, qkv_ctx)


@torch.library.custom_op("archirf_kernels::qk_norm_attention", mutates_args=())
def _packed_op(qkv: Tensor, qkv_ctx: Tensor | None, q_weight: Tensor | None, k_weight: Tensor | None,
               q_weight_ctx: Tensor | None, k_weight_ctx: Tensor | None, q_eps: float, k_eps: float,
               scale: float, qk_norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    streams = _packed_streams(qkv, qkv_ctx)
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    _check(streams, weights, qk_norm)
    out, out_ctx, stats = _forward(streams, weights, q_eps, k_eps, scale, qk_norm)
    return out, _empty_if_none(out_ctx, qkv), stats


@_packed_op.register_fake
def _(qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, q_eps, k_eps, scale, qk_norm):
    streams = _packed_streams(qkv, qkv_ctx)
    _check(streams, (q_weight, k_weight, q_weight_ctx, k_weight_ctx), qk_norm)
    return _fake_outputs(streams[0][0], streams[1][0] if streams[1] is not None else None, qk_norm)


@torch.library.custom_op("archirf_kernels::qk_norm_attention_backward", mutates_args=())
def _packed_backward_op(dout: Tensor | None, dout_ctx: Tensor | None, qkv: Tensor, qkv_ctx: Tensor | None,
                        q_weight: Tensor | None, k_weight: Tensor | None, q_weight_ctx: Tensor | None,
                        k_weight_ctx: Tensor | None, out: Tensor, out_ctx: Tensor | None, stats: Tensor,
                        scale: float, qk_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    dqkv_ctx = _alloc(qkv_ctx.shape, qkv_ctx.dtype, qkv_ctx.device) if qkv_ctx is not None else None
    grads = [dqkv.unbind(2), dqkv_ctx.unbind(2) if dqkv_ctx is not None else None]
    dws = _backward((dout, dout_ctx), _packed_streams(qkv, qkv_ctx), weights, (out, out_ctx), stats, scale,
                    qk_norm, grads)
    return (dqkv, _empty_if_none(dqkv_ctx, qkv), *(_empty_if_none(d, qkv) for d in dws))


@_packed_backward_op.register_fake
def _(dout, dout_ctx, qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out, out_ctx, stats,
      scale, qk_norm):
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx) if qk_norm else (None,) * 4
    dqkv_ctx = qkv_ctx.new_empty(qkv_ctx.shape) if qkv_ctx is not None else qkv.new_empty(_EMPTY)
    return (qkv.new_empty(qkv.shape), dqkv_ctx,
            *(w.new_empty(w.shape) if w is not None else qkv.new_empty(_EMPTY) for w in weights))


def _packed_setup_context(ctx, inputs, output):
    qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, _, _, scale, qk_norm = inputs
    out, out_ctx, stats = output
    ctx.save_for_backward(qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out,
                          out_ctx if qkv_ctx is not None else None, stats)
    ctx.scale, ctx.qk_norm = scale, qk_norm
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)   # no zero-filled d(stats); absent output gradients arrive as None


def _packed_backward(ctx, dout, dout_ctx, _dstats):
    qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out, out_ctx, stats = ctx.saved_tensors
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    has_ctx = qkv_ctx is not None
    dqkv, dqkv_ctx, *dws = torch.ops.archirf_kernels.qk_norm_attention_backward(
        dout, dout_ctx if has_ctx else None, qkv, qkv_ctx, *weights, out, out_ctx, stats, ctx.scale, ctx.qk_norm)
    dws = [_none_if_empty(d, w is not None and ctx.qk_norm) for d, w in zip(dws, weights)]
    return (dqkv, _none_if_empty(dqkv_ctx, has_ctx), *dws, None, None, None, None)


_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


@torch.library.custom_op("archirf_kernels::qk_norm_attention_split", mutates_args=())
def _split_op(q: Tensor, k: Tensor, v: Tensor, q_ctx: Tensor | None, k_ctx: Tensor | None, v_ctx: Tensor | None,
              q_weight: Tensor | None, k_weight: Tensor | None, q_weight_ctx: Tensor | None,
              k_weight_ctx: Tensor | None, q_eps: float, k_eps: float, scale: float,
              qk_norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if q_ctx is not None else None]
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    _check(streams, weights, qk_norm)
    out, out_ctx, stats = _forward(streams, weights, q_eps, k_eps, scale, qk_norm)
    return out, _empty_if_none(out_ctx, q), stats


@_split_op.register_fake
def _(q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, q_eps, k_eps, scale, qk_norm):
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if q_ctx is not None else None]
    _check(streams, (q_weight, k_weight, q_weight_ctx, k_weight_ctx), qk_norm)
    return _fake_outputs(q, q_ctx, qk_norm)


@torch.library.custom_op("archirf_kernels::qk_norm_attention_split_backward", mutates_args=())
def _split_backward_op(dout: Tensor | None, dout_ctx: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                       q_ctx: Tensor | None, k_ctx: Tensor | None, v_ctx: Tensor | None,
                       q_weight: Tensor | None, k_weight: Tensor | None, q_weight_ctx: Tensor | None,
                       k_weight_ctx: Tensor | None, out: Tensor, out_ctx: Tensor | None, stats: Tensor,
                       scale: float, qk_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                             Tensor, Tensor, Tensor, Tensor]:
    has_ctx = q_ctx is not None
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if has_ctx else None]
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)

    def grad_buffers(t: Tensor):
        return tuple(_alloc(t.shape, t.dtype, t.device) for _ in range(3))

    grads = [grad_buffers(q), grad_buffers(q_ctx) if has_ctx else None]
    dws = _backward((dout, dout_ctx), streams, weights, (out, out_ctx), stats, scale, qk_norm, grads)
    ctx_grads = grads[1] if has_ctx else tuple(q.new_empty(_EMPTY) for _ in range(3))
    return (*grads[0], *ctx_grads, *(_empty_if_none(d, q) for d in dws))


@_split_backward_op.register_fake
def _(dout, dout_ctx, q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out, out_ctx,
      stats, scale, qk_norm):
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx) if qk_norm else (None,) * 4
    ctx_grads = tuple(t.new_empty(t.shape) if t is not None else q.new_empty(_EMPTY) for t in (q_ctx, k_ctx, v_ctx))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *ctx_grads,
            *(w.new_empty(w.shape) if w is not None else q.new_empty(_EMPTY) for w in weights))


def _split_setup_context(ctx, inputs, output):
    q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, _, _, scale, qk_norm = inputs
    out, out_ctx, stats = output
    ctx.save_for_backward(q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out,
                          out_ctx if q_ctx is not None else None, stats)
    ctx.scale, ctx.qk_norm = scale, qk_norm
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)   # no zero-filled d(stats); absent output gradients arrive as None


def _split_backward(ctx, dout, dout_ctx, _dstats):
    q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, out, out_ctx, stats = \
        ctx.saved_tensors
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    has_ctx = q_ctx is not None
    grads = torch.ops.archirf_kernels.qk_norm_attention_split_backward(
        dout, dout_ctx if has_ctx else None, q, k, v, q_ctx, k_ctx, v_ctx, *weights, out, out_ctx, stats,
        ctx.scale, ctx.qk_norm)
    dws = [_none_if_empty(d, w is not None and ctx.qk_norm) for d, w in zip(grads[6:], weights)]
    ctx_grads = grads[3:6] if has_ctx else (None,) * 3
    return (*grads[:3], *ctx_grads, *dws, None, None, None, None)


_split_op.register_autograd(_split_backward, setup_context=_split_setup_context)


# ----------------------------------------------------------------------------------------------
# The SDPA-backed path (backend="sdpa"): one Triton pass turns the projections into SDPA's operands,
#
#     qhat = q * rq * w_q        khat = k * rk * w_k        vhat = v        (storage dtype)
#
# written (B, N0 + N1, H, D) (the streams end to end), the layout SDPA's cuDNN and flash kernels read
# through a transposed view and whose output merges the heads without a copy; PyTorch's SDPA (cuDNN
# first) on (qhat, khat, vhat); one backward pass through the norm from SDPA's d(qhat), d(khat), d(vhat)
# straight into d(qkv) (packed: one (B, N, 3, H, D) buffer, so autograd stacks nothing) and the weight
# gradients. v is copied so that the pass owns all three operands: a v read by SDPA as a view of qkv
# would reach d(qkv) through a second autograd path (a zero-filled d(qkv) plus a strided stack), which
# on the H200 cost more than the copy (benchmarks/profile_attention.py). The joint streams are
# concatenated by the same pass.
#
# Both passes enumerate rows = (b, n, h) flattened, BLOCK_R consecutive rows per program: the heads of
# one token lie next to each other in every operand, so a program reads and writes contiguous memory
# (one program per (b, h) walking tokens would stride over H * D). The weight gradients are reduced
# per program and stream into fp32 partial rows, summed by torch (no atomics: the same bits every run).

# Launch shapes of the sdpa backend's passes ((token, head) rows per block, warps; the backward's
# programs per SM), from benchmarks/profile_attention.py --prep-sweep on the H200 (bf16, the four
# benchmark shapes).
PREP_ROWS = 32
PREP_WARPS = 4
PREP_BWD_ROWS = 16
PREP_BWD_WARPS = 4
PREP_BWD_PER_SM = 4


@triton.jit
def _token_rows(pid, N0, N1, H, n_rows, s0_b, s0_n, s0_h, s1_b, s1_n, s1_h, HAS_CTX: tl.constexpr,
                BLOCK_R: tl.constexpr, ALIGN: tl.constexpr):
    """A program's rows of the flattened (b, n, h) grid over [img, ctx]: (rows, mask, whether each is in
    stream 0, b, n, h, the row's offset in its stream's (B, N, H, D) view (s0_* strides; s1_* for ctx))."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)     # pid * BLOCK_R < n_rows + BLOCK_R: int32
    mask = rows < n_rows
    h = rows % H
    t = rows // H
    N = N0 + N1
    n = t % N
    b = t // N
    first = n < N0
    off = b * s0_b + n * s0_n + h * s0_h
    if HAS_CTX:
        off = tl.where(first, off, b * s1_b + (n - N0) * s1_n + h * s1_h)
    return rows, mask, first, b, n, h, tl.multiple_of(off, ALIGN)


@triton.jit
def _sel(X0, X1, off, first, HAS_CTX: tl.constexpr):
    """Per row, the pointer into stream 0's or stream 1's tensor."""
    if HAS_CTX:
        return tl.where(first, X0 + off, X1 + off)
    return X0 + off


@triton.jit
def _row_weight(W0, W1, first, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                HAS_CTX: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    w = tl.load(W0 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :]
    if HAS_CTX:
        w = tl.where(first[:, None], w, tl.load(W1 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :])
    return w


@triton.jit
def _rows_prep_kernel(
    Q0, K0, V0, Q1, K1, V1, QW0, KW0, QW1, KW1,   # each stream's q, k, v (B, N, H, D) views; fp32 weights
    QH, KH, VH, RQ, RK,                           # (B, N0 + N1, H, D) contiguous; (B * (N0 + N1) * H,) fp32
    s0_b, s0_n, s0_h, s1_b, s1_n, s1_h, N0, N1, H, n_rows, q_eps, k_eps,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_R: tl.constexpr, ALIGN: tl.constexpr,
):
    rows, mask, first, _, _, _, off = _token_rows(tl.program_id(0), N0, N1, H, n_rows, s0_b, s0_n, s0_h, s1_b,
                                                  s1_n, s1_h, HAS_CTX, BLOCK_R, ALIGN)
    dst = rows * HEAD_DIM
    va, vb = _load_tile(_sel(V0, V1, off, first, HAS_CTX), mask, True, HEAD_DIM, DA, DB, TAIL)
    qa, qb = _load_tile(_sel(Q0, Q1, off, first, HAS_CTX), mask, True, HEAD_DIM, DA, DB, TAIL)
    ka, kb = _load_tile(_sel(K0, K1, off, first, HAS_CTX), mask, True, HEAD_DIM, DA, DB, TAIL)
    _store_tile(VH + dst, mask, va, vb, HEAD_DIM, DA, DB, TAIL)      # after every load (see the backward)
    if NORM:
        rq = tl.math.rsqrt(_row_dot(qa, qb, qa, qb, TAIL) / HEAD_DIM + q_eps)
        rk = tl.math.rsqrt(_row_dot(ka, kb, ka, kb, TAIL) / HEAD_DIM + k_eps)
        tl.store(RQ + rows, rq, mask=mask)
        tl.store(RK + rows, rk, mask=mask)
        qa = qa.to(tl.float32) * rq[:, None] * _row_weight(QW0, QW1, first, 0, DA, HEAD_DIM, HAS_CTX)
        ka = ka.to(tl.float32) * rk[:, None] * _row_weight(KW0, KW1, first, 0, DA, HEAD_DIM, HAS_CTX)
        if TAIL:
            qb = qb.to(tl.float32) * rq[:, None] * _row_weight(QW0, QW1, first, DA, DB, HEAD_DIM, HAS_CTX)
            kb = kb.to(tl.float32) * rk[:, None] * _row_weight(KW0, KW1, first, DA, DB, HEAD_DIM, HAS_CTX)
    _store_tile(QH + dst, mask, qa, qb, HEAD_DIM, DA, DB, TAIL)
    _store_tile(KH + dst, mask, ka, kb, HEAD_DIM, DA, DB, TAIL)


@triton.jit
def _split_acc(acc0, acc1, g, first, HAS_CTX: tl.constexpr):
    """Add the rows' terms g to stream 0's accumulator and (with a context stream) stream 1's."""
    if HAS_CTX:
        return acc0 + tl.where(first[:, None], g, 0.0), acc1 + tl.where(first[:, None], 0.0, g)
    return acc0 + g, acc1


@triton.jit
def _stream_weights(W0, W1, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_CTX: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of both streams' (D,) fp32 weights as (1, WIDTH) rows (stream 1's
    is stream 0's without a context stream): loaded once, before a persistent program's loop."""
    cols = COL0 + tl.arange(0, WIDTH)
    w0 = tl.load(W0 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :]
    w1 = w0
    if HAS_CTX:
        w1 = tl.load(W1 + cols, mask=cols < HEAD_DIM, other=0.0)[None, :]
    return w0, w1


@triton.jit
def _pick(w0, w1, first, HAS_CTX: tl.constexpr):
    """Per row, its stream's weight row: (1 or rows, WIDTH)."""
    w = w0
    if HAS_CTX:
        w = tl.where(first[:, None], w0, w1)
    return w


@triton.jit
def _norm_grad(da, db, xa, xb, r, w0a, w1a, w0b, w1b, acc0a, acc1a, acc0b, acc1b, first, HAS_CTX: tl.constexpr,
               HEAD_DIM: tl.constexpr, TAIL: tl.constexpr):
    """d(xhat) (da, db) through xhat = x * r * w into dx = r * (dn - xn * mean_D(xn * dn)), dn = d(xhat) * w,
    xn = x * r; registers only (the caller has issued every load of the block before any store). The
    rows' weight-gradient terms d(xhat) * xn (zero in masked rows, whose loads gave 0) are added to the
    per-stream, per-column-part fp32 accumulators. -> (dxa, dxb, accumulators)."""
    da = da.to(tl.float32)
    xna = xa.to(tl.float32) * r[:, None]
    dna = da * _pick(w0a, w1a, first, HAS_CTX)
    dot = tl.sum(xna * dna, 1)
    acc0a, acc1a = _split_acc(acc0a, acc1a, da * xna, first, HAS_CTX)
    xnb, dnb = xna, dna
    if TAIL:
        db = db.to(tl.float32)
        xnb = xb.to(tl.float32) * r[:, None]
        dnb = db * _pick(w0b, w1b, first, HAS_CTX)
        dot += tl.sum(xnb * dnb, 1)
        acc0b, acc1b = _split_acc(acc0b, acc1b, db * xnb, first, HAS_CTX)
    mean = (dot / HEAD_DIM)[:, None]
    return r[:, None] * (dna - xna * mean), r[:, None] * (dnb - xnb * mean), acc0a, acc1a, acc0b, acc1b


@triton.jit
def _store_partial(DW, slot, acc, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(DW + slot * HEAD_DIM + cols, tl.sum(acc, 0), mask=cols < HEAD_DIM)


@triton.jit
def _store_partials(DW, slot, acc0a, acc1a, acc0b, acc1b, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr,
                    DA: tl.constexpr, DB: tl.constexpr, TAIL: tl.constexpr):
    """A program's accumulators, summed over rows, into its partial rows (slot: stream 0, slot + 1: 1)."""
    _store_partial(DW, slot, acc0a, 0, DA, HEAD_DIM)
    if TAIL:
        _store_partial(DW, slot, acc0b, DA, DB, HEAD_DIM)
    if HAS_CTX:
        _store_partial(DW, slot + 1, acc1a, 0, DA, HEAD_DIM)
        if TAIL:
            _store_partial(DW, slot + 1, acc1b, DA, DB, HEAD_DIM)


@triton.jit
def _rows_prep_bwd_kernel(
    DQH, DKH, DVH,                          # d(qhat), d(khat), d(vhat): (B, N0 + N1, H, D) views
    Q0, K0, Q1, K1, DQ0, DK0, DV0, DQ1, DK1, DV1, RQ, RK, QW0, KW0, QW1, KW1, DQW, DKW,
    dq_b, dq_n, dq_h, dk_b, dk_n, dk_h, dv_b, dv_n, dv_h,
    s0_b, s0_n, s0_h, g0_b, g0_n, g0_h,     # strides of stream 0's q, k and of their gradients
    s1_b, s1_n, s1_h, g1_b, g1_n, g1_h,
    N0, N1, H, n_rows, n_blocks,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    TAIL: tl.constexpr, BLOCK_R: tl.constexpr, ALIGN: tl.constexpr,
):
    """Persistent: each program walks row blocks pid, pid + programs, ... and keeps the weight-gradient
    terms in 2-D fp32 accumulators, reduced over rows once at the end into its partial rows of DQW, DKW
    (programs, streams, D), so the partials to sum are a few rows per SM rather than one per block. (On
    the H200 this ran no faster than one partial row per block: what had slowed the D = 72 pass was
    unvectorised access, fixed by ALIGN.)"""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    q0a = tl.zeros([BLOCK_R, DA], tl.float32)
    q0b = tl.zeros([BLOCK_R, DB], tl.float32)
    q1a, k0a, k1a = q0a, q0a, q0a
    q1b, k0b, k1b = q0b, q0b, q0b
    if NORM:
        wq0a, wq1a = _stream_weights(QW0, QW1, 0, DA, HEAD_DIM, HAS_CTX)
        wk0a, wk1a = _stream_weights(KW0, KW1, 0, DA, HEAD_DIM, HAS_CTX)
        wq0b, wq1b, wk0b, wk1b = wq0a, wq1a, wk0a, wk1a
        if TAIL:
            wq0b, wq1b = _stream_weights(QW0, QW1, DA, DB, HEAD_DIM, HAS_CTX)
            wk0b, wk1b = _stream_weights(KW0, KW1, DA, DB, HEAD_DIM, HAS_CTX)
    for blk in range(pid, n_blocks, programs):
        rows, mask, first, b, n, h, off = _token_rows(blk, N0, N1, H, n_rows, s0_b, s0_n, s0_h, s1_b, s1_n, s1_h,
                                                      HAS_CTX, BLOCK_R, ALIGN)
        goff = b * g0_b + n * g0_n + h * g0_h
        if HAS_CTX:
            goff = tl.where(first, goff, b * g1_b + (n - N0) * g1_n + h * g1_h)
        goff = tl.multiple_of(goff, ALIGN)
        # Every load of the block before its first store: a store may alias a later load as far as the
        # compiler knows, so loads after it would wait for it, one latency per tensor.
        dva, dvb = _load_tile(DVH + tl.multiple_of(b * dv_b + n * dv_n + h * dv_h, ALIGN), mask, True, HEAD_DIM, DA,
                              DB, TAIL)
        dqa, dqb = _load_tile(DQH + tl.multiple_of(b * dq_b + n * dq_n + h * dq_h, ALIGN), mask, True, HEAD_DIM, DA,
                              DB, TAIL)
        dka, dkb = _load_tile(DKH + tl.multiple_of(b * dk_b + n * dk_n + h * dk_h, ALIGN), mask, True, HEAD_DIM, DA,
                              DB, TAIL)
        if NORM:
            rq = tl.load(RQ + rows, mask=mask, other=0.0)
            rk = tl.load(RK + rows, mask=mask, other=0.0)
            qa, qb = _load_tile(_sel(Q0, Q1, off, first, HAS_CTX), mask, True, HEAD_DIM, DA, DB, TAIL)
            ka, kb = _load_tile(_sel(K0, K1, off, first, HAS_CTX), mask, True, HEAD_DIM, DA, DB, TAIL)
            dqa, dqb, q0a, q1a, q0b, q1b = _norm_grad(dqa, dqb, qa, qb, rq, wq0a, wq1a, wq0b, wq1b, q0a, q1a, q0b,
                                                      q1b, first, HAS_CTX, HEAD_DIM, TAIL)
            dka, dkb, k0a, k1a, k0b, k1b = _norm_grad(dka, dkb, ka, kb, rk, wk0a, wk1a, wk0b, wk1b, k0a, k1a, k0b,
                                                      k1b, first, HAS_CTX, HEAD_DIM, TAIL)
        _store_tile(_sel(DV0, DV1, goff, first, HAS_CTX), mask, dva, dvb, HEAD_DIM, DA, DB, TAIL)
        _store_tile(_sel(DQ0, DQ1, goff, first, HAS_CTX), mask, dqa, dqb, HEAD_DIM, DA, DB, TAIL)
        _store_tile(_sel(DK0, DK1, goff, first, HAS_CTX), mask, dka, dkb, HEAD_DIM, DA, DB, TAIL)
    if NORM:
        slot = pid.to(tl.int64) * (1 + HAS_CTX)
        _store_partials(DQW, slot, q0a, q1a, q0b, q1b, HAS_CTX, HEAD_DIM, DA, DB, TAIL)
        _store_partials(DKW, slot, k0a, k1a, k0b, k1b, HAS_CTX, HEAD_DIM, DA, DB, TAIL)


def _align(tensors) -> int:
    """The largest power of two, up to 16 bytes' worth of elements, dividing every (B, N, H) stride and
    the address (in elements) of every tensor: the row offsets' divisibility, passed as the ALIGN
    constexpr so that the compiler vectorises the rows' loads and stores. Triton specialises only
    integers divisible by 16; DiT-XL's head stride 72 is not, and without the hint the D = 72 backward
    ran several times slower (docs/kernels.md)."""
    g = 16 // tensors[0].element_size()
    for t in tensors:
        g = math.gcd(g, t.data_ptr() // t.element_size(), *_bnh(t))
    return g & -g if g else 1


_SMS: dict = {}


def _bwd_programs(n_blocks: int, device: torch.device) -> int:
    """The backward's persistent grid: PREP_BWD_PER_SM programs per SM (the interpreter: a few, so that
    the CPU tests walk several blocks per program), never more than there are blocks."""
    if INTERPRETED or device.type != "cuda":
        return max(1, min(n_blocks, 3))
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, _SMS[device] * PREP_BWD_PER_SM))


def _prep_forward(streams, weights, q_eps: float, k_eps: float, qk_norm: bool):
    """-> qhat, khat, vhat (B, N0 + N1, H, D) in the storage dtype, rstats (2, B * (N0 + N1) * H) fp32
    ([rq, rk]; (2, 0) without the norm)."""
    L = _Launch(streams, weights, qk_norm)
    hats = [_alloc((L.B, L.N, L.H, L.D), L.dtype, L.device) for _ in range(3)]
    n_rows = L.B * L.N * L.H
    rstats = _alloc((2, n_rows if qk_norm else 0), torch.float32, L.device)
    rq, rk = (rstats[0], rstats[1]) if qk_norm else (hats[0], hats[0])
    if not L.empty():
        (q0, k0, v0), (q1, k1, v1) = L.s0, L.s1
        _rows_prep_kernel[(triton.cdiv(n_rows, PREP_ROWS),)](
            q0, k0, v0, q1, k1, v1, *L.w, *hats, rq, rk, *L.strides, L.N0, L.N1, L.H, n_rows, q_eps, k_eps,
            BLOCK_R=PREP_ROWS, ALIGN=_align([*L.s0, *L.s1]), num_warps=PREP_WARPS, **L.dims)
    return (*hats, rstats)


def _prep_backward(dhats, streams, weights, rstats, grads, qk_norm: bool) -> Tensor:
    """dhats: d(qhat), d(khat), d(vhat) (None: zero); grads: per stream a (dq, dk, dv) triple of
    preallocated (B, N, H, D) views with shared strides. Fills them and returns the weight gradients as
    one fp32 tensor (2 = [q, k], streams, D), summed from the programs' partial rows by one reduction
    ((0,) without the norm)."""
    L = _Launch(streams, weights, qk_norm)
    g0 = grads[0]
    g1 = grads[1] if L.has_ctx else g0
    shape = (L.B, L.N, L.H, L.D)
    dhats = [_unit_d(d) if d is not None else torch.zeros(shape, dtype=L.dtype, device=L.device) for d in dhats]
    n_rows = L.B * L.N * L.H
    n_blocks = triton.cdiv(n_rows, PREP_BWD_ROWS)
    programs = _bwd_programs(n_blocks, L.device)
    partials = _alloc((2, programs, 1 + L.has_ctx, L.D), torch.float32, L.device)     # [q, k]
    rq, rk = (rstats[0], rstats[1]) if qk_norm else (partials, partials)
    if not L.empty():
        _rows_prep_bwd_kernel[(programs,)](
            *dhats, L.s0[0], L.s0[1], L.s1[0], L.s1[1], *g0, *g1, rq, rk, *L.w, partials[0], partials[1],
            *(s for d in dhats for s in _bnh(d)), *_bnh(L.s0[0]), *_bnh(g0[0]), *_bnh(L.s1[0]), *_bnh(g1[0]),
            L.N0, L.N1, L.H, n_rows, n_blocks, BLOCK_R=PREP_BWD_ROWS,
            ALIGN=_align([*L.s0, *L.s1, *g0, *g1, *dhats]), num_warps=PREP_BWD_WARPS, **L.dims)
    elif qk_norm:
        partials.zero_()
    return partials.sum(1) if qk_norm else partials.new_empty(_EMPTY)


def _weight_grads(dw: Tensor, weights, qk_norm: bool) -> list[Tensor | None]:
    """The backward op's (2, streams, D) weight gradients as [dq_weight, dk_weight, dq_weight_ctx,
    dk_weight_ctx] in the weights' dtypes (None where a weight is None or without the norm)."""
    if not qk_norm:
        return [None] * 4
    grads = [dw[0, 0], dw[1, 0], dw[0, -1], dw[1, -1]]
    return [g.to(w.dtype) if w is not None else None for g, w in zip(grads, weights)]


def _prep_fake(q: Tensor, q_ctx: Tensor | None, qk_norm: bool):
    B, N, H, D = q.shape
    N += q_ctx.shape[1] if q_ctx is not None else 0
    return (*(q.new_empty((B, N, H, D)) for _ in range(3)),
            q.new_empty((2, B * N * H if qk_norm else 0), dtype=torch.float32))


def _weight_grads_fake(qkv_ctx: Tensor | None, qk_norm: bool, like: Tensor) -> Tensor:
    if not qk_norm:
        return like.new_empty(_EMPTY, dtype=torch.float32)
    return like.new_empty((2, 1 + (qkv_ctx is not None), like.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("archirf_kernels::qkv_prep", mutates_args=())
def _prep_packed_op(qkv: Tensor, qkv_ctx: Tensor | None, q_weight: Tensor | None, k_weight: Tensor | None,
                    q_weight_ctx: Tensor | None, k_weight_ctx: Tensor | None, q_eps: float, k_eps: float,
                    qk_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    streams = _packed_streams(qkv, qkv_ctx)
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    _check(streams, weights, qk_norm)
    return _prep_forward(streams, weights, q_eps, k_eps, qk_norm)


@_prep_packed_op.register_fake
def _(qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, q_eps, k_eps, qk_norm):
    streams = _packed_streams(qkv, qkv_ctx)
    _check(streams, (q_weight, k_weight, q_weight_ctx, k_weight_ctx), qk_norm)
    return _prep_fake(streams[0][0], streams[1][0] if streams[1] is not None else None, qk_norm)


@torch.library.custom_op("archirf_kernels::qkv_prep_backward", mutates_args=())
def _prep_packed_backward_op(dqhat: Tensor | None, dkhat: Tensor | None, dvhat: Tensor | None, qkv: Tensor,
                             qkv_ctx: Tensor | None, q_weight: Tensor | None, k_weight: Tensor | None,
                             q_weight_ctx: Tensor | None, k_weight_ctx: Tensor | None, rstats: Tensor,
                             qk_norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    dqkv_ctx = _alloc(qkv_ctx.shape, qkv_ctx.dtype, qkv_ctx.device) if qkv_ctx is not None else None
    grads = [dqkv.unbind(2), dqkv_ctx.unbind(2) if dqkv_ctx is not None else None]
    dw = _prep_backward((dqhat, dkhat, dvhat), _packed_streams(qkv, qkv_ctx), weights, rstats, grads, qk_norm)
    return dqkv, _empty_if_none(dqkv_ctx, qkv), dw


@_prep_packed_backward_op.register_fake
def _(dqhat, dkhat, dvhat, qkv, qkv_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, rstats, qk_norm):
    dqkv_ctx = qkv_ctx.new_empty(qkv_ctx.shape) if qkv_ctx is not None else qkv.new_empty(_EMPTY)
    return qkv.new_empty(qkv.shape), dqkv_ctx, _weight_grads_fake(qkv_ctx, qk_norm, qkv)


def _prep_setup_context(n_tensors: int):
    """setup_context of a prep op whose first n_tensors inputs are the tensors its backward needs,
    followed by q_eps, k_eps, qk_norm."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors], output[3])
        ctx.qk_norm = inputs[n_tensors + 2]
        ctx.mark_non_differentiable(output[3])
        ctx.set_materialize_grads(False)   # no zero-filled d(rstats); absent gradients arrive as None
    return setup_context


def _prep_packed_backward(ctx, dqhat, dkhat, dvhat, _drstats):
    qkv, qkv_ctx, *weights, rstats = ctx.saved_tensors
    has_ctx = qkv_ctx is not None
    dqkv, dqkv_ctx, dw = torch.ops.archirf_kernels.qkv_prep_backward(dqhat, dkhat, dvhat, qkv, qkv_ctx, *weights,
                                                                      rstats, ctx.qk_norm)
    return (dqkv, _none_if_empty(dqkv_ctx, has_ctx), *_weight_grads(dw, weights, ctx.qk_norm), None, None, None)


_prep_packed_op.register_autograd(_prep_packed_backward, setup_context=_prep_setup_context(6))


@torch.library.custom_op("archirf_kernels::qkv_prep_split", mutates_args=())
def _prep_split_op(q: Tensor, k: Tensor, v: Tensor, q_ctx: Tensor | None, k_ctx: Tensor | None,
                   v_ctx: Tensor | None, q_weight: Tensor | None, k_weight: Tensor | None,
                   q_weight_ctx: Tensor | None, k_weight_ctx: Tensor | None, q_eps: float, k_eps: float,
                   qk_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if q_ctx is not None else None]
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    _check(streams, weights, qk_norm)
    return _prep_forward(streams, weights, q_eps, k_eps, qk_norm)


@_prep_split_op.register_fake
def _(q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, q_eps, k_eps, qk_norm):
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if q_ctx is not None else None]
    _check(streams, (q_weight, k_weight, q_weight_ctx, k_weight_ctx), qk_norm)
    return _prep_fake(q, q_ctx, qk_norm)


@torch.library.custom_op("archirf_kernels::qkv_prep_split_backward", mutates_args=())
def _prep_split_backward_op(dqhat: Tensor | None, dkhat: Tensor | None, dvhat: Tensor | None, q: Tensor, k: Tensor,
                            v: Tensor, q_ctx: Tensor | None, k_ctx: Tensor | None, v_ctx: Tensor | None,
                            q_weight: Tensor | None, k_weight: Tensor | None, q_weight_ctx: Tensor | None,
                            k_weight_ctx: Tensor | None, rstats: Tensor,
                            qk_norm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    has_ctx = q_ctx is not None
    streams = [(q, k, v), (q_ctx, k_ctx, v_ctx) if has_ctx else None]
    weights = (q_weight, k_weight, q_weight_ctx, k_weight_ctx)
    grads = [tuple(_alloc(q.shape, q.dtype, q.device) for _ in range(3)),
             tuple(_alloc(q_ctx.shape, q.dtype, q.device) for _ in range(3)) if has_ctx else None]
    dw = _prep_backward((dqhat, dkhat, dvhat), streams, weights, rstats, grads, qk_norm)
    ctx_grads = grads[1] if has_ctx else tuple(q.new_empty(_EMPTY) for _ in range(3))
    return (*grads[0], *ctx_grads, dw)


@_prep_split_backward_op.register_fake
def _(dqhat, dkhat, dvhat, q, k, v, q_ctx, k_ctx, v_ctx, q_weight, k_weight, q_weight_ctx, k_weight_ctx, rstats,
      qk_norm):
    ctx_grads = tuple(t.new_empty(t.shape) if t is not None else q.new_empty(_EMPTY) for t in (q_ctx, k_ctx, v_ctx))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *ctx_grads,
            _weight_grads_fake(q_ctx, qk_norm, q))


def _prep_split_backward(ctx, dqhat, dkhat, dvhat, _drstats):
    q, k, v, q_ctx, k_ctx, v_ctx, *weights, rstats = ctx.saved_tensors
    has_ctx = q_ctx is not None
    grads = torch.ops.archirf_kernels.qkv_prep_split_backward(dqhat, dkhat, dvhat, q, k, v, q_ctx, k_ctx, v_ctx,
                                                               *weights, rstats, ctx.qk_norm)
    return (*grads[:3], *(grads[3:6] if has_ctx else (None,) * 3), *_weight_grads(grads[6], weights, ctx.qk_norm),
            None, None, None)


_prep_split_op.register_autograd(_prep_split_backward, setup_context=_prep_setup_context(10))


def _sdpa_enabled() -> tuple[bool, bool, bool, bool]:
    """Which of cuDNN, flash, memory-efficient and math attention the caller leaves on (an outer sdpa_kernel or
    torch.backends.cuda.enable_*_sdp). Under torch.compile it is read once, when the code is traced."""
    c = torch.backends.cuda
    return c.cudnn_sdp_enabled(), c.flash_sdp_enabled(), c.mem_efficient_sdp_enabled(), c.math_sdp_enabled()


# torch.compiler.assume_constant_result(_sdpa_enabled), which sets only this flag, without importing dynamo (and
# with it inductor) when the library is imported; a trace could not read the flags otherwise (fullgraph: the
# sdpa backend's compile tests fail if this stops working)
_sdpa_enabled._dynamo_marked_constant = True


def _sdpa_order():
    """The SDPA backends the caller leaves on, cuDNN first: faster than flash in the attention benchmark
    (docs/kernels.md); a backend that declines a shape passes it on to the next. Under
    torch.use_deterministic_algorithms flash comes first, as in PyTorch's own order (its backward has a
    deterministic mode; cuDNN's is not documented to). A backend the caller turned off stays off."""
    from torch.nn.attention import SDPBackend
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    order = [b for b, on in zip(order, _sdpa_enabled()) if on]
    if torch.are_deterministic_algorithms_enabled() and SDPBackend.FLASH_ATTENTION in order:
        order.remove(SDPBackend.FLASH_ATTENTION)
        order.insert(0, SDPBackend.FLASH_ATTENTION)
    return order


def _sdpa_call(qkv, qkv_ctx, streams, weights, eps, scale: float, qk_norm):
    """backend='sdpa': the prep pass, SDPA, the heads merged; -> (out, out_ctx or None)."""
    from torch.nn.attention import sdpa_kernel

    (q, k, v), ctx = streams
    if isinstance(qkv, Tensor):
        qh, kh, vh, _ = torch.ops.archirf_kernels.qkv_prep(qkv, qkv_ctx, *weights, *eps, qk_norm)
    else:
        qc, kc, vc = ctx if ctx is not None else (None, None, None)
        qh, kh, vh, _ = torch.ops.archirf_kernels.qkv_prep_split(q, k, v, qc, kc, vc, *weights, *eps, qk_norm)
    B, N, H, D = qh.shape
    order = _sdpa_order()
    with sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext():    # none on: SDPA says so
        out = F.scaled_dot_product_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), scale=scale)
    out = out.transpose(1, 2).reshape(B, N, H * D)                     # (B, N0 + N1, H*D)
    if ctx is None:
        return out, None
    n0 = q.shape[1]
    img, txt = out.split([n0, N - n0], 1)          # backward: one concatenation (slices would each zero-fill)
    return img, txt


BACKENDS = ATTENTION_BACKENDS


FUSED_MAX_TOKENS = 512     # auto: the fused kernels up to this many tokens (power-of-two head dims <= 64)


def choose_backend(backend: str, n_tokens: int, joint: bool, head_dim: int) -> str:
    """'fused' | 'sdpa' for a call over n_tokens tokens in all (joint or not) with this head dim. 'auto',
    from bf16 fwd+bwd measurements of both backends (benchmarks/results/nvidia-h100-80gb-hbm3/
    attention_short_sequences.txt and nvidia-h200/attention.json):
      - fused for head dims 16, 32, 64 (measured at 64; 16 and 32 are tiled the same way, without a
        masked tail) up to FUSED_MAX_TOKENS tokens: faster at MMDiT-XL/2's single-stream shape, a tie
        at its joint shape, and no normalised copies kept: the less memory.
      - sdpa otherwise: faster at 1024 tokens and more, and for DiT-XL's head dim 72 even at 256
        tokens, where the fused kernels tile 72 as 64 + 16.
    The numbers are in docs/kernels.md.
    The fused kernels keep less activation memory (no qhat, khat, vhat held for SDPA's backward: three
    (B, N, H, D) tensors per call): backend='fused' where memory, not time, is the limit."""
    if backend not in BACKENDS:
        raise ValueError(f"archirf_kernels attention: unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "fused" if head_dim in (16, 32, 64) and n_tokens <= FUSED_MAX_TOKENS else "sdpa"


# ----------------------------------------------------------------------------------------------
# Differentiable entry points (archirf_kernels.* dispatches here for impl="triton").

def _call(qkv, qkv_ctx, weights, eps, scale, qk_norm, backend):
    q_eps, k_eps = qk_eps(eps)
    packed = isinstance(qkv, Tensor)
    streams = checks.attention_streams(qkv, qkv_ctx)
    (q, k, v), ctx = streams
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if choose_backend(backend, q.shape[1] + (ctx[0].shape[1] if ctx else 0), ctx is not None, q.shape[-1]) == "sdpa":
        return (*_sdpa_call(qkv, qkv_ctx, streams, weights, (q_eps, k_eps), scale, qk_norm), None)
    if packed:
        return torch.ops.archirf_kernels.qk_norm_attention(qkv, qkv_ctx, *weights, q_eps, k_eps, scale, qk_norm)
    qc, kc, vc = ctx if ctx else (None, None, None)
    return torch.ops.archirf_kernels.qk_norm_attention_split(q, k, v, qc, kc, vc, *weights, q_eps, k_eps, scale,
                                                               qk_norm)


def qk_norm_attention(qkv, q_weight: Tensor | None = None, k_weight: Tensor | None = None,
                      eps: float | tuple[float, float] = 1e-6, scale: float | None = None,
                      qk_norm: bool = True, backend: str = "auto") -> Tensor:
    return _call(qkv, None, (q_weight, k_weight, None, None), eps, scale, qk_norm, backend)[0]


def joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img: Tensor | None = None, k_weight_img: Tensor | None = None,
                            q_weight_ctx: Tensor | None = None, k_weight_ctx: Tensor | None = None,
                            eps: float | tuple[float, float] = 1e-6, scale: float | None = None,
                            qk_norm: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    out, out_ctx, _ = _call(qkv_img, qkv_ctx, (q_weight_img, k_weight_img, q_weight_ctx, k_weight_ctx), eps, scale,
                            qk_norm, backend)
    return out, out_ctx

