"""Fused QK-RMSNorm + flash attention, forward and backward, for DiT and MMDiT joint attention.

    out = softmax(N_q(q) N_k(k)^T * scale) v          N_x(x) = x / sqrt(mean_D(x^2) + eps) * w_x

reference.qk_norm_attention and reference.joint_qk_norm_attention are the spec. Input straight from
the qkv projection, (B, N, 3, H, D) (or separate (B, N, H, D) q, k, v views with any strides, unit
stride over D); output (B, N, H*D), the heads merged, ready for the output projection; no permute
copies on the way in or out. Joint attention (SD3's MMDiT): a second stream (context tokens) with its
own qkv and norm weights; queries of both streams attend to the keys [img, ctx] without the
concatenation ever existing in memory. qk_norm=False compiles the norm out (NORM constexpr): the same
kernels then serve plain attention. Storage fp16 / bf16 / fp32 (fp32: IEEE dots, no TF32), all math
and accumulation in fp32, outputs in the storage dtype, weight gradients in the weights' dtype.

How the norm is fused. Write qn = q * rq and kn = k * rk for the unit-RMS rows (rq, rk: one rstd per
token and head) and w = w_q * w_k. The score of query i and key j is

    S_ij = scale * (qn_i * w_q) . (kn_j * w_k) = rq_i * rk_j * scale * sum_d q_id w_d k_jd,

so the weights and the softmax scale fold into the operand a program holds fixed -- its query
block in the forward and dq kernels, its key block in the dk/dv kernel -- once per program and key
(query) stream, and the streamed operand goes into the dot product raw, straight from memory as in
plain flash attention; its rstd scales the score tile (one multiply per score, which the base-2
softmax needs anyway for the scale). rq is computed by the forward's query programs from the tile
they load; rk by a small pre-pass over the keys (the forward needs every key's rstd in every
program); both are saved for the backward, which never recomputes a row statistic. The softmax runs
in base 2: scale * log2(e) is folded in as well, and the saved log-sum-exp is in log2 units.

Grids. Forward and dq: one program per (query block of BLOCK_M tokens, b * H + h), the query blocks
of the image stream first, then the context's; dk/dv: one per (key block of BLOCK_N, b * H + h).
The key (query) loop walks the image stream then the context stream with two pointer sets; each
stream's full tiles run unmasked and its last partial tile masked. Head dims that are not a power of
two (DiT-XL's 72) are masked to BLOCK_D = next power of two inside the kernels: no padded copies.
The gradients of the (D,) weights are reduced per program into fp32 partial rows, one per MIN_BLOCK
tokens (a program of a larger block writes zeros into its other slots, so the layout is the same for
every autotuned block size), and summed by torch: no atomics, same bits every run.

Registered as torch.library custom ops (archirf_kernels::qk_norm_attention for the packed qkv,
archirf_kernels::qk_norm_attention_split for separate q, k, v) with fake and autograd
implementations, so torch.compile(fullgraph=True) traces through a model that uses them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import qk_eps, unpack_qkv

Tensor = torch.Tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MIN_BLOCK = 16          # the smallest BLOCK_M / BLOCK_N of any config: one dw partial slot per this many tokens
_MIN_BLOCK = tl.constexpr(MIN_BLOCK)
RSTD_ROWS = 64          # tokens per program of the rk pre-pass


# ----------------------------------------------------------------------------------------------
# Block sizes. Autotuned per (TUNE_N = next power of 2 of the total tokens, HEAD_DIM, NORM, HAS_CTX)
# and, implicitly (Triton appends every tensor argument's dtype to the key), the storage dtype.
# Candidates for H100 / A100 (sm80+): per kernel two (BLOCK_M queries, BLOCK_N keys, warps,
# stages), separately for BLOCK_D <= 64 and for BLOCK_D = 128 (D = 72 or 128), chosen among the
# configs that ptxas compiles for sm_90a without (or with few bytes of) register spills -- few,
# because every candidate costs a compile of several seconds on the first call: the
# forward keeps 128 queries x 64-128 keys on 8 warps (FlashAttention-2's split, Dao 2023, Sec. 3.3);
# the backward kernels hold 2-3 fp32 accumulators of their fixed block, so they take the smaller
# tiles of FlashAttention-2's backward (Triton tutorial 06: 128 keys x 32 queries for dk/dv).
# The first config of each list is the untuned default (ARCHIRF_ATTN_AUTOTUNE=0: no tuning, e.g. for
# numerics tests, as autotuning compiles every candidate). The interpreter gets one 16 x 16 config
# so that the CPU tests are fast and cover multi-tile loops and partial blocks.

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("ARCHIRF_ATTN_AUTOTUNE", "1") != "0"
TUNE_KEY = ["TUNE_N", "HEAD_DIM", "NORM", "HAS_CTX"]

#          BLOCK_D <= 64                            BLOCK_D = 128
#          (BLOCK_M, BLOCK_N, warps, stages)
FWD_CANDIDATES = ([(128, 64, 8, 3), (128, 128, 8, 3)], [(128, 64, 8, 3), (64, 64, 4, 3)])
DQ_CANDIDATES = ([(64, 64, 8, 3), (128, 64, 8, 3)], [(64, 64, 8, 3), (64, 32, 4, 4)])
DKDV_CANDIDATES = ([(64, 64, 8, 3), (32, 128, 8, 3)], [(64, 64, 8, 3), (32, 64, 4, 4)])


def _configs(candidates) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": MIN_BLOCK, "BLOCK_N": MIN_BLOCK}, num_warps=1, num_stages=1)]
    shapes = list(dict.fromkeys(candidates[0] + candidates[1]))      # both lists; the prune picks one
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _pruner(candidates):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        wanted = candidates[0] if kwargs["BLOCK_D"] <= 64 else candidates[1]
        wanted = wanted if AUTOTUNE else wanted[:1]
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return sorted(keep, key=lambda c: wanted.index((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                        c.num_stages)))
    return {"early_config_prune": prune}


FWD_CONFIGS, DQ_CONFIGS, DKDV_CONFIGS = (_configs(c) for c in (FWD_CANDIDATES, DQ_CANDIDATES, DKDV_CANDIDATES))


# ----------------------------------------------------------------------------------------------
# Tile helpers. A tile is BLOCK rows (tokens) x BLOCK_D columns of one head: row r at
# base + r * stride_row, unit stride over D; columns >= HEAD_DIM are masked (loaded as 0).

@triton.jit
def _load_rows(base, rows, row_mask, stride_row, offs_d,
               MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, row_mask, stride_row, offs_d, x, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    tl.store(ptrs, x, mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _load_vec(base, offs_d, HEAD_DIM: tl.constexpr):
    """A (D,) weight, fp32, zero in the padded columns."""
    return tl.load(base + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)


@triton.jit
def _load_stat(base, rows, row_mask, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        x = tl.load(base + rows, mask=row_mask, other=0.0)
    else:
        x = tl.load(base + rows)
    return x


@triton.jit
def _store_weight_partial(DW, part, slot0, num_slots, offs_d, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr):
    """This program's (D,) partial sum into slot `slot0` and zeros into its other SLOTS - 1 slots (those
    below num_slots), so that every slot of the stream is written whatever the block size."""
    r = tl.arange(0, SLOTS)
    vals = tl.where(r[:, None] == 0, part[None, :], 0.0)
    ptrs = DW + (slot0 + r)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, vals, mask=((slot0 + r) < num_slots)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------
# Pre-pass: rk, the rstd of every key row (both streams), which every forward program needs.

@triton.jit
def _rstd_rows(X, R, start, N, stride_n, eps, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_R: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_R)
    mask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(X, rows, mask, stride_n, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)
    tl.store(R + rows, rstd, mask=mask)


@triton.jit
def _attn_rstd_kernel(
    K0, K1, RK,                          # keys of stream 0 and 1 (B, N, H, D) views; RK (B*H, N0 + N1) fp32
    s0_b, s0_n, s0_h, s1_b, s1_n, s1_h,
    N0, N1, H, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CTX: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    stats = RK + bh.to(tl.int64) * (N0 + N1)
    num0 = tl.cdiv(N0, BLOCK_R)
    if HAS_CTX:
        if pid >= num0:
            _rstd_rows(K1 + b * s1_b + h * s1_h, stats + N0, (pid - num0) * BLOCK_R, N1, s1_n, eps,
                       HEAD_DIM, BLOCK_D, BLOCK_R)
        else:
            _rstd_rows(K0 + b * s0_b + h * s0_h, stats, pid * BLOCK_R, N0, s0_n, eps, HEAD_DIM, BLOCK_D, BLOCK_R)
    else:
        _rstd_rows(K0 + b * s0_b + h * s0_h, stats, pid * BLOCK_R, N0, s0_n, eps, HEAD_DIM, BLOCK_D, BLOCK_R)


# ----------------------------------------------------------------------------------------------
# Forward. Per query block: qs = (qn * w_q * w_k * scale * log2 e) in the storage dtype, once per key
# stream; per key tile: s = (qs . k_j) * rk_j (log2 units), the online softmax (Milakov & Gimelshein
# 2018; FlashAttention-2, Dao 2023, Alg. 1) with exp2, and acc += p v. Saved: lse = m + log2(l).

@triton.jit
def _fwd_tile(acc, m_i, l_i, qs, K, V, RK, start, N_kv, stride_n, offs_d,
              MASK_N: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_kv
    k = _load_rows(K, offs_n, mask_n, stride_n, offs_d, MASK_N, HEAD_DIM, BLOCK_D)
    s = tl.dot(qs, tl.trans(k), input_precision=PRECISION)                  # (BLOCK_M, BLOCK_N)
    if NORM:
        s = s * _load_stat(RK, offs_n, mask_n, MASK_N)[None, :]
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # -- update m_i and l_i
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- update the output accumulator
    v = _load_rows(V, offs_n, mask_n, stride_n, offs_d, MASK_N, HEAD_DIM, BLOCK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_stream(acc, m_i, l_i, qs, K, V, RK, N_kv, stride_n, offs_d,
                NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """All keys of one stream: full tiles unmasked, then the partial last tile masked."""
    n_full = (N_kv // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qs, K, V, RK, start, N_kv, stride_n, offs_d,
                                  False, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    if n_full < N_kv:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qs, K, V, RK, n_full, N_kv, stride_n, offs_d,
                                  True, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fold_weights(x, xn, w_own, W_other, scale, offs_d, NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The fixed operand of a program: xn * w_own * w_other * scale (NORM), else x * scale; storage dtype."""
    if NORM:
        w = w_own * _load_vec(W_other, offs_d, HEAD_DIM)
        xs = xn * (w * scale)[None, :]
    else:
        xs = x.to(tl.float32) * scale
    return xs.to(x.dtype)


@triton.jit
def _fwd_program(Q, O, QW, m_start, N_q, q_stride_n, o_stride_n, RQ, LSE,
                 K0, V0, KW0, RK0, N0, s0_n, K1, V1, KW1, RK1, N1, s1_n, q_eps, qk_scale,
                 NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = m_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N_q
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    qn = q.to(tl.float32)
    w_q = tl.zeros([BLOCK_D], dtype=tl.float32)
    # -- RMSNorm statistics of the query block, once per program (saved for the backward)
    if NORM:
        rq = tl.math.rsqrt(tl.sum(qn * qn, 1) / HEAD_DIM + q_eps)
        tl.store(RQ + offs_m, rq, mask=mask_m)
        qn = qn * rq[:, None]
        w_q = _load_vec(QW, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- the image stream's keys, then the context's
    qs = _fold_weights(q, qn, w_q, KW0, qk_scale, offs_d, NORM, HEAD_DIM)
    acc, m_i, l_i = _fwd_stream(acc, m_i, l_i, qs, K0, V0, RK0, N0, s0_n, offs_d,
                                NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    if HAS_CTX:
        # reloaded (an L2 hit) rather than kept live in registers through the first loop
        q = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
        qn = q.to(tl.float32)
        if NORM:
            qn = qn * rq[:, None]
        qs = _fold_weights(q, qn, w_q, KW1, qk_scale, offs_d, NORM, HEAD_DIM)
        acc, m_i, l_i = _fwd_stream(acc, m_i, l_i, qs, K1, V1, RK1, N1, s1_n, offs_d,
                                    NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    # -- epilogue: normalise, merge heads on the store, save the log2-sum-exp
    acc = acc / l_i[:, None]
    _store_rows(O, offs_m, mask_m, o_stride_n, offs_d, acc.to(O.dtype.element_ty), HEAD_DIM)
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(FWD_CANDIDATES))
@triton.jit
def _attn_fwd_kernel(
    Q0, K0, V0, O0, QW0, KW0,            # stream 0 (image, or the only one): q, k, v (B, N0, H, D), out (B, N0, H*D)
    Q1, K1, V1, O1, QW1, KW1,            # stream 1 (context; HAS_CTX only): the same with N1 tokens
    RQ, RK, LSE,                         # (B*H, N0 + N1) fp32: rq (written), rk (read), log2-sum-exp (written)
    s0_b, s0_n, s0_h, s1_b, s1_n, s1_h,  # strides of each stream's q, k, v (shared)
    N0, N1, H, q_eps, qk_scale,          # qk_scale = softmax scale * log2(e)
    TUNE_N,                              # autotune key only
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    stats = bh.to(tl.int64) * (N0 + N1)
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    out0, out1 = b * N0 * H * HEAD_DIM + h * HEAD_DIM, b * N1 * H * HEAD_DIM + h * HEAD_DIM
    num_m0 = tl.cdiv(N0, BLOCK_M)
    if HAS_CTX:
        if pid_m >= num_m0:        # a query block of the context stream
            _fwd_program(Q1 + in1, O1 + out1, QW1, (pid_m - num_m0) * BLOCK_M, N1, s1_n, H * HEAD_DIM,
                         RQ + stats + N0, LSE + stats + N0,
                         K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                         K1 + in1, V1 + in1, KW1, RK + stats + N0, N1, s1_n, q_eps, qk_scale,
                         NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
        else:
            _fwd_program(Q0 + in0, O0 + out0, QW0, pid_m * BLOCK_M, N0, s0_n, H * HEAD_DIM, RQ + stats, LSE + stats,
                         K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                         K1 + in1, V1 + in1, KW1, RK + stats + N0, N1, s1_n, q_eps, qk_scale,
                         NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
    else:
        _fwd_program(Q0 + in0, O0 + out0, QW0, pid_m * BLOCK_M, N0, s0_n, H * HEAD_DIM, RQ + stats, LSE + stats,
                     K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                     K0 + in0, V0 + in0, KW0, RK + stats, 0, s0_n, q_eps, qk_scale,
                     NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)


# ----------------------------------------------------------------------------------------------
# Backward (FlashAttention-2, Dao 2023, Alg. 2), through the norm. With P = softmax(S) row-wise,
# S_ij = scale * qhat_i . khat_j, qhat = qn * w_q, khat = kn * w_k, O = P V and dO = dL/dO:
#
#     dV_j     = sum_i P_ij dO_i
#     dP_ij    = dO_i . V_j
#     delta_i  = sum_j P_ij dP_ij = dO_i . O_i
#     dS_ij    = P_ij (dP_ij - delta_i)
#     dqhat_i  = scale * sum_j dS_ij khat_j          dkhat_j = scale * sum_i dS_ij qhat_i
#
# and through RMSNorm (x -> xn = x * r, r = 1 / sqrt(mean_D(x^2) + eps), xhat = xn * w), per row:
#
#     dw       = sum_rows dxhat * xn                 (over tokens, batch and heads; per stream)
#     dxn      = dxhat * w
#     dx       = r * (dxn - xn * mean_D(xn * dxn))
#
# P is recomputed from the saved lse and the saved rq, rk; nothing of size N^2 or of the normalised
# q, k is stored. The weights fold as in the forward: with the key stream's w_k in the dq kernel's
# fixed operand, sum_j dS_ij khat_j = sum_streams w_k,stream * sum_j (dS_ij rk_j) k_j, so the
# streamed raw k tiles meet dS scaled per column by rk, and the stream's w_k multiplies the
# accumulator once (image stream, after its loop) or each tile's product (context stream, which is
# short). The dk/dv kernel mirrors this with rq and w_q. Kernels: dq first (it also computes delta
# for its query block, so no separate pre-pass), then dk/dv, which reads delta.

@triton.jit
def _dq_tile(acc, qs, do, lse, delta, K, V, RK, w_k, start, N_kv, stride_n, offs_d,
             MASK_N: tl.constexpr, WEIGHTED: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_kv
    k = _load_rows(K, offs_n, mask_n, stride_n, offs_d, MASK_N, HEAD_DIM, BLOCK_D)
    v = _load_rows(V, offs_n, mask_n, stride_n, offs_d, MASK_N, HEAD_DIM, BLOCK_D)
    s = tl.dot(qs, tl.trans(k), input_precision=PRECISION)                  # (BLOCK_M, BLOCK_N), log2 units
    if NORM:
        rk = _load_stat(RK, offs_n, mask_n, MASK_N)
        s = s * rk[None, :]
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if NORM:
        ds = ds * rk[None, :]
    if WEIGHTED:
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * w_k[None, :]
    else:
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dq_stream(acc, qs, do, lse, delta, K, V, RK, w_k, N_kv, stride_n, offs_d,
               WEIGHTED: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    n_full = (N_kv // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc = _dq_tile(acc, qs, do, lse, delta, K, V, RK, w_k, start, N_kv, stride_n, offs_d,
                       False, WEIGHTED, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    if n_full < N_kv:
        acc = _dq_tile(acc, qs, do, lse, delta, K, V, RK, w_k, n_full, N_kv, stride_n, offs_d,
                       True, WEIGHTED, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    return acc


@triton.jit
def _dq_program(Q, O, DO, DQ, QW, DQW, m_start, N_q, q_stride_n, o_stride_n, dq_stride_n, num_slots,
                RQ, LSE, DELTA, K0, V0, KW0, RK0, N0, s0_n, K1, V1, KW1, RK1, N1, s1_n, sm_scale, qk_scale,
                NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = m_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N_q
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, offs_m, mask_m, o_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    o = _load_rows(O, offs_m, mask_m, o_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    # -- delta = rowsum(dO * O), for this kernel and the dk/dv kernel after it
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=mask_m)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    qn = q.to(tl.float32)
    w_q = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_k = tl.zeros([BLOCK_D], dtype=tl.float32)
    if NORM:
        rq = tl.load(RQ + offs_m, mask=mask_m, other=0.0)
        qn = qn * rq[:, None]
        w_q = _load_vec(QW, offs_d, HEAD_DIM)
        w_k = _load_vec(KW0, offs_d, HEAD_DIM)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- image stream's keys: acc = sum_j dS_ij kn_j, then * w_k once
    qs = _fold_weights(q, qn, w_q, KW0, qk_scale, offs_d, NORM, HEAD_DIM)
    acc = _dq_stream(acc, qs, do, lse, delta, K0, V0, RK0, w_k, N0, s0_n, offs_d,
                     False, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    if NORM:
        acc = acc * w_k[None, :]
    # -- context stream's keys: each tile's product * w_k of the context
    if HAS_CTX:
        if NORM:
            w_k = _load_vec(KW1, offs_d, HEAD_DIM)
        q = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
        qn = q.to(tl.float32)
        if NORM:
            qn = qn * rq[:, None]
        qs = _fold_weights(q, qn, w_q, KW1, qk_scale, offs_d, NORM, HEAD_DIM)
        acc = _dq_stream(acc, qs, do, lse, delta, K1, V1, RK1, w_k, N1, s1_n, offs_d,
                         NORM, NORM, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    # -- acc = sum_j dS_ij khat_j; through the norm (qn recomputed from a reload: not live in the loops)
    dqhat = acc * sm_scale
    if NORM:
        qn = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32) * rq[:, None]
        dqn = dqhat * w_q[None, :]
        dq = rq[:, None] * (dqn - qn * (tl.sum(qn * dqn, 1) / HEAD_DIM)[:, None])
        _store_weight_partial(DQW, tl.sum(dqhat * qn, 0), (m_start // BLOCK_M) * (BLOCK_M // _MIN_BLOCK), num_slots,
                              offs_d, HEAD_DIM, BLOCK_M // _MIN_BLOCK)
    else:
        dq = dqhat
    _store_rows(DQ, offs_m, mask_m, dq_stride_n, offs_d, dq.to(DQ.dtype.element_ty), HEAD_DIM)


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(DQ_CANDIDATES))
@triton.jit
def _attn_bwd_dq_kernel(
    Q0, K0, V0, O0, DO0, DQ0, QW0, KW0,  # stream 0: inputs, out and dout (B, N0, H*D), dq, weights
    Q1, K1, V1, O1, DO1, DQ1, QW1, KW1,  # stream 1 (HAS_CTX only)
    RQ, RK, LSE, DELTA, DQW,             # (B*H, N0 + N1) fp32 (DELTA written); DQW (B*H, S0 + S1, D) fp32 partials
    s0_b, s0_n, s0_h, g0_b, g0_n, g0_h,  # strides of stream 0's q, k, v and of its gradients
    s1_b, s1_n, s1_h, g1_b, g1_n, g1_h,
    N0, N1, H, S0, S1, sm_scale, qk_scale,
    TUNE_N,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    stats = bh.to(tl.int64) * (N0 + N1)
    slots = bh.to(tl.int64) * (S0 + S1) * HEAD_DIM
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    gr0, gr1 = b * g0_b + h * g0_h, b * g1_b + h * g1_h
    out0, out1 = b * N0 * H * HEAD_DIM + h * HEAD_DIM, b * N1 * H * HEAD_DIM + h * HEAD_DIM
    num_m0 = tl.cdiv(N0, BLOCK_M)
    if HAS_CTX:
        if pid_m >= num_m0:
            _dq_program(Q1 + in1, O1 + out1, DO1 + out1, DQ1 + gr1, QW1, DQW + slots + S0 * HEAD_DIM,
                        (pid_m - num_m0) * BLOCK_M, N1, s1_n, H * HEAD_DIM, g1_n, S1,
                        RQ + stats + N0, LSE + stats + N0, DELTA + stats + N0,
                        K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                        K1 + in1, V1 + in1, KW1, RK + stats + N0, N1, s1_n, sm_scale, qk_scale,
                        NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
        else:
            _dq_program(Q0 + in0, O0 + out0, DO0 + out0, DQ0 + gr0, QW0, DQW + slots,
                        pid_m * BLOCK_M, N0, s0_n, H * HEAD_DIM, g0_n, S0,
                        RQ + stats, LSE + stats, DELTA + stats,
                        K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                        K1 + in1, V1 + in1, KW1, RK + stats + N0, N1, s1_n, sm_scale, qk_scale,
                        NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
    else:
        _dq_program(Q0 + in0, O0 + out0, DO0 + out0, DQ0 + gr0, QW0, DQW + slots,
                    pid_m * BLOCK_M, N0, s0_n, H * HEAD_DIM, g0_n, S0,
                    RQ + stats, LSE + stats, DELTA + stats,
                    K0 + in0, V0 + in0, KW0, RK + stats, N0, s0_n,
                    K0 + in0, V0 + in0, KW0, RK + stats, 0, s0_n, sm_scale, qk_scale,
                    NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)


@triton.jit
def _dkdv_tile(dk_acc, dv_acc, ks, v, Q, DO, RQ, LSE, DELTA, w_q, start, N_q, q_stride_n, o_stride_n, offs_d,
               MASK_M: tl.constexpr, WEIGHTED: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N_q
    q = _load_rows(Q, offs_m, mask_m, q_stride_n, offs_d, MASK_M, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO, offs_m, mask_m, o_stride_n, offs_d, MASK_M, HEAD_DIM, BLOCK_D)
    lse = _load_stat(LSE, offs_m, mask_m, MASK_M)
    delta = _load_stat(DELTA, offs_m, mask_m, MASK_M)
    # -- transposed scores: rows are this program's keys, columns the tile's queries
    s_t = tl.dot(ks, tl.trans(q), input_precision=PRECISION)                # (BLOCK_N, BLOCK_M), log2 units
    if NORM:
        rq = _load_stat(RQ, offs_m, mask_m, MASK_M)
        s_t = s_t * rq[None, :]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASK_M:
        p_t = tl.where(mask_m[None, :], p_t, 0.0)
    dv_acc = tl.dot(p_t.to(do.dtype), do, dv_acc, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if NORM:
        ds_t = ds_t * rq[None, :]
    if WEIGHTED:
        dk_acc += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION) * w_q[None, :]
    else:
        dk_acc = tl.dot(ds_t.to(q.dtype), q, dk_acc, input_precision=PRECISION)
    return dk_acc, dv_acc


@triton.jit
def _dkdv_stream(dk_acc, dv_acc, ks, v, Q, DO, RQ, LSE, DELTA, w_q, N_q, q_stride_n, o_stride_n, offs_d,
                 WEIGHTED: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    m_full = (N_q // BLOCK_M) * BLOCK_M
    for start in range(0, m_full, BLOCK_M):
        dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, ks, v, Q, DO, RQ, LSE, DELTA, w_q, start, N_q,
                                    q_stride_n, o_stride_n, offs_d,
                                    False, WEIGHTED, NORM, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    if m_full < N_q:
        dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, ks, v, Q, DO, RQ, LSE, DELTA, w_q, m_full, N_q,
                                    q_stride_n, o_stride_n, offs_d,
                                    True, WEIGHTED, NORM, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    return dk_acc, dv_acc


@triton.jit
def _dkdv_program(K, V, DK, DV, KW, DKW, n_start, N_k, k_stride_n, g_stride_n, num_slots, RK,
                  Q0, DO0, QW0, RQ0, LSE0, DELTA0, N0, s0_n, Q1, DO1, QW1, RQ1, LSE1, DELTA1, N1, s1_n,
                  o0_stride_n, o1_stride_n, sm_scale, qk_scale,
                  NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_k
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, offs_n, mask_n, k_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V, offs_n, mask_n, k_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
    kn = k.to(tl.float32)
    w_k = tl.zeros([BLOCK_D], dtype=tl.float32)
    w_q = tl.zeros([BLOCK_D], dtype=tl.float32)
    if NORM:
        rk = tl.load(RK + offs_n, mask=mask_n, other=0.0)
        kn = kn * rk[:, None]
        w_k = _load_vec(KW, offs_d, HEAD_DIM)
        w_q = _load_vec(QW0, offs_d, HEAD_DIM)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # -- image stream's queries: dk_acc = sum_i dS_ij qn_i, then * w_q once
    ks = _fold_weights(k, kn, w_k, QW0, qk_scale, offs_d, NORM, HEAD_DIM)
    dk_acc, dv_acc = _dkdv_stream(dk_acc, dv_acc, ks, v, Q0, DO0, RQ0, LSE0, DELTA0, w_q, N0, s0_n, o0_stride_n,
                                  offs_d, False, NORM, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    if NORM:
        dk_acc = dk_acc * w_q[None, :]
    # -- context stream's queries: each tile's product * w_q of the context
    if HAS_CTX:
        if NORM:
            w_q = _load_vec(QW1, offs_d, HEAD_DIM)
        k = _load_rows(K, offs_n, mask_n, k_stride_n, offs_d, True, HEAD_DIM, BLOCK_D)
        kn = k.to(tl.float32)
        if NORM:
            kn = kn * rk[:, None]
        ks = _fold_weights(k, kn, w_k, QW1, qk_scale, offs_d, NORM, HEAD_DIM)
        dk_acc, dv_acc = _dkdv_stream(dk_acc, dv_acc, ks, v, Q1, DO1, RQ1, LSE1, DELTA1, w_q, N1, s1_n,
                                      o1_stride_n, offs_d, NORM, NORM, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    _store_rows(DV, offs_n, mask_n, g_stride_n, offs_d, dv_acc.to(DV.dtype.element_ty), HEAD_DIM)
    # -- dk_acc = sum_i dS_ij qhat_i; through the norm. Padded key rows may hold inf (their scores
    #    are not bounded by the lse): zero them before the sum over rows.
    dkhat = tl.where(mask_n[:, None], dk_acc * sm_scale, 0.0)
    if NORM:
        kn = _load_rows(K, offs_n, mask_n, k_stride_n, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32) * rk[:, None]
        dkn = dkhat * w_k[None, :]
        dk = rk[:, None] * (dkn - kn * (tl.sum(kn * dkn, 1) / HEAD_DIM)[:, None])
        _store_weight_partial(DKW, tl.sum(dkhat * kn, 0), (n_start // BLOCK_N) * (BLOCK_N // _MIN_BLOCK), num_slots,
                              offs_d, HEAD_DIM, BLOCK_N // _MIN_BLOCK)
    else:
        dk = dkhat
    _store_rows(DK, offs_n, mask_n, g_stride_n, offs_d, dk.to(DK.dtype.element_ty), HEAD_DIM)


@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY, prune_configs_by=_pruner(DKDV_CANDIDATES))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q0, K0, V0, DO0, DK0, DV0, QW0, KW0,  # stream 0: inputs, dout (B, N0, H*D), dk, dv, weights
    Q1, K1, V1, DO1, DK1, DV1, QW1, KW1,  # stream 1 (HAS_CTX only)
    RQ, RK, LSE, DELTA, DKW,              # (B*H, N0 + N1) fp32; DKW (B*H, S0 + S1, D) fp32 partials
    s0_b, s0_n, s0_h, g0_b, g0_n, g0_h,
    s1_b, s1_n, s1_h, g1_b, g1_n, g1_h,
    N0, N1, H, S0, S1, sm_scale, qk_scale,
    TUNE_N,
    NORM: tl.constexpr, HAS_CTX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    stats = bh.to(tl.int64) * (N0 + N1)
    slots = bh.to(tl.int64) * (S0 + S1) * HEAD_DIM
    in0, in1 = b * s0_b + h * s0_h, b * s1_b + h * s1_h
    gr0, gr1 = b * g0_b + h * g0_h, b * g1_b + h * g1_h
    out0, out1 = b * N0 * H * HEAD_DIM + h * HEAD_DIM, b * N1 * H * HEAD_DIM + h * HEAD_DIM
    num_n0 = tl.cdiv(N0, BLOCK_N)
    if HAS_CTX:
        if pid_n >= num_n0:
            _dkdv_program(K1 + in1, V1 + in1, DK1 + gr1, DV1 + gr1, KW1, DKW + slots + S0 * HEAD_DIM,
                          (pid_n - num_n0) * BLOCK_N, N1, s1_n, g1_n, S1, RK + stats + N0,
                          Q0 + in0, DO0 + out0, QW0, RQ + stats, LSE + stats, DELTA + stats, N0, s0_n,
                          Q1 + in1, DO1 + out1, QW1, RQ + stats + N0, LSE + stats + N0, DELTA + stats + N0,
                          N1, s1_n, H * HEAD_DIM, H * HEAD_DIM, sm_scale, qk_scale,
                          NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
        else:
            _dkdv_program(K0 + in0, V0 + in0, DK0 + gr0, DV0 + gr0, KW0, DKW + slots,
                          pid_n * BLOCK_N, N0, s0_n, g0_n, S0, RK + stats,
                          Q0 + in0, DO0 + out0, QW0, RQ + stats, LSE + stats, DELTA + stats, N0, s0_n,
                          Q1 + in1, DO1 + out1, QW1, RQ + stats + N0, LSE + stats + N0, DELTA + stats + N0,
                          N1, s1_n, H * HEAD_DIM, H * HEAD_DIM, sm_scale, qk_scale,
                          NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)
    else:
        _dkdv_program(K0 + in0, V0 + in0, DK0 + gr0, DV0 + gr0, KW0, DKW + slots,
                      pid_n * BLOCK_N, N0, s0_n, g0_n, S0, RK + stats,
                      Q0 + in0, DO0 + out0, QW0, RQ + stats, LSE + stats, DELTA + stats, N0, s0_n,
                      Q0 + in0, DO0 + out0, QW0, RQ + stats, LSE + stats, DELTA + stats, 0, s0_n,
                      H * HEAD_DIM, H * HEAD_DIM, sm_scale, qk_scale,
                      NORM, HAS_CTX, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, PRECISION)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated
# them): then they run on CPU tensors; otherwise they need CUDA tensors.
INTERPRETED = INTERPRET


# ----------------------------------------------------------------------------------------------
# Checks and layouts.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers hand to a kernel (tests patch this to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"archirf_kernels attention: the Triton kernels need CUDA tensors, got {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter, "
                         "or use impl='reference')")


def _check_stream(name: str, q: Tensor, k: Tensor, v: Tensor, like: Tensor) -> None:
    for t, which in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"archirf_kernels attention: {name} {which} must be (B, N, H, D), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"archirf_kernels attention: {name} dtype {t.dtype} is not fp16, bf16 or fp32")
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
    if D > MAX_HEAD_DIM:
        raise ValueError(f"archirf_kernels attention: head dim {D} > {MAX_HEAD_DIM}; use impl='reference'")


def _check_weight(name: str, w: Tensor | None, D: int, x: Tensor, qk_norm: bool) -> None:
    if w is None:
        return
    if not qk_norm:
        raise ValueError(f"archirf_kernels attention: {name} given with qk_norm=False; pass None")
    if tuple(w.shape) != (D,) or w.dtype not in _DTYPES or w.device != x.device:
        raise ValueError(f"archirf_kernels attention: {name} must be a (D,) = ({D},) fp16/bf16/fp32 tensor on "
                         f"{x.device}, got {tuple(w.shape)} {w.dtype} on {w.device}")


def _check(streams, weights, qk_norm: bool) -> None:
    like = streams[0][0]
    for i, s in enumerate(streams):
        if s is not None:
            _check_stream(("qkv", "qkv_ctx")[i], *s, like)
    for name, w in zip(("q_weight", "k_weight", "q_weight_ctx", "k_weight_ctx"), weights):
        _check_weight(name, w, like.shape[-1], like, qk_norm)


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
    """None weights -> ones (the kernels always scale; without the norm they are never read)."""
    ones = None
    out = []
    for w in weights:
        if w is None or not qk_norm:
            if ones is None:
                ones = torch.ones(D, dtype=torch.float32, device=x.device)
            w = ones
        out.append(w.contiguous())
    return out


def _launch_args(streams):
    q0 = streams[0][0]
    B, N0, H, D = q0.shape
    N1 = streams[1][0].shape[1] if streams[1] is not None else 0
    return B, N0, N1, H, D


def _meta(x: Tensor, D: int, N: int, qk_norm: bool, has_ctx: bool) -> dict:
    return dict(TUNE_N=triton.next_power_of_2(max(N, 1)), NORM=qk_norm, HAS_CTX=has_ctx, HEAD_DIM=D,
                BLOCK_D=max(16, triton.next_power_of_2(D)),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


# ----------------------------------------------------------------------------------------------
# Launchers. Streams are (q, k, v) tuples of (B, N, H, D) views (streams[1] None without context).

def _forward(streams, weights, q_eps: float, k_eps: float, scale: float, qk_norm: bool):
    """-> (out, out_ctx or None, stats): stats (3, B*H, N0 + N1) fp32 = [log2-sum-exp, rq, rk]
    ((1, B*H, N0 + N1): the log2-sum-exp alone without the norm)."""
    q0 = streams[0][0]
    _check_device(q0)
    streams = [_shared_strides(*s) if s is not None else None for s in streams]
    has_ctx = streams[1] is not None
    B, N0, N1, H, D = _launch_args(streams)
    s0 = streams[0]
    s1 = streams[1] if has_ctx else s0
    w = _weights(weights, D, q0, qk_norm)
    out0 = _alloc((B, N0, H * D), q0.dtype, q0.device)
    out1 = _alloc((B, N1, H * D), q0.dtype, q0.device) if has_ctx else out0
    stats = _alloc((3 if qk_norm else 1, B * H, N0 + N1), torch.float32, q0.device)
    lse, rq, rk = stats.unbind(0) if qk_norm else (stats[0],) * 3
    if B * H * (N0 + N1) == 0:
        return out0, out1 if has_ctx else None, stats
    meta = _meta(q0, D, N0 + N1, qk_norm, has_ctx)
    if qk_norm:
        _attn_rstd_kernel[(triton.cdiv(N0, RSTD_ROWS) + triton.cdiv(N1, RSTD_ROWS), B * H)](
            s0[1], s1[1], rk, *_bnh(s0[1]), *_bnh(s1[1]), N0, N1, H, k_eps,
            HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], HAS_CTX=has_ctx, BLOCK_R=RSTD_ROWS, num_warps=4)

    def grid(META):
        return triton.cdiv(N0, META["BLOCK_M"]) + triton.cdiv(N1, META["BLOCK_M"]), B * H

    _attn_fwd_kernel[grid](
        *s0, out0, w[0], w[1], *s1, out1, w[2], w[3], rq, rk, lse,
        *_bnh(s0[0]), *_bnh(s1[0]), N0, N1, H, q_eps, scale * LOG2E, **meta)
    return out0, out1 if has_ctx else None, stats


def _backward(douts, streams, weights, outs, stats, scale: float, qk_norm: bool, grads):
    """grads: per stream a (dq, dk, dv) tuple of preallocated (B, N, H, D) views with shared strides
    (views of one (B, N, 3, H, D) buffer for the packed op). Fills them and returns the four weight
    gradients (fp32; None where the weight is None)."""
    q0 = streams[0][0]
    _check_device(q0)
    streams = [_shared_strides(*s) if s is not None else None for s in streams]
    has_ctx = streams[1] is not None
    B, N0, N1, H, D = _launch_args(streams)
    s0, g0 = streams[0], grads[0]
    s1, g1 = (streams[1], grads[1]) if has_ctx else (s0, g0)
    w = _weights(weights, D, q0, qk_norm)
    do0 = douts[0].contiguous() if douts[0] is not None else torch.zeros_like(outs[0])
    o1 = outs[1] if has_ctx else outs[0]
    do1 = (douts[1].contiguous() if douts[1] is not None else torch.zeros_like(o1)) if has_ctx else do0
    lse, rq, rk = stats.unbind(0) if qk_norm else (stats[0],) * 3
    delta = _alloc((B * H, N0 + N1), torch.float32, q0.device)
    S0, S1 = triton.cdiv(N0, MIN_BLOCK), triton.cdiv(N1, MIN_BLOCK)
    dqw = _alloc((B * H, S0 + S1, D), torch.float32, q0.device)
    dkw = _alloc((B * H, S0 + S1, D), torch.float32, q0.device)
    if B * H * (N0 + N1) == 0:
        dqw.zero_()
        dkw.zero_()
    else:
        meta = _meta(q0, D, N0 + N1, qk_norm, has_ctx)
        common = (*_bnh(s0[0]), *_bnh(g0[0]), *_bnh(s1[0]), *_bnh(g1[0]), N0, N1, H, S0, S1, scale, scale * LOG2E)
        def grid(block: str):
            return lambda META: (triton.cdiv(N0, META[block]) + triton.cdiv(N1, META[block]), B * H)

        # dq first: it writes delta, which dk/dv reads
        _attn_bwd_dq_kernel[grid("BLOCK_M")](
            *s0, outs[0], do0, g0[0], w[0], w[1], *s1, o1, do1, g1[0], w[2], w[3],
            rq, rk, lse, delta, dqw, *common, **meta)
        _attn_bwd_dkdv_kernel[grid("BLOCK_N")](
            *s0, do0, g0[1], g0[2], w[0], w[1], *s1, do1, g1[1], g1[2], w[2], w[3],
            rq, rk, lse, delta, dkw, *common, **meta)
    if not qk_norm:
        return [None] * 4
    sums = [dqw[:, :S0].sum((0, 1)), dkw[:, :S0].sum((0, 1)), dqw[:, S0:].sum((0, 1)), dkw[:, S0:].sum((0, 1))]
    return [s.to(wt.dtype) if wt is not None else None for s, wt in zip(sums, weights)]


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
    return [unpack_qkv(qkv), unpack_qkv(qkv_ctx, "qkv_ctx") if qkv_ctx is not None else None]


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
# Differentiable entry points (archirf_kernels.* dispatches here for impl="triton").

def _call(qkv, qkv_ctx, weights, eps, scale, qk_norm):
    q_eps, k_eps = qk_eps(eps)
    packed = isinstance(qkv, Tensor)
    if qkv_ctx is not None and isinstance(qkv_ctx, Tensor) != packed:
        raise ValueError("archirf_kernels attention: pass both streams packed (B, N, 3, H, D) or both as (q, k, v)")
    D = (qkv.shape[-1] if packed else unpack_qkv(qkv)[0].shape[-1])
    scale = D ** -0.5 if scale is None else float(scale)
    if packed:
        unpack_qkv(qkv)
        if qkv_ctx is not None:
            unpack_qkv(qkv_ctx, "qkv_ctx")
        return torch.ops.archirf_kernels.qk_norm_attention(qkv, qkv_ctx, *weights, q_eps, k_eps, scale, qk_norm)
    q, k, v = unpack_qkv(qkv)
    qc, kc, vc = unpack_qkv(qkv_ctx, "qkv_ctx") if qkv_ctx is not None else (None, None, None)
    return torch.ops.archirf_kernels.qk_norm_attention_split(q, k, v, qc, kc, vc, *weights, q_eps, k_eps, scale,
                                                               qk_norm)


def qk_norm_attention(qkv, q_weight: Tensor | None = None, k_weight: Tensor | None = None,
                      eps: float | tuple[float, float] = 1e-6, scale: float | None = None,
                      qk_norm: bool = True) -> Tensor:
    return _call(qkv, None, (q_weight, k_weight, None, None), eps, scale, qk_norm)[0]


def joint_qk_norm_attention(qkv_img, qkv_ctx, q_weight_img: Tensor | None = None, k_weight_img: Tensor | None = None,
                            q_weight_ctx: Tensor | None = None, k_weight_ctx: Tensor | None = None,
                            eps: float | tuple[float, float] = 1e-6, scale: float | None = None,
                            qk_norm: bool = True) -> tuple[Tensor, Tensor]:
    out, out_ctx, _ = _call(qkv_img, qkv_ctx, (q_weight_img, k_weight_img, q_weight_ctx, k_weight_ctx), eps, scale,
                            qk_norm)
    return out, out_ctx

