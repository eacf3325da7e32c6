"""Where the attention fwd+bwd time goes: per implementation and case of bench_attention, the
median fwd+bwd time (timed as the benchmarks time it: benchmarks/harness.py) and the GPU kernels
that make it up (torch.profiler), so that the gap between ours and SDPA alone can be read kernel by
kernel instead of guessed.

Besides bench_attention's implementations it times SDPA alone on two more layouts, to separate the
cost of the layout from the cost of the norm:
  sdpa-cudnn-bnhd   cuDNN on (B, N, H, D) storage seen as (B, H, N, D) (our norm pass's output layout);
  sdpa-cudnn-qkv    cuDNN on the q, k, v views of a packed (B, N, 3, H, D) projection.

    python -m benchmarks.profile_attention [CASE ...] [--impl IMPL ...] [--top K]
    python -m benchmarks.profile_attention [CASE ...] --prep-sweep     # the sdpa backend's passes alone

--prep-sweep times the sdpa backend's prep pass (forward) and its backward alone for each launch
shape (PREP_* in kernels/attention.py), in GB/s of their minimal traffic (forward: read q,
k, v, write qhat, khat, vhat = 6 T; backward: read d(qhat, khat, vhat), q, k, write d(q, k, v) = 8 T;
T = B N H D 2 bytes), against a device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from .bench_attention import CASES, implementation, make_inputs
from .harness import SESSION, pass_target

EXTRA = ("sdpa-cudnn-bnhd", "sdpa-cudnn-qkv")
DEFAULT_IMPLS = ("ours-fused", "ours-sdpa", "compiled", "sdpa-cudnn", *EXTRA)


def _layout_inputs(impl: str, shape, device):
    b, h, n_img, n_ctx, d = shape
    n = n_img + n_ctx
    gen = torch.Generator(device=device).manual_seed(0)
    if impl == "sdpa-cudnn-bnhd":
        leaves = [torch.randn(b, n, h, d, device=device, generator=gen).bfloat16().requires_grad_() for _ in range(3)]
        views = lambda: [t.transpose(1, 2) for t in leaves]   # noqa: E731
    else:
        qkv = torch.randn(b, n, 3, h, d, device=device, generator=gen).bfloat16().requires_grad_()
        leaves = [qkv]
        views = lambda: qkv.permute(2, 0, 3, 1, 4).unbind(0)   # noqa: E731
    grad = torch.randn(b, h, n, d, device=device, generator=gen).bfloat16()
    return leaves, views, grad


def _step(impl: str, case: str, device):
    """A closure running one fwd+bwd of impl on case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shape = CASES[case]
    if impl in EXTRA:
        leaves, views, grad = _layout_inputs(impl, shape, device)

        def step():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(*views())
            torch.autograd.grad(out, leaves, grad)
        return step
    fn = implementation(impl, case, shape[3] > 0, device)
    inputs, grads = make_inputs(impl, shape, device)
    return pass_target("fwd_bwd", fn, inputs, grads)[0]


def profile(impl: str, case: str, device, top: int) -> str:
    step = _step(impl, case, device)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ms = statistics.median(SESSION.gpu_times(step, rounds=30)) * 1e3   # the benchmarks' timing
    reps = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time / reps / 1e3
            k[1] += 1
    busy = sum(v[0] for v in kernels.values())
    lines = [f"== {case} {impl}: fwd+bwd {ms:.3f} ms median, GPU busy {busy:.3f} ms"]
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"   {t:7.3f} ms  x{n // reps:<2} {name[:110]}")
    return "\n".join(lines)


FWD_SWEEP = [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8)]                       # (rows, warps)
BWD_SWEEP = [(16, 2, 8), (16, 4, 4), (16, 4, 8), (16, 4, 16), (16, 8, 4), (32, 4, 4), (32, 4, 8), (32, 8, 4),
             (32, 8, 8), (64, 4, 4), (64, 8, 4), (64, 8, 8)]
#            (rows, warps, programs per SM)
_KNOBS = ("PREP_ROWS", "PREP_WARPS", "PREP_BWD_ROWS", "PREP_BWD_WARPS", "PREP_BWD_PER_SM")


def prep_sweep(case: str, device) -> str:
    from triton.testing import do_bench_cudagraph

    from archirf_kernels import attention
    b, h, n_img, n_ctx, d = CASES[case]
    inputs, _ = make_inputs("ours", CASES[case], device)
    inputs = [t.detach() for t in inputs]     # the ops alone, no autograd recording
    qkv, qkv_ctx = inputs[0], (inputs[1] if n_ctx else None)
    ws = inputs[2:] if n_ctx else (*inputs[1:], None, None)
    ops = torch.ops.archirf_kernels
    hats = ops.qkv_prep(qkv, qkv_ctx, *ws, 1e-6, 1e-6, True)
    dhats = [torch.randn_like(t) for t in hats[:3]]
    t_bytes = b * (n_img + n_ctx) * h * d * 2
    copy_ms = 6 * t_bytes / SESSION.copy_gbps / 1e6        # a device copy of 6 T at the session's bandwidth

    def fwd_fn():
        ops.qkv_prep(qkv, qkv_ctx, *ws, 1e-6, 1e-6, True)

    def bwd_fn():
        ops.qkv_prep_backward(*dhats, qkv, qkv_ctx, *ws, hats[3], True)

    def timed(fn):
        fn()                                    # compile outside the graph capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn)           # no host time in the way

    lines = [f"== {case} prep passes (copy of 6 T: {copy_ms * 1e3:.0f} us, {6 * t_bytes / copy_ms / 1e6:.0f} GB/s)"]
    keep = {k: getattr(attention, k) for k in _KNOBS}
    try:
        for rows, warps in FWD_SWEEP:
            attention.PREP_ROWS, attention.PREP_WARPS = rows, warps
            ms = timed(fwd_fn)
            lines.append(f"   fwd rows {rows:3} warps {warps}:          {ms * 1e3:6.1f} us "
                         f"{6 * t_bytes / ms / 1e6:5.0f} GB/s")
        for rows, warps, per_sm in BWD_SWEEP:
            attention.PREP_BWD_ROWS, attention.PREP_BWD_WARPS, attention.PREP_BWD_PER_SM = rows, warps, per_sm
            ms = timed(bwd_fn)
            lines.append(f"   bwd rows {rows:3} warps {warps} per SM {per_sm:2}: {ms * 1e3:6.1f} us "
                         f"{8 * t_bytes / ms / 1e6:5.0f} GB/s")
    finally:
        for k, v in keep.items():
            setattr(attention, k, v)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", default=list(CASES))
    p.add_argument("--impl", nargs="+", default=list(DEFAULT_IMPLS))
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--prep-sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention: needs a CUDA GPU")
    device = torch.device("cuda")
    SESSION.start(device)                          # L2 flush buffer, sleep calibration, copy bandwidth
    if args.prep_sweep:
        for case in args.cases:
            print(prep_sweep(case, device), flush=True)
        return
    for case in args.cases:
        for impl in args.impl:
            try:
                print(profile(impl, case, device, args.top), flush=True)
            except Exception as e:   # one implementation failing must not hide the others' tables
                print(f"== {case} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
