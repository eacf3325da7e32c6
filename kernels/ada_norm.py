"""Fused adaLN for DiT / MMDiT blocks: ada_layer_norm, gated_residual and their block-boundary fusion.

    h            = modulate(N(x), shift, scale)            ada_layer_norm
    x_new        = x + gate * y                            gated_residual
    x_new, h     = x + gate * y, modulate(N(x_new), ...)   gated_residual_ada_layer_norm

N is LayerNorm or RMSNorm over C with an optional affine (weight, bias); modulate is
reference.modulate, the spec of every op here (DiT Sec. 3.2). x, y: (B, N, C); shift, scale, gate
per sample (B, C) / (B, 1, C) or per token (B, N, C), each in its own dtype (bf16 activations with
fp32 modulation is fine). All math in fp32; outputs in x's dtype, gradients in their input's dtype.

Kernel layout. Program p handles ROWS_PER_PROGRAM consecutive tokens of one sample b. The whole
row (C channels, BLOCK_C = next power of 2 >= C, masked) lives in registers, so the norm's
statistics and the backward's row reductions need no second read. Per-sample conditioning and the
affine are loaded once per program. Reductions over tokens (per-sample dshift, dscale, dgate;
dweight, dbias) accumulate in fp32 registers across the program's rows and are written once as a
partial row (num_programs, C) in fp32; a deterministic torch.sum over the few partials per sample
finishes them (no atomics: same bits every run, as bit-exact resume needs).

Forward saves mean and rstd per row (fp32; no mean for RMSNorm) and, for the fusion, x_new (which is
an output anyway); the backward recomputes the normalised row from them.

Memory traffic, bytes per element of (B, N, C) in bf16 with per-sample conditioning (each is one
pass: every activation is read or written once):
    ada_layer_norm                 fwd  4 (x -> h)               bwd  6 (x, dh -> dx)
    gated_residual                 fwd  6 (x, y -> x_new)        bwd  6 (dout, y -> dy; dx = dout)
    gated_residual_ada_layer_norm  fwd  8 (x, y -> x_new, h)     bwd 12 (dx_new, dh, x_new, y -> dx, dy)
plus, in backward, 8 / ROWS_PER_PROGRAM bytes per element for each sum over tokens (partial row
written and read back in fp32). Per-token conditioning adds its own reads (and gradient writes).

Registered as torch.library custom ops (archirf_kernels::*) with fake and autograd implementations,
so torch.compile(fullgraph=True) traces through a model that uses them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import NORMS

Tensor = torch.Tensor

MAX_BLOCK_C = 65536          # one row in registers; beyond this a row would have to be tiled


# ----------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _modulate(n, shift, scale):
    # reference.modulate: adaLN (Peebles & Xie 2023, Sec. 3.2).
    return n * (1.0 + scale) + shift


@triton.jit
def _ada_norm_fwd_kernel(
    X_ptr, Y_ptr, Gate_ptr, Shift_ptr, Scale_ptr, W_ptr, B_ptr,   # inputs (Y, Gate: HAS_RESIDUAL only)
    XNew_ptr, H_ptr, Mean_ptr, Rstd_ptr,                          # outputs; XNew, H contiguous (B*N, C)
    stride_xb, stride_xn, stride_yb, stride_yn,
    stride_gate_b, stride_gate_n, stride_shift_b, stride_shift_n, stride_scale_b, stride_scale_n,
    N, C, num_row_blocks, eps,
    HAS_RESIDUAL: tl.constexpr,     # x_new = x + gate * y first (the block-boundary fusion)
    GATE_PER_TOKEN: tl.constexpr,
    MOD_PER_TOKEN: tl.constexpr,    # shift and scale are (B, N, C); else one row per sample
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,  # tokens of one sample per program
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_start = ((pid % num_row_blocks) * ROWS_PER_PROGRAM).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    # -- per-sample conditioning and the affine: loaded once for all rows of this program
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        gate = tl.load(Gate_ptr + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
    if not MOD_PER_TOKEN:
        shift = tl.load(Shift_ptr + b * stride_shift_b + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(Scale_ptr + b * stride_scale_b + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    for i in range(ROWS_PER_PROGRAM):
        n = n_start + i
        if n < N:                   # the last block of a sample may be short
            row = b * N + n
            x = tl.load(X_ptr + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
            # -- gated residual; the norm sees x_new as stored (rounded to x's dtype), as backward will
            if HAS_RESIDUAL:
                if GATE_PER_TOKEN:
                    gate = tl.load(Gate_ptr + b * stride_gate_b + n * stride_gate_n + cols,
                                   mask=mask, other=0.0).to(tl.float32)
                y = tl.load(Y_ptr + b * stride_yb + n * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
                x_new = (x + gate * y).to(XNew_ptr.dtype.element_ty)
                tl.store(XNew_ptr + row * C + cols, x_new, mask=mask)
                x = x_new.to(tl.float32)
            # -- statistics of the row (two-pass in registers: no cancellation in the variance)
            if IS_RMS:
                xc = x
            else:
                mean = tl.sum(x, axis=0) / C
                xc = tl.where(mask, x - mean, 0.0)
                tl.store(Mean_ptr + row, mean)
            var = tl.sum(xc * xc, axis=0) / C
            rstd = 1.0 / tl.sqrt(var + eps)
            tl.store(Rstd_ptr + row, rstd)
            # -- normalise, affine, modulate
            nrm = xc * rstd
            if HAS_WEIGHT:
                nrm = nrm * w
            if HAS_BIAS:
                nrm = nrm + bias
            if MOD_PER_TOKEN:
                shift = tl.load(Shift_ptr + b * stride_shift_b + n * stride_shift_n + cols,
                                mask=mask, other=0.0).to(tl.float32)
                scale = tl.load(Scale_ptr + b * stride_scale_b + n * stride_scale_n + cols,
                                mask=mask, other=0.0).to(tl.float32)
            h = _modulate(nrm, shift, scale)
            tl.store(H_ptr + row * C + cols, h.to(H_ptr.dtype.element_ty), mask=mask)


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
# The row sums mean_C(.) need the whole row: it is in registers. The sums over tokens are
# accumulated per program in fp32 and written once as a partial row (see the module docstring).
@triton.jit
def _ada_norm_bwd_kernel(
    DH_ptr, DXNewIn_ptr, X_ptr, Y_ptr, Gate_ptr, Scale_ptr, W_ptr, B_ptr, Mean_ptr, Rstd_ptr,
    DX_ptr, DY_ptr, DGate_ptr, DShift_ptr, DScale_ptr, DW_ptr, DB_ptr,
    stride_xb, stride_xn, stride_yb, stride_yn,
    stride_gate_b, stride_gate_n, stride_scale_b, stride_scale_n,
    N, C, num_row_blocks,
    HAS_RESIDUAL: tl.constexpr,     # X is x_new; also produce dy, dgate
    HAS_DXNEW: tl.constexpr,        # a gradient flows into x_new from the residual stream
    GATE_PER_TOKEN: tl.constexpr,   # else DGate holds per-program partial sums
    MOD_PER_TOKEN: tl.constexpr,    # else DShift, DScale hold per-program partial sums
    HAS_WEIGHT: tl.constexpr,       # DW holds per-program partial sums
    HAS_BIAS: tl.constexpr,         # DB holds per-program partial sums
    IS_RMS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,  # tokens of one sample per program
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_start = ((pid % num_row_blocks) * ROWS_PER_PROGRAM).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    # -- per-sample conditioning, affine, and fp32 accumulators of the sums over this program's rows
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        gate = tl.load(Gate_ptr + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
        dgate_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if not MOD_PER_TOKEN:
        scale = tl.load(Scale_ptr + b * stride_scale_b + cols, mask=mask, other=0.0).to(tl.float32)
        dshift_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        dscale_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)

    for i in range(ROWS_PER_PROGRAM):
        n = n_start + i
        if n < N:                   # the last block of a sample may be short
            row = b * N + n
            # -- recompute the normalised row from the saved statistics
            x = tl.load(X_ptr + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(DH_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd_ptr + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                mean = tl.load(Mean_ptr + row)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            nrm = xhat
            if HAS_WEIGHT:
                nrm = nrm * w
            if HAS_BIAS:
                nrm = nrm + bias
            # -- modulation: dshift = dh, dscale = dh * n
            if MOD_PER_TOKEN:
                scale = tl.load(Scale_ptr + b * stride_scale_b + n * stride_scale_n + cols,
                                mask=mask, other=0.0).to(tl.float32)
                tl.store(DShift_ptr + row * C + cols, dh.to(DShift_ptr.dtype.element_ty), mask=mask)
                tl.store(DScale_ptr + row * C + cols, (dh * nrm).to(DScale_ptr.dtype.element_ty), mask=mask)
            else:
                dshift_acc += dh
                dscale_acc += dh * nrm
            dn = dh * (1.0 + scale)
            # -- affine
            dxhat = dn
            if HAS_WEIGHT:
                dw_acc += dn * xhat
                dxhat = dn * w
            if HAS_BIAS:
                db_acc += dn
            # -- through the norm
            c1 = tl.sum(xhat * dxhat, axis=0) / C
            if IS_RMS:
                dx = (dxhat - xhat * c1) * rstd
            else:
                c2 = tl.sum(dxhat, axis=0) / C
                dx = (dxhat - (xhat * c1 + c2)) * rstd
            # -- gated residual: the residual stream's gradient joins, then splits into dy and dgate
            if HAS_RESIDUAL:
                if HAS_DXNEW:
                    dx += tl.load(DXNewIn_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
                if GATE_PER_TOKEN:
                    gate = tl.load(Gate_ptr + b * stride_gate_b + n * stride_gate_n + cols,
                                   mask=mask, other=0.0).to(tl.float32)
                y = tl.load(Y_ptr + b * stride_yb + n * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DY_ptr + row * C + cols, (dx * gate).to(DY_ptr.dtype.element_ty), mask=mask)
                if GATE_PER_TOKEN:
                    tl.store(DGate_ptr + row * C + cols, (dx * y).to(DGate_ptr.dtype.element_ty), mask=mask)
                else:
                    dgate_acc += dx * y
            tl.store(DX_ptr + row * C + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)

    # -- one partial row per program for every sum over tokens
    part = pid.to(tl.int64) * C + cols
    if HAS_RESIDUAL and not GATE_PER_TOKEN:
        tl.store(DGate_ptr + part, dgate_acc, mask=mask)
    if not MOD_PER_TOKEN:
        tl.store(DShift_ptr + part, dshift_acc, mask=mask)
        tl.store(DScale_ptr + part, dscale_acc, mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_ptr + part, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_ptr + part, db_acc, mask=mask)


@triton.jit
def _gated_residual_fwd_kernel(
    X_ptr, Y_ptr, Gate_ptr, Out_ptr,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_gate_b, stride_gate_n,
    N, C, num_row_blocks,
    GATE_PER_TOKEN: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,  # tokens of one sample per program
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_start = ((pid % num_row_blocks) * ROWS_PER_PROGRAM).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if not GATE_PER_TOKEN:
        gate = tl.load(Gate_ptr + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        n = n_start + i
        if n < N:                   # the last block of a sample may be short
            if GATE_PER_TOKEN:
                gate = tl.load(Gate_ptr + b * stride_gate_b + n * stride_gate_n + cols,
                               mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X_ptr + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y_ptr + b * stride_yb + n * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Out_ptr + (b * N + n) * C + cols, (x + gate * y).to(Out_ptr.dtype.element_ty), mask=mask)


# Backward of x_new = x + gate * y: dx = dout (no kernel), dy = dout * gate, dgate = dout * y
# (per sample: summed over tokens, as partial rows like _ada_norm_bwd_kernel's).
@triton.jit
def _gated_residual_bwd_kernel(
    DOut_ptr, Y_ptr, Gate_ptr, DY_ptr, DGate_ptr,
    stride_yb, stride_yn, stride_gate_b, stride_gate_n,
    N, C, num_row_blocks,
    GATE_PER_TOKEN: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,  # tokens of one sample per program
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_row_blocks).to(tl.int64)
    n_start = ((pid % num_row_blocks) * ROWS_PER_PROGRAM).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if not GATE_PER_TOKEN:
        gate = tl.load(Gate_ptr + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
        dgate_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        n = n_start + i
        if n < N:                   # the last block of a sample may be short
            row = b * N + n
            dout = tl.load(DOut_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y_ptr + b * stride_yb + n * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
            if GATE_PER_TOKEN:
                gate = tl.load(Gate_ptr + b * stride_gate_b + n * stride_gate_n + cols,
                               mask=mask, other=0.0).to(tl.float32)
                tl.store(DGate_ptr + row * C + cols, (dout * y).to(DGate_ptr.dtype.element_ty), mask=mask)
            else:
                dgate_acc += dout * y
            tl.store(DY_ptr + row * C + cols, (dout * gate).to(DY_ptr.dtype.element_ty), mask=mask)
    if not GATE_PER_TOKEN:
        tl.store(DGate_ptr + pid.to(tl.int64) * C + cols, dgate_acc, mask=mask)


# The kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when triton decorated
# them): then they run on CPU tensors; otherwise they need CUDA tensors.
INTERPRETED = type(_ada_norm_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# Checks, layouts, heuristics.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers hand to a kernel (tests patch this to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_warps(block_c: int) -> int:
    # One row per program in registers: ~8 fp32 values per thread per live row vector.
    if block_c >= 32768:
        return 32
    if block_c >= 8192:
        return 16
    if block_c >= 2048:
        return 8
    return 4


def _block_c(C: int) -> int:
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"archirf_kernels adaLN: C={C} channels exceed the fused row limit "
                         f"{MAX_BLOCK_C}; use impl='reference'")
    return block_c


def _rows_per_program(B: int, N: int, device: torch.device, programs_per_sm: int) -> int:
    """Tokens of one sample per program, a power of 2 (it is a constexpr), for about programs_per_sm
    programs per SM. Forward asks for many (more rows in flight; per-sample conditioning is still
    loaded once per several rows); backward for few, since each of its programs writes one fp32
    partial row per sum over tokens (1/rows of a row's traffic per sum)."""
    if device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        num_sms, programs_per_sm = 1, 4   # the interpreter: few programs of several rows, so tests cover the row loop
    rows = triton.next_power_of_2(triton.cdiv(B * N, programs_per_sm * num_sms))
    return max(1, min(rows, triton.next_power_of_2(N)))


FWD_PROGRAMS_PER_SM = 16
BWD_PROGRAMS_PER_SM = 4


def _rows(t: Tensor) -> Tensor:
    """Unit stride along C (the kernels' only layout requirement); other strides are passed on."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_activation(name: str, t: Tensor, x: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"archirf_kernels adaLN: {name} must be (B, N, C), got shape {tuple(t.shape)}")
    if t.shape != x.shape:
        raise ValueError(f"archirf_kernels adaLN: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"archirf_kernels adaLN: {name} dtype {t.dtype} is not fp16, bf16 or fp32")
    if t.device != x.device:
        raise ValueError(f"archirf_kernels adaLN: {name} is on {t.device}, x on {x.device}")


def _check_conditioning(name: str, t: Tensor, x: Tensor) -> None:
    B, N, C = x.shape
    if tuple(t.shape) not in ((B, C), (B, 1, C), (B, N, C)):
        raise ValueError(f"archirf_kernels adaLN: {name} must be per sample (B, C) = ({B}, {C}) or "
                         f"(B, 1, C), or per token (B, N, C) = ({B}, {N}, {C}); got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"archirf_kernels adaLN: {name} dtype {t.dtype} is not fp16, bf16 or fp32")
    if t.device != x.device:
        raise ValueError(f"archirf_kernels adaLN: {name} is on {t.device}, x on {x.device}")


def _check_affine(name: str, t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != (x.shape[-1],):
        raise ValueError(f"archirf_kernels adaLN: {name} must be (C,) = ({x.shape[-1]},), got {tuple(t.shape)}")
    if t.dtype not in _DTYPES or t.device != x.device:
        raise ValueError(f"archirf_kernels adaLN: {name} ({t.dtype} on {t.device}) must be fp16/bf16/fp32 "
                         f"on x's device {x.device}")


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"archirf_kernels adaLN: the Triton kernels need CUDA tensors, got {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU interpreter, "
                         "or use impl='reference')")


def _check_ada_norm(x, shift, scale, weight, bias, norm) -> None:
    _check_activation("x", x, x)
    _check_conditioning("shift", shift, x)
    _check_conditioning("scale", scale, x)
    if shift.shape != scale.shape:
        raise ValueError(f"archirf_kernels adaLN: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} "
                         "must have the same layout")
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    if norm not in NORMS:
        raise ValueError(f"archirf_kernels adaLN: unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    if norm == "rms" and bias is not None:
        raise ValueError("archirf_kernels adaLN: norm='rms' has no bias; pass bias=None")
    _block_c(x.shape[-1])


def _check_gated_residual(x, y, gate) -> None:
    _check_activation("x", x, x)
    _check_activation("y", y, x)
    _check_conditioning("gate", gate, x)


def _strides(t: Tensor | None, N: int) -> tuple[int, int]:
    """(stride over B, stride over N) of a (B, N, C) tensor, or of a per-sample one broadcast over N."""
    if t is None:
        return 0, 0
    if t.dim() == 2:
        return t.stride(0), 0
    return t.stride(0), (t.stride(1) if t.shape[1] == N and N > 1 else 0)


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
    B, N, C = x.shape
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
    block_c = _block_c(C)
    rows = _rows_per_program(B, N, x.device, FWD_PROGRAMS_PER_SM)
    num_row_blocks = triton.cdiv(N, rows)
    _ada_norm_fwd_kernel[(B * num_row_blocks,)](
        x, y if residual else x, gate if residual else x, shift, scale,
        weight if weight is not None else x, bias if bias is not None else x,
        x_new if residual else h, h, mean if norm == "layer" else rstd, rstd,
        *_strides(x, N), *_strides(y, N), *_strides(gate, N), *_strides(shift, N), *_strides(scale, N),
        N, C, num_row_blocks, eps,
        HAS_RESIDUAL=residual, GATE_PER_TOKEN=residual and _per_token(gate, N),
        MOD_PER_TOKEN=_per_token(shift, N), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        IS_RMS=norm == "rms", ROWS_PER_PROGRAM=rows, BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )
    return x_new, h, mean, rstd


def _finish_sum(partial: Tensor, B: int, shape, dtype: torch.dtype) -> Tensor:
    """(B * row blocks, C) fp32 partial rows -> the per-sample (or, with B == 1, global) sum."""
    return partial.view(B, -1, partial.shape[-1]).sum(1).to(dtype).view(shape)


def _ada_norm_backward(dx_new_in, dh, x, y, gate, scale, weight, bias, mean, rstd, norm, shift_dtype):
    """Backward of ada_layer_norm (y = gate = None; x is its input) or of the fusion (x is x_new)
    -> (dx, dy, dgate, dshift, dscale, dweight, dbias); absent inputs get None."""
    B, N, C = x.shape
    _check_device(x)
    residual = y is not None
    dh = dh.contiguous()
    x, scale = _rows(x), _rows(scale)
    weight, bias = (_rows(t) if t is not None else None for t in (weight, bias))
    if residual:
        y, gate = _rows(y), _rows(gate)
        dx_new_in = dx_new_in.contiguous() if dx_new_in is not None else None
    block_c = _block_c(C)
    rows = _rows_per_program(B, N, x.device, BWD_PROGRAMS_PER_SM) if B * N else 1
    num_row_blocks = triton.cdiv(N, rows)
    num_programs = B * num_row_blocks
    gate_per_token = residual and _per_token(gate, N)
    mod_per_token = _per_token(scale, N)

    def grad_buffer(per_token: bool, dtype: torch.dtype) -> Tensor:
        # per token: the gradient itself; a sum over tokens: one fp32 partial row per program
        if per_token:
            return _alloc((B, N, C), dtype, x.device)
        return _alloc((num_programs, C), torch.float32, x.device)

    dx = _alloc((B, N, C), x.dtype, x.device)
    dy = _alloc((B, N, C), y.dtype, x.device) if residual else None
    dgate = grad_buffer(gate_per_token, gate.dtype) if residual else None
    dshift = grad_buffer(mod_per_token, shift_dtype)
    dscale = grad_buffer(mod_per_token, scale.dtype)
    dweight = grad_buffer(False, torch.float32) if weight is not None else None
    dbias = grad_buffer(False, torch.float32) if bias is not None else None
    if num_programs:
        _ada_norm_bwd_kernel[(num_programs,)](
            dh, dx_new_in if dx_new_in is not None else dh, x, y if residual else x,
            gate if residual else x, scale,
            weight if weight is not None else x, bias if bias is not None else x,
            mean if norm == "layer" else rstd, rstd,
            dx, dy if residual else dx, dgate if residual else dx, dshift, dscale,
            dweight if dweight is not None else dx, dbias if dbias is not None else dx,
            *_strides(x, N), *_strides(y, N), *_strides(gate, N), *_strides(scale, N),
            N, C, num_row_blocks,
            HAS_RESIDUAL=residual, HAS_DXNEW=residual and dx_new_in is not None,
            GATE_PER_TOKEN=gate_per_token, MOD_PER_TOKEN=mod_per_token,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, IS_RMS=norm == "rms",
            ROWS_PER_PROGRAM=rows, BLOCK_C=block_c, num_warps=_num_warps(block_c),
        )
    else:   # no tokens: every sum over tokens is zero
        for t in (dgate, dshift, dscale, dweight, dbias):
            if t is not None and t.numel():
                t.zero_()
    if residual and not gate_per_token:
        dgate = _finish_sum(dgate, B, gate.shape, gate.dtype)
    if not mod_per_token:
        dshift = _finish_sum(dshift, B, scale.shape, shift_dtype)
        dscale = _finish_sum(dscale, B, scale.shape, scale.dtype)
    if weight is not None:
        dweight = _finish_sum(dweight, 1, weight.shape, weight.dtype)
    if bias is not None:
        dbias = _finish_sum(dbias, 1, bias.shape, bias.dtype)
    return dx, dy, dgate, dshift, dscale, dweight, dbias


def _gated_residual_forward(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    B, N, C = x.shape
    _check_device(x)
    x, y, gate = _rows(x), _rows(y), _rows(gate)
    out = _alloc((B, N, C), x.dtype, x.device)
    if B * N == 0:
        return out
    block_c = _block_c(C)
    rows = _rows_per_program(B, N, x.device, FWD_PROGRAMS_PER_SM)
    num_row_blocks = triton.cdiv(N, rows)
    _gated_residual_fwd_kernel[(B * num_row_blocks,)](
        x, y, gate, out, *_strides(x, N), *_strides(y, N), *_strides(gate, N),
        N, C, num_row_blocks,
        GATE_PER_TOKEN=_per_token(gate, N), ROWS_PER_PROGRAM=rows, BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )
    return out


def _gated_residual_backward(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dy, dgate); dx is dout itself."""
    B, N, C = y.shape
    _check_device(y)
    dout, y, gate = dout.contiguous(), _rows(y), _rows(gate)
    block_c = _block_c(C)
    rows = _rows_per_program(B, N, y.device, BWD_PROGRAMS_PER_SM) if B * N else 1
    num_row_blocks = triton.cdiv(N, rows)
    num_programs = B * num_row_blocks
    gate_per_token = _per_token(gate, N)
    dy = _alloc((B, N, C), y.dtype, y.device)
    dgate = (_alloc((B, N, C), gate.dtype, y.device) if gate_per_token
             else _alloc((num_programs, C), torch.float32, y.device))
    if num_programs:
        _gated_residual_bwd_kernel[(num_programs,)](
            dout, y, gate, dy, dgate, *_strides(y, N), *_strides(gate, N),
            N, C, num_row_blocks,
            GATE_PER_TOKEN=gate_per_token, ROWS_PER_PROGRAM=rows, BLOCK_C=block_c, num_warps=_num_warps(block_c),
        )
    elif not gate_per_token:
        dgate.zero_()
    if not gate_per_token:
        dgate = _finish_sum(dgate, B, gate.shape, gate.dtype)
    return dy, dgate


# ----------------------------------------------------------------------------------------------
# Custom ops: forward and backward of each op are opaque to torch.compile, which sees their fake
# (meta) implementations; autograd connects them. mean/rstd are outputs so that setup_context can
# save them; absent gradients come back from the backward ops as empty tensors (custom ops return
# no None), and the autograd functions turn them into None.

_EMPTY = (0,)


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(_EMPTY)


@torch.library.custom_op("archirf_kernels::ada_layer_norm", mutates_args=())
def _ada_layer_norm_op(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    _, h, mean, rstd = _ada_norm_forward(x, None, None, shift, scale, weight, bias, eps, norm)
    return h, mean, rstd


@_ada_layer_norm_op.register_fake
def _(x, shift, scale, weight, bias, eps, norm):
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    mean_shape, rstd_shape = _stats_shapes(x, norm)
    return (x.new_empty(x.shape), x.new_empty(mean_shape, dtype=torch.float32),
            x.new_empty(rstd_shape, dtype=torch.float32))


@torch.library.custom_op("archirf_kernels::ada_layer_norm_backward", mutates_args=())
def _ada_layer_norm_backward_op(dh: Tensor, x: Tensor, scale: Tensor, weight: Tensor | None,
                                bias: Tensor | None, mean: Tensor, rstd: Tensor, norm: str,
                                shift_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale, dweight, dbias = _ada_norm_backward(
        None, dh, x, None, None, scale, weight, bias, mean, rstd, norm, shift_dtype)
    return dx, dshift, dscale, _empty_if_none(dweight, x), _empty_if_none(dbias, x)


@_ada_layer_norm_backward_op.register_fake
def _(dh, x, scale, weight, bias, mean, rstd, norm, shift_dtype):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty(_EMPTY),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(_EMPTY))


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


@torch.library.custom_op("archirf_kernels::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    _check_gated_residual(x, y, gate)
    return _gated_residual_forward(x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    _check_gated_residual(x, y, gate)
    return x.new_empty(x.shape)


@torch.library.custom_op("archirf_kernels::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    return _gated_residual_backward(dout, y, gate)


@_gated_residual_backward_op.register_fake
def _(dout, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup_context(ctx, inputs, output):
    _, y, gate = inputs
    ctx.save_for_backward(y, gate)


def _gated_residual_backward_fn(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = torch.ops.archirf_kernels.gated_residual_backward(dout, y, gate)
    return dout, dy, dgate


_gated_residual_op.register_autograd(_gated_residual_backward_fn, setup_context=_gated_residual_setup_context)


@torch.library.custom_op("archirf_kernels::gated_residual_ada_layer_norm", mutates_args=())
def _gated_residual_ada_layer_norm_op(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                      weight: Tensor | None, bias: Tensor | None, eps: float,
                                      norm: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_gated_residual(x, y, gate)
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    x_new, h, mean, rstd = _ada_norm_forward(x, y, gate, shift, scale, weight, bias, eps, norm)
    return x_new, h, mean, rstd


@_gated_residual_ada_layer_norm_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, norm):
    _check_gated_residual(x, y, gate)
    _check_ada_norm(x, shift, scale, weight, bias, norm)
    mean_shape, rstd_shape = _stats_shapes(x, norm)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(mean_shape, dtype=torch.float32),
            x.new_empty(rstd_shape, dtype=torch.float32))


@torch.library.custom_op("archirf_kernels::gated_residual_ada_layer_norm_backward", mutates_args=())
def _gated_residual_ada_layer_norm_backward_op(
        dx_new: Tensor | None, dh: Tensor, x_new: Tensor, y: Tensor, gate: Tensor, scale: Tensor,
        weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, norm: str,
        shift_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dy, dgate, dshift, dscale, dweight, dbias = _ada_norm_backward(
        dx_new, dh, x_new, y, gate, scale, weight, bias, mean, rstd, norm, shift_dtype)
    return dx, dy, dgate, dshift, dscale, _empty_if_none(dweight, x_new), _empty_if_none(dbias, x_new)


@_gated_residual_ada_layer_norm_backward_op.register_fake
def _(dx_new, dh, x_new, y, gate, scale, weight, bias, mean, rstd, norm, shift_dtype):
    return (x_new.new_empty(x_new.shape), y.new_empty(y.shape), gate.new_empty(gate.shape),
            scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape),
            weight.new_empty(weight.shape) if weight is not None else x_new.new_empty(_EMPTY),
            bias.new_empty(bias.shape) if bias is not None else x_new.new_empty(_EMPTY))


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
