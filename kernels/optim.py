"""One pass over the parameters for the whole update: gradient clipping's scale, AdamW, and up to four EMAs.

    g  = grad * scale                                  (scale: a device scalar, e.g. min(1, max_norm / norm))
    m  = m + (1 - beta1) (g - m)                       v = v + (1 - beta2) (g^2 - v)
    p  = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)     bc_i = 1 - beta_i^step
    e_k = e_k + r_k (p - e_k)                          for each EMA k (r_k = 1 - its decay this step)

reference.adamw_ema_step is the spec: torch.optim.AdamW's update (decoupled weight decay, bias correction
from the step count) followed by torch.lerp of each EMA toward the new weights. Every tensor is fp32
(the trainer's parameters are fp32 masters; their gradients, moments and EMAs too), one element per
element of its parameter; the gradient is read once and every other tensor read and written once: 7 + 2 K
fp32 accesses per element, where the unfused path (clip's scaling, fused AdamW, one lerp per EMA) makes
2 + 7 + 3 K.

Many tensors, one launch: the parameters are cut into chunks of BLOCK elements; a chunk table (which
tensor, where in it) is built once per list of sizes and cached, and every launch passes tables of the
tensors' addresses (int64), which the kernel casts to pointers; where every address is 16-byte aligned and
every size a multiple of 4 the kernel is told so, for vector loads and stores. The step count is read per
parameter from its device scalar (no host sync; torch.optim.AdamW keeps one per parameter), incremented
before the call; the bias corrections are computed in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks

Tensor = torch.Tensor

BLOCK = 4096                    # elements per program (a chunk)
MAX_EMAS = 4
INTERPRETER_BLOCK = 64          # Triton's interpreter: small chunks, so tests cover chunks and tails


@triton.jit
def _ptr(Table, row, N, i, ALIGNED: tl.constexpr):
    p = tl.load(Table + row * N + i).to(tl.pointer_type(tl.float32))
    if ALIGNED:                         # every address 16-byte aligned (checked on the host): vector accesses
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _adamw_ema_kernel(
    ChunkTensor, ChunkStart, Sizes,     # per chunk: its tensor's index and first element; per tensor: numel
    Ptrs,                               # (5 + NUM_EMAS, N) int64 addresses: param, grad, exp_avg, exp_avg_sq,
    N, Scale_ptr,                       # step count (a scalar per parameter, as torch keeps it), EMAs
    lr, beta1, beta2, eps, weight_decay, r0, r1, r2, r3,
    HAS_SCALE: tl.constexpr, NUM_EMAS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(ChunkTensor + pid)
    start = tl.load(ChunkStart + pid).to(tl.int64)
    size = tl.load(Sizes + t).to(tl.int64)
    if ALIGNED:                         # chunks start at multiples of BLOCK; every size a multiple of 4
        start = tl.multiple_of(start, BLOCK)
        size = tl.multiple_of(size, 4)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < size
    p_ptr, g_ptr = _ptr(Ptrs, 0, N, t, ALIGNED) + offs, _ptr(Ptrs, 1, N, t, ALIGNED) + offs
    m_ptr, v_ptr = _ptr(Ptrs, 2, N, t, ALIGNED) + offs, _ptr(Ptrs, 3, N, t, ALIGNED) + offs
    # this parameter's own step count; the bias corrections in fp64 (exact pow, as torch's fused AdamW)
    step = tl.load(_ptr(Ptrs, 4, N, t, False)).to(tl.float64)
    bc1 = (1.0 - tl.exp(step * tl.log(tl.full([], beta1, tl.float64)))).to(tl.float32)
    bc2 = (1.0 - tl.exp(step * tl.log(tl.full([], beta2, tl.float64)))).to(tl.float32)
    g = tl.load(g_ptr, mask=mask, other=0.0)
    if HAS_SCALE:
        g = g * tl.load(Scale_ptr)
    m = tl.load(m_ptr, mask=mask, other=0.0)
    v = tl.load(v_ptr, mask=mask, other=0.0)
    m = m + (1.0 - beta1) * (g - m)
    v = v + (1.0 - beta2) * (g * g - v)
    p = tl.load(p_ptr, mask=mask, other=0.0) * (1.0 - lr * weight_decay)
    p = p - (lr / bc1) * m / (tl.sqrt(v) / tl.sqrt(bc2) + eps)
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)
    tl.store(p_ptr, p, mask=mask)
    for k in tl.static_range(NUM_EMAS):
        r = r0 if k == 0 else (r1 if k == 1 else (r2 if k == 2 else r3))
        e_ptr = _ptr(Ptrs, 5 + k, N, t, ALIGNED) + offs
        e = tl.load(e_ptr, mask=mask, other=0.0)
        tl.store(e_ptr, e + r * (p - e), mask=mask)


INTERPRETED = type(_adamw_ema_kernel).__name__ == "InterpretedFunction"
_CHUNKS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _chunk_table(sizes: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    key = (sizes, block, device)
    if key not in _CHUNKS:
        tensor, start = [], []
        for i, n in enumerate(sizes):
            starts = range(0, n, block)
            tensor += [i] * len(starts)
            start += list(starts)
        _CHUNKS[key] = (torch.tensor(tensor, dtype=torch.int32, device=device),
                        torch.tensor(start, dtype=torch.int64, device=device),
                        torch.tensor(sizes, dtype=torch.int64, device=device))
    return _CHUNKS[key]


def adamw_ema_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   step: Tensor | list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, emas: list[list[Tensor]] = (), ema_rates: list[float] = (),
                   grad_scale: Tensor | None = None, check: bool = True) -> None:
    """Updates params, exp_avgs, exp_avg_sqs and each EMA list in place (see the module doc). `step`: the step
    count after this step, one scalar tensor for all parameters or one per parameter (torch.optim.AdamW's
    state["step"]s); `grad_scale`: a device scalar the gradients are multiplied by, or None; `ema_rates`:
    1 - decay of each EMA (torch.lerp's weight). check=False skips the argument checks (a caller that checked
    this set of tensors once)."""
    emas = [list(e) for e in emas]
    steps = list(step) if isinstance(step, (list, tuple)) else [step] * len(params)
    if check:
        checks.adamw_ema_step(params, grads, exp_avgs, exp_avg_sqs, emas, ema_rates, steps=steps)
    if not params:
        return
    device = params[0].device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("archirf_kernels.adamw_ema_step runs on CUDA (or in Triton's interpreter, "
                           "TRITON_INTERPRET=1); use the reference on this device")
    block = BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    live = [i for i, p in enumerate(params) if p.numel()]
    tensor, start, sizes = _chunk_table(tuple(params[i].numel() for i in live), block, device)
    rows = [params, grads, exp_avgs, exp_avg_sqs, steps, *emas]
    addresses = [[row[i].data_ptr() for i in live] for row in rows]
    aligned = (all(a % 16 == 0 for r, row in enumerate(addresses) if r != 4 for a in row)
               and all(params[i].numel() % 4 == 0 for i in live))
    table = torch.tensor(addresses, dtype=torch.int64, pin_memory=device.type == "cuda")
    rates = [float(r) for r in ema_rates] + [0.0] * (MAX_EMAS - len(ema_rates))
    _adamw_ema_kernel[(tensor.numel(),)](
        tensor, start, sizes, table.to(device, non_blocking=True), len(live),
        grad_scale if grad_scale is not None else params[live[0]],
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), *rates,
        HAS_SCALE=grad_scale is not None, NUM_EMAS=len(emas), ALIGNED=aligned, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
