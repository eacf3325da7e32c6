"""Per-head RMSNorm then rotary embedding in one pass (Flux's q and k prep: norm -> RoPE -> attention).

    n   = x / sqrt(mean_D(x^2) + eps) * weight                                   per (token, head) row of D
    y_{2i}   = n_{2i} cos_{s,2i} - n_{2i+1} sin_{s,2i}
    y_{2i+1} = n_{2i+1} cos_{s,2i+1} + n_{2i} sin_{s,2i+1}                        (interleaved pairs, s = position)

reference.qk_norm_rope is the spec (diffusers' RMSNorm then apply_rotary_emb(use_real=True, unbind_dim=-1)).
x is (B, S, H, D), the last dim contiguous; cos and sin (S, D) fp32; out (B, S, H, D) contiguous in x's dtype;
math in fp32. Backward, with c, s the rotation's entries and xhat = x rstd:

    dn_{2i}   = dy_{2i} c_{2i} + dy_{2i+1} s_{2i+1}      dn_{2i+1} = dy_{2i+1} c_{2i+1} - dy_{2i} s_{2i}
    dweight   = sum_rows dn xhat          dx = rstd (dn w - xhat mean_D(dn w xhat))
    dcos_s    = sum_{b,h} dy n            dsin_s = sum_{b,h} dy rot(n),  rot(n)_{2i} = -n_{2i+1}, rot(n)_{2i+1} = n_{2i}

dweight: fp32 partial sums per program, added by torch (no atomics). dcos and dsin, only when cos or sin requires
grad: each row's fp32 terms, summed over (b, h) by torch.
Each program loops over row tiles (program p takes tiles p, p + P, ...).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks
from .mp import _check_device
from .registry import definer, ints, launch

Tensor = torch.Tensor
ROWS = 16                        # rows (token, head) per tile
PROGRAMS_PER_SM = 8              # backward: programs per SM, each looping over tiles
INTERPRETER_PROGRAMS = 3


@triton.jit
def _tile(X, COS, SIN, W, tile, R, S, H, HALF, eps,
          HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """A tile's rows: (offsets of the even columns, mask, xhat even / odd, rstd, weight even / odd, cos and sin
    even / odd at each row's position), fp32."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_H)
    rmask = rows < R
    mask = rmask[:, None] & (j < HALF)[None, :]
    even = rows.to(tl.int64)[:, None] * (2 * HALF) + 2 * j[None, :]
    xe = tl.load(X + even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(X + even + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / (2 * HALF) + eps)
    pos = (rows // H) % S
    trig = pos.to(tl.int64)[:, None] * (2 * HALF) + 2 * j[None, :]
    ce = tl.load(COS + trig, mask=mask, other=0.0)
    co = tl.load(COS + trig + 1, mask=mask, other=0.0)
    se = tl.load(SIN + trig, mask=mask, other=0.0)
    so = tl.load(SIN + trig + 1, mask=mask, other=0.0)
    we = tl.where(j < HALF, 1.0, 0.0)
    wo = we
    if HAS_W:
        we = tl.load(W + 2 * j, mask=j < HALF, other=0.0).to(tl.float32)
        wo = tl.load(W + 2 * j + 1, mask=j < HALF, other=0.0).to(tl.float32)
    return even, mask, xe * rstd[:, None], xo * rstd[:, None], rstd, we, wo, ce, co, se, so


@triton.jit
def _fwd_kernel(X, COS, SIN, W, Y, R, S, H, HALF, eps,
                HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    even, mask, he, ho, _, we, wo, ce, co, se, so = _tile(X, COS, SIN, W, tl.program_id(0), R, S, H, HALF, eps,
                                                           HAS_W, ROWS, BLOCK_H)
    ne, no = he * we[None, :], ho * wo[None, :]
    tl.store(Y + even, (ne * ce - no * se).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + even + 1, (no * co + ne * so).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(X, COS, SIN, W, DY, DX, DW, DC, DS, R, S, H, HALF, eps, num_tiles,
                HAS_W: tl.constexpr, HAS_DTRIG: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    acc_e = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        even, mask, he, ho, rstd, we, wo, ce, co, se, so = _tile(X, COS, SIN, W, tile, R, S, H, HALF, eps,
                                                                 HAS_W, ROWS, BLOCK_H)
        dye = tl.load(DY + even, mask=mask, other=0.0).to(tl.float32)
        dyo = tl.load(DY + even + 1, mask=mask, other=0.0).to(tl.float32)
        dne = dye * ce + dyo * so                       # the rotation's transpose
        dno = dyo * co - dye * se
        if HAS_W:
            acc_e += dne * he
            acc_o += dno * ho
        if HAS_DTRIG:                                   # each row's terms of dcos = dy n, dsin = dy rot(n)
            ne, no = he * we[None, :], ho * wo[None, :]
            tl.store(DC + even, dye * ne, mask=mask)
            tl.store(DC + even + 1, dyo * no, mask=mask)
            tl.store(DS + even, -dye * no, mask=mask)
            tl.store(DS + even + 1, dyo * ne, mask=mask)
        ge, go = dne * we[None, :], dno * wo[None, :]   # d(xhat)
        coef = (tl.sum(ge * he, axis=1) + tl.sum(go * ho, axis=1)) / (2 * HALF)
        tl.store(DX + even, (rstd[:, None] * (ge - he * coef[:, None])).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + even + 1, (rstd[:, None] * (go - ho * coef[:, None])).to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        j = tl.arange(0, BLOCK_H)
        base = DW + pid.to(tl.int64) * (2 * HALF) + 2 * j
        tl.store(base, tl.sum(acc_e, axis=0), mask=j < HALF)
        tl.store(base + 1, tl.sum(acc_o, axis=0), mask=j < HALF)


INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_shape(x: Tensor):
    B, S, H, D = ints(*x.shape)
    return B * S * H, S, H, D // 2, triton.next_power_of_2(D // 2)


def _forward(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    R, S, H, half, block_h = _launch_shape(x)
    if R:
        launch(_fwd_kernel, INTERPRETED)[(triton.cdiv(R, ROWS),)](
            x, cos.contiguous(), sin.contiguous(), weight if weight is not None else x, y, R, S, H, half, eps,
            HAS_W=weight is not None, ROWS=ROWS, BLOCK_H=block_h, num_warps=4)
    return y


def _backward(dy: Tensor, x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float,
              trig_grads: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    R, S, H, half, block_h = _launch_shape(x)
    tiles = triton.cdiv(R, ROWS)
    if x.is_cuda:
        programs = min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:
        programs = min(tiles, INTERPRETER_PROGRAMS)
    part = torch.zeros((max(programs, 1) if weight is not None else 0, 2 * half), dtype=torch.float32,
                       device=x.device)
    dc, ds = (torch.empty(x.shape if trig_grads else (0,), dtype=torch.float32, device=x.device) for _ in range(2))
    if R:
        launch(_bwd_kernel, INTERPRETED)[(programs,)](
            x, cos.contiguous(), sin.contiguous(), weight if weight is not None else x, dy, dx, part, dc, ds, R, S, H,
            half, eps, tiles, HAS_W=weight is not None, HAS_DTRIG=trig_grads, ROWS=ROWS, BLOCK_H=block_h,
            num_warps=4)
    dcos, dsin = (t.sum((0, 2)) for t in (dc, ds)) if trig_grads else (None, None)     # (B, S, H, D) -> (S, D)
    return dx, part.sum(0).to(weight.dtype) if weight is not None else None, dcos, dsin


_define = definer(INTERPRETED, globals())      # registry.define with this module's flag and kernels


def _qk_norm_rope_fake(x, weight, cos, sin, eps):
    checks.qk_norm_rope(x, weight, cos, sin)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_define("qk_norm_rope", fake=_qk_norm_rope_fake)
def _op(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    checks.qk_norm_rope(x, weight, cos, sin)
    _check_device("qk_norm_rope", x)
    return _forward(x, weight, cos, sin, eps)


def _qk_norm_rope_backward_fake(dy, x, weight, cos, sin, eps, trig_grads):
    trig = (cos.new_empty(cos.shape) if trig_grads else x.new_empty((0,)) for _ in range(2))
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,)), *trig)


@_define("qk_norm_rope_backward", fake=_qk_norm_rope_backward_fake)
def _backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float,
                 trig_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, *grads = _backward(dy, x, weight, cos, sin, eps, trig_grads)
    return dx, *(g if g is not None else x.new_empty((0,)) for g in grads)      # (0,): no gradient


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps = eps


def _autograd_backward(ctx, dy):
    x, weight, cos, sin = ctx.saved_tensors
    trig_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    dx, dw, dcos, dsin = torch.ops.archirf_kernels.qk_norm_rope_backward(dy, x, weight, cos, sin, ctx.eps, trig_grads)
    return (dx, dw if weight is not None else None, dcos if ctx.needs_input_grad[2] else None,
            dsin if ctx.needs_input_grad[3] else None, None)


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def qk_norm_rope(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.ops.archirf_kernels.qk_norm_rope(x, weight, cos, sin, eps)
